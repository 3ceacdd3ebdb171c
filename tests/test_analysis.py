"""The papers' analyses on tiny models: gradient norms, layer responses, lesions, feature reuse,
and their figures. Every expected value is computed independently here, by hand."""

from __future__ import annotations

import json
import math

import pytest
from conftest import randomise_bn
import torch
import torch.nn as nn
import torch.nn.functional as F

import resdense
from resdense.analysis.gradients import GradientReport, gradient_norms
from resdense.analysis.lesion import LesionReport, lesion_blocks, lesion_random, lesion_study, lesioned
from resdense.analysis.responses import ResponseReport, layer_responses
from resdense.analysis.reuse import ReuseReport, feature_reuse
from resdense.errors import ConfigError, InputError
from resdense.plots import plot_gradient_norms, plot_layer_responses, plot_lesion, plot_reuse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n: int = 2, size: int = 16, batch: int = 6, seed: int = 0, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return resdense.create_model(name, **kwargs)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- gradient norms -------------------------------------------------------------------------


def _manual_norms(model: nn.Module, batches, names: list[str]) -> list[float]:
    """Per-batch gradient norms of the named weights by plain autograd, averaged over batches."""
    weights = [model.get_submodule(n).weight for n in names]
    totals = torch.zeros(len(names))
    model.train()
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), weights)
        totals += torch.stack([g.norm() for g in grads])
    return (totals / len(batches)).tolist()


@pytest.mark.parametrize("name", ["cifar_resnet", "cifar_plain"])
def test_gradient_norms_match_autograd_by_hand(name):
    model = _model(name, depth=14)
    batches = _batches(n=3)
    model.eval()  # the analysis must measure in train mode and then give eval mode back
    before = _state(model)
    report = gradient_norms(model, batches, max_batches=2)

    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert report.layer_names == convs + ["fc"]
    assert report.kinds[-1] == "classifier" and report.is_classifier == [False] * len(convs) + [True]
    assert report.num_batches == 2
    picked = [convs[0], convs[5], convs[-1], "fc"]
    expected = _manual_norms(_model(name, depth=14), batches[:2], picked)
    got = [report.norms[report.layer_names.index(n)] for n in picked]
    assert got == pytest.approx(expected, rel=1e-5)
    assert report.ratio_first_last == pytest.approx(report.norms[0] / report.norms[len(convs) - 1], rel=1e-9)

    # The model comes back as it was: eval mode, BN running statistics unmoved, no .grad left.
    assert not model.training
    _assert_same_state(before, _state(model))
    assert all(p.grad is None for p in model.parameters())
    json.dumps(report.to_dict())
    assert GradientReport.from_dict(report.to_dict()) == report


def test_gradient_norms_flag_shortcut_projections_and_leave_them_out_of_the_ratio():
    model = _model("cifar_resnet", depth=8, shortcut="B")
    report = gradient_norms(model, _batches(n=1))
    shortcuts = [n for n, k in zip(report.layer_names, report.kinds) if k == "shortcut"]
    assert shortcuts == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    main = [v for v, k in zip(report.norms, report.kinds) if k == "conv"]
    assert report.ratio_first_last == pytest.approx(main[0] / main[-1])
    assert report.has_shortcuts


def test_gradient_norms_same_with_memory_efficient_densenet():
    batches = _batches(n=2, batch=4)
    plain = gradient_norms(_model("cifar_densenet", depth=10, growth_rate=4), batches)
    efficient_model = _model("cifar_densenet", depth=10, growth_rate=4, memory_efficient=True)
    efficient = gradient_norms(efficient_model, batches)
    assert efficient.layer_names == plain.layer_names
    assert efficient.norms == pytest.approx(plain.norms, rel=1e-5)
    assert efficient_model.memory_efficient  # measurement does not switch checkpointing off
    assert efficient.layer_names[-1] == "classifier"


def test_gradient_norms_under_bf16_autocast_on_a_tiny_model():
    # bf16 is slow on this CPU: one tiny batch through the smallest CIFAR ResNet.
    batches = _batches(n=1, size=8, batch=2)
    model = _model("cifar_resnet", depth=8)
    full = gradient_norms(model, batches)
    half = gradient_norms(model, batches, autocast_dtype=torch.bfloat16)
    assert half.autocast_dtype == "bfloat16" and full.autocast_dtype is None
    assert all(math.isfinite(v) and v > 0 for v in half.norms)
    # bf16 keeps ~3 significant digits; the norms agree to a few percent, not exactly.
    assert half.norms == pytest.approx(full.norms, rel=0.1)
    assert half.norms != full.norms


def test_gradient_norms_reach_frozen_weights_and_refuse_bad_batches():
    model = _model("cifar_resnet", depth=8)
    model.conv1.weight.requires_grad_(False)
    report = gradient_norms(model, _batches(n=1))
    assert report.norms[0] > 0 and not model.conv1.weight.requires_grad
    with pytest.raises(InputError, match="no batches"):
        gradient_norms(model, [])
    with pytest.raises(InputError, match="float NCHW"):
        gradient_norms(model, [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))])


# --- layer responses ------------------------------------------------------------------------


def test_layer_responses_count_and_one_std_by_hand():
    model = randomise_bn(_model("cifar_resnet", depth=14))
    batches = _batches(n=2)
    model.train()
    report = layer_responses(model, batches)
    assert model.training  # eval inside, mode given back

    threes = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert report.layer_names == threes and len(report.stds) == len(threes) == 13
    assert report.response_modules[threes.index("layer2.1.conv2")] == "layer2.1.bn2"
    assert report.sorted_stds == sorted(report.stds, reverse=True)

    kept = []
    handle = model.layer2[1].bn2.register_forward_hook(lambda m, i, o: kept.append(o.detach().clone()))
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    handle.remove()
    y = torch.cat(kept)  # (N_total, C, H, W)
    expected = y.double().std(dim=(0, 2, 3), correction=0).mean().item()
    assert report.stds[threes.index("layer2.1.conv2")] == pytest.approx(expected, rel=1e-5)
    json.dumps(report.to_dict())
    assert ResponseReport.from_dict(report.to_dict()) == report


def test_layer_responses_pre_activation_and_densenet_use_the_conv_output():
    batches = _batches(n=1)
    preact = layer_responses(_model("cifar_preact_resnet", depth=8), batches)
    assert preact.layer_names == preact.response_modules  # no BN between a preact 3x3 conv and the sum
    assert len(preact.layer_names) == 7
    dense = layer_responses(_model("cifar_densenet", depth=10, growth_rate=4), batches)
    assert dense.layer_names == dense.response_modules and len(dense.layer_names) == 7
    plain = layer_responses(_model("cifar_plain", depth=8), batches)
    assert [m.rsplit(".", 1)[-1] for m in plain.response_modules] == ["bn1"] + ["bn1", "bn2"] * 3
    assert not plain.has_shortcuts and preact.has_shortcuts and dense.has_shortcuts


# --- lesions --------------------------------------------------------------------------------


def test_a_block_with_a_zeroed_branch_lesions_to_the_baseline():
    model = randomise_bn(_model("cifar_resnet", depth=14))
    block = model.layer2[1]
    with torch.no_grad():  # zeroed last BN: the residual branch adds exactly nothing
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = _batches(n=1)[0][0]
    model.eval()
    with torch.no_grad():
        intact = model(x)
        with lesioned(model, ["layer2.1"]):
            assert torch.equal(model(x), intact)

    report = lesion_blocks(model, _batches(n=2))
    by_name = {b.name: b for b in report.blocks}
    assert by_name["layer2.1"].error_pct == report.baseline_error_pct
    assert [b.downsampling for b in report.blocks] == [False, False, True, False, True, False]
    assert all(b.removable for b in report.blocks)
    assert report.num_images == 12
    assert LesionReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_lesion_changes_the_output_of_a_live_block():
    model = randomise_bn(_model("cifar_resnet", depth=14)).eval()
    x = _batches(n=1)[0][0]
    with torch.no_grad():
        intact = model(x)
        with lesioned(model, ["layer1.0"]):
            assert not torch.allclose(model(x), intact)


def test_lesion_leaves_the_model_unchanged_even_after_an_exception():
    model = randomise_bn(_model("cifar_resnet", depth=14)).eval()
    x = _batches(n=1)[0][0]
    before_state, before_modules = _state(model), [n for n, _ in model.named_modules()]
    with torch.no_grad():
        before_out = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with lesioned(model, ["layer1.1", "layer3.0"]):
            assert "layer1.1.block" in dict(model.named_modules())
            raise RuntimeError("boom")
    with pytest.raises(ConfigError, match="not a residual block"):
        with lesioned(model, ["layer1.0", "layer1.0.conv1"]):
            pass
    with pytest.raises(ConfigError, match="no block 'layer9.0'"):
        with lesioned(model, ["layer1.0", "layer9.0"]):
            pass
    lesion_study(model, _batches(n=1), k_values=[2], trials=2)
    _assert_same_state(before_state, _state(model))
    assert [n for n, _ in model.named_modules()] == before_modules
    with torch.no_grad():
        assert torch.equal(model(x), before_out)
    assert not model.training


def test_plain_net_marks_shape_changing_blocks_not_removable():
    model = randomise_bn(_model("cifar_plain", depth=14))
    report = lesion_study(model, iter(_batches(n=2)), trials=2, seed=3)  # a one-shot iterator is replayed
    removable = {b.name: b.removable for b in report.blocks}
    assert removable == {"layer1.0": True, "layer1.1": True, "layer2.0": False,
                         "layer2.1": True, "layer3.0": False, "layer3.1": True}
    assert all((b.error_pct is None) == (not b.removable) for b in report.blocks)
    assert not report.has_shortcuts and report.removable_count == 4
    assert report.random is not None and report.random.k_values == [1, 2, 3, 4]
    assert set(report.random.candidates) == {n for n, r in removable.items() if r}
    # A plain block is deleted by the identity: the deleted net equals the net without it.
    x = _batches(n=1)[0][0]
    model.eval()
    with torch.no_grad(), lesioned(model, ["layer2.1"]):
        out = model(x)
    with torch.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        h = model.layer3(model.layer2[0](model.layer1(h)))
        expected = model.forward_head(model.final_act(model.final_norm(h)))
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)


def test_random_lesion_is_seeded_and_checks_k():
    model = randomise_bn(_model("cifar_resnet", depth=14))
    batches = _batches(n=1)
    a = lesion_random(model, batches, [1, 3], trials=3, seed=7)
    b = lesion_random(model, batches, [1, 3], trials=3, seed=7)
    assert a == b and len(a.mean_error_pct) == 2
    assert lesion_random(model, batches, [6], trials=2).std_error_pct == [0.0]  # only one way to delete all 6
    with pytest.raises(ConfigError, match="between 1 and 4"):
        lesion_random(model, batches, [5], exclude_downsampling=True)
    with pytest.raises(ConfigError, match="no residual blocks"):
        lesion_blocks(_model("cifar_densenet", depth=10, growth_rate=4), batches)


# --- feature reuse --------------------------------------------------------------------------


@pytest.mark.parametrize("bc", [False, True])
def test_reuse_matrix_shape_triangle_and_one_cell_by_hand(bc):
    depth = 16 if bc else 13  # two / three layers per block
    model = _model("cifar_densenet", depth=depth, growth_rate=4, bc=bc)
    report = feature_reuse(model)
    n = 2 if bc else 3
    assert len(report.blocks) == 3
    assert [b.last_target for b in report.blocks] == ["transition", "transition", "classifier"]
    for block in report.blocks:
        assert block.num_layers == n and block.growth_rate == 4
        assert len(block.matrix) == n + 1 and all(len(row) == n + 1 for row in block.matrix)
        for t, row in enumerate(block.matrix):
            for s, v in enumerate(row):
                assert math.isnan(v) == (s > t), (block.name, t, s)  # nothing reads a later layer

    # Block 2, target layer 2 (row 1), source layer 1 (its channels follow the block input).
    b2 = report.blocks[1]
    w = model.features.denseblock2.denselayer2.conv1.weight  # (out, in, kh, kw)
    c0 = b2.in_chs
    assert c0 == model.features.transition1.conv.out_channels
    expected = w[:, c0:c0 + 4].abs().mean().item()
    assert b2.matrix[1][1] == pytest.approx(expected, rel=1e-6)
    # The classifier row of the last block: source 0 is the last transition's output.
    b3 = report.blocks[2]
    fc = model.classifier.weight  # (classes, features)
    assert b3.matrix[-1][0] == pytest.approx(fc[:, :b3.in_chs].abs().mean().item(), rel=1e-6)
    normalised = b3.normalised()
    assert max(normalised[-1]) == pytest.approx(1.0)

    back = ReuseReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.blocks[1].matrix[1][1] == b2.matrix[1][1] and math.isnan(back.blocks[1].matrix[0][1])


def test_reuse_refuses_a_resnet():
    with pytest.raises(ConfigError, match="needs a DenseNet"):
        feature_reuse(_model("cifar_resnet", depth=8))


# --- figures --------------------------------------------------------------------------------


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_every_plot_writes_a_png(tmp_path):
    batches = _batches(n=1)
    res, plain = _model("cifar_resnet", depth=8, shortcut="B"), _model("cifar_plain", depth=8)
    grads = {"resnet8": gradient_norms(res, batches), "plain8": gradient_norms(plain, batches)}
    assert _is_png(plot_gradient_norms(grads, tmp_path / "grads.png", "Gradient norms, 8 layers"))
    resp = {"resnet8": layer_responses(res, batches), "plain8": layer_responses(plain, batches)}
    assert _is_png(plot_layer_responses(resp, tmp_path / "responses.png"))
    lesions = {"resnet8": lesion_study(res, batches, trials=1), "plain8": lesion_blocks(plain, batches)}
    assert _is_png(plot_lesion(lesions, tmp_path / "sub" / "lesion.png"))
    reuse = feature_reuse(_model("cifar_densenet", depth=13, growth_rate=4))
    assert _is_png(plot_reuse(reuse, tmp_path / "reuse.png"))
    # Reports read back from JSON draw the same way.
    back = {k: GradientReport.from_dict(json.loads(json.dumps(v.to_dict()))) for k, v in grads.items()}
    assert _is_png(plot_gradient_norms(back, tmp_path / "grads_json.png", "from JSON"))
