"""The model zoo: every registered model builds, runs and trains; counts equal the papers'."""

from __future__ import annotations

import copy
import functools
import io

import pytest
from conftest import randomise_bn
import torch
import torch.nn as nn

import resdense
from resdense.analysis import count_params, model_info
from resdense.errors import ConfigError, InputError, UnknownModelError
from resdense.models import DenseNet, model_entry
from resdense.models.layers import ZeroPadShortcut

EXACT_PARAMS = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "resnet1202": 19_421_274,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "densenet40_k12": 1_019_722, "densenet100_k12": 6_979_642, "densenet100_k24": 27_249_082,
    "densenet_bc100_k12": 769_162, "densenet_bc250_k24": 15_324_406, "densenet_bc190_k40": 25_624_430,
    "densenet121": 7_978_856, "densenet161": 28_681_000, "densenet169": 14_149_480,
    "densenet201": 20_013_928, "densenet264": 33_337_704,
    "preact_resnet164": 1_703_258, "preact_resnet1001": 10_327_706,
    "vgg19_bn": 143_678_248,  # torchvision's vgg19_bn
}

# Models deeper than this are exercised by the count test only; one forward/backward of a
# 1000-layer net on 2 cores costs more than the rest of the suite.
HUGE = {"resnet1202", "plain1202", "preact_resnet1001"}


def _small_input(name: str, in_chans: int = 1, batch: int = 2) -> torch.Tensor:
    model_size = max(model_entry(name).input_size[1] // 7, 1)  # small, but not below the minimum
    return torch.randn(batch, in_chans, max(model_size, 32), max(model_size, 32))


@pytest.mark.parametrize("name", [n for n in resdense.list_models() if n not in HUGE])
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = resdense.create_model(name, num_classes=7, in_chans=1)
    x = _small_input(name)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    # The common face: features -> head, num_features, reset_classifier.
    model.eval()
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3


@pytest.mark.parametrize("name, expected", sorted(EXACT_PARAMS.items()))
def test_exact_parameter_counts(name, expected):
    assert count_params(resdense.create_model(name)) == expected


@pytest.mark.parametrize("name", [n for n in resdense.list_models() if model_entry(n).paper and model_entry(n).paper.params])
def test_paper_parameter_counts_within_rounding(name):
    paper = model_entry(name).paper.params
    ours = count_params(resdense.create_model(name))
    decimals = len(f"{paper / 1e6:g}".partition(".")[2])
    half_unit = 0.5 * 10 ** -decimals * 1e6
    # ResNet-1001's 10.2M in He et al. 2016 is 1.3% under its exact count (10,327,706).
    assert abs(ours - paper) <= max(half_unit, 0.015 * paper), f"{name}: {ours:,} vs paper {paper:,.0f}"


def _projection_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".downsample." in n)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110, 18, 34, 50, 101, 152])
def test_plain_twin_is_resnet_minus_projections(depth):
    res, plain = resdense.create_model(f"resnet{depth}"), resdense.create_model(f"plain{depth}")
    assert count_params(plain) == count_params(res) - _projection_params(res)
    if depth in (20, 32, 44, 56, 110):  # option A has no projection parameters
        assert count_params(plain) == count_params(res)
    assert not any(b.use_shortcut for b in plain.modules() if hasattr(b, "use_shortcut"))
    assert [n for n, _ in plain.named_modules() if "downsample" not in n] == \
        [n for n, _ in res.named_modules() if "downsample" not in n]


def test_macs_match_paper_with_its_stride_placement():
    # The paper's 3.8 / 7.6 / 11.3 G FLOPs are for the stride on the first 1x1 ("v1").
    for depth, paper in ((18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)):
        info = model_info(f"resnet{depth}")
        ours = (info.paper_comparable_macs or info.macs) / 1e9
        assert abs(ours - paper) / paper < 0.02, (depth, ours)
    v15, v1 = model_info("resnet50"), model_info("resnet50", stride_in_1x1=True)
    assert v15.params == v1.params and v1.macs < v15.macs


def test_info_rows_add_up():
    info = model_info("densenet_bc100_k12", (3, 32, 32))
    assert sum(r.params for r in info.rows) == info.params == 769_162
    assert sum(r.macs for r in info.rows) == info.macs
    assert info.rows[-1].output_shape == (10,)


def test_torchvision_module_names():
    resnet = resdense.create_model("resnet50").state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.num_batches_tracked", "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert key in resnet
    assert len(resnet) == 320  # torchvision resnet50's state_dict has 320 entries
    dense = resdense.create_model("densenet121").state_dict()
    for key in ("features.conv0.weight", "features.norm0.weight", "features.denseblock1.denselayer1.norm1.weight",
                "features.denseblock1.denselayer1.conv1.weight", "features.denseblock4.denselayer16.conv2.weight",
                "features.transition3.conv.weight", "features.norm5.running_mean", "classifier.bias"):
        assert key in dense
    vgg = resdense.create_model("vgg19_bn").state_dict()
    assert {"features.0.weight", "features.1.running_mean", "classifier.0.weight", "classifier.6.bias"} <= set(vgg)


def test_option_a_zero_pads_and_subsamples():
    block = resdense.create_model("resnet20").layer2[0]
    x = torch.randn(2, 16, 8, 8)
    short = block.downsample(x)
    assert short.shape == (2, 32, 4, 4)
    assert torch.equal(short[:, 8:24], x[:, :, ::2, ::2])
    assert short[:, :8].abs().sum() == 0 and short[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("shortcut, n_pad, n_proj, added", [("A", 2, 0, 9), ("B", 0, 2, 9), ("C", 0, 9, 9), ("none", 0, 0, 0)])
def test_shortcut_options(shortcut, n_pad, n_proj, added):
    model = resdense.create_model("resnet20", shortcut=shortcut)
    blocks = [m for m in model.modules() if hasattr(m, "use_shortcut")]
    assert sum(isinstance(b.downsample, ZeroPadShortcut) for b in blocks) == n_pad
    assert sum(isinstance(b.downsample, nn.Sequential) for b in blocks) == n_proj
    assert sum(b.use_shortcut for b in blocks) == added
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_zero_init_last_makes_blocks_identity():
    torch.manual_seed(0)
    model = resdense.create_model("resnet20", zero_init_last=True).eval()
    block = model.layer1[1]
    x = torch.relu(torch.randn(2, 16, 8, 8))
    assert torch.allclose(block(x), x)
    default = resdense.create_model("resnet20")  # off by default, as in the papers
    assert all((b.bn2.weight == 1).all() for b in default.modules() if hasattr(b, "use_shortcut"))
    plain = resdense.create_model("plain20", zero_init_last=True)
    assert all((b.bn2.weight == 1).all() for b in plain.modules() if hasattr(b, "use_shortcut"))


def test_injected_norm_and_activation():
    model = resdense.create_model("resnet20", norm_layer=functools.partial(nn.GroupNorm, 4), act_layer=nn.SiLU)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    dense = resdense.create_model("cifar_densenet", depth=10, growth_rate=4, act_layer=nn.GELU)
    assert any(isinstance(m, nn.GELU) for m in dense.modules())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert dense(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_memory_efficient_densenet_changes_nothing_but_memory(drop_rate):
    torch.manual_seed(0)
    ref = resdense.create_model("cifar_densenet", depth=16, growth_rate=6, bc=True, drop_rate=drop_rate)
    eff = copy.deepcopy(ref)
    eff.set_memory_efficient(True)
    x = torch.randn(4, 3, 16, 16)
    for mode in ("train", "eval"):
        ref.train(mode == "train"), eff.train(mode == "train")
        outs, grads = [], []
        for m in (ref, eff):
            m.zero_grad()
            torch.manual_seed(1)
            out = m(x)
            out.square().mean().backward()
            outs.append(out)
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        assert torch.equal(outs[0], outs[1])
        for n in grads[0]:
            assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
        for (n, b0), b1 in zip(ref.named_buffers(), eff.buffers()):
            assert torch.equal(b0, b1), f"{n} differs ({mode})"


TINY = [("cifar_resnet", {"depth": 8}), ("cifar_densenet", {"depth": 10, "growth_rate": 4, "bc": True})]


def _tiny_models():
    return [resdense.create_model(name, **kwargs) for name, kwargs in TINY]


def test_deepcopy_and_save_load(tmp_path):
    x = torch.randn(2, 3, 16, 16)
    for (name, kwargs), model in zip(TINY, _tiny_models()):
        model.eval()
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(copy.deepcopy(model)(x), model(x))
        fresh = resdense.create_model(name, **kwargs).eval()  # the state dict loads strictly
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(fresh(x), model(x))


def test_torch_export():
    x = torch.randn(2, 3, 16, 16)
    for model in _tiny_models():
        model.eval()
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-6)


@pytest.mark.slow
def test_torch_compile():
    x = torch.randn(2, 3, 16, 16)
    for model in _tiny_models():
        model.eval()
        compiled = torch.compile(model)
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="resnet56"):
        resdense.create_model("resnt56")


@pytest.mark.parametrize("name, kwargs, match", [
    ("cifar_resnet", {"depth": 21}, "6n\\+2"),
    ("cifar_preact_resnet", {"depth": 30, "bottleneck": True}, "9n\\+2"),
    ("cifar_densenet", {"depth": 41}, "\\(L-4\\)/3"),
    ("cifar_densenet", {"depth": 98, "bc": True}, "\\(L-4\\)/6"),
    ("resnet20", {"in_chans": 0}, "in_chans"),
    ("resnet20", {"num_classes": -1}, "num_classes"),
    ("resnet20", {"shortcut": "D"}, "shortcut"),
    ("cifar_densenet", {"compression": 1.5}, "compression"),
])
def test_invalid_configurations_raise_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resdense.create_model(name, **kwargs)


def test_input_checks():
    with pytest.raises(InputError, match="at least 32x32"):
        resdense.create_model("densenet121")(torch.randn(1, 3, 16, 16))
    with pytest.raises(InputError, match="in_chans=1"):
        resdense.create_model("resnet20")(torch.randn(1, 1, 32, 32))
    # Any size down to the minimum works, including non-square and odd sizes.
    assert resdense.create_model("densenet121", num_classes=5).eval()(torch.randn(1, 3, 32, 45)).shape == (1, 5)
    assert resdense.create_model("resnet18").eval()(torch.randn(1, 3, 1, 1)).shape == (1, 1000)


def test_registry_refuses_duplicates():
    from resdense.models._registry import ModelEntry, _Registry

    registry = _Registry()
    entry = ModelEntry("net", nn.Identity, (3, 32, 32), None, "test")
    registry.add(entry)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(entry)
    with pytest.raises(ValueError, match="registered twice"):  # the real registry too
        resdense.models.register_model()(model_entry("resnet20").fn)


def test_list_models_pattern():
    assert resdense.list_models("plain*")[:3] == ["plain18", "plain20", "plain32"]
    assert set(resdense.list_models("densenet_bc*")) == {"densenet_bc100_k12", "densenet_bc190_k40", "densenet_bc250_k24"}
    # plain text matches anywhere in the name; wildcards keep their shell meaning
    assert "cifar_densenet" in resdense.list_models("densenet") and "densenet121" in resdense.list_models("densenet")
    assert "cifar_densenet" not in resdense.list_models("densenet*")
    assert resdense.list_models("resnet20") == ["resnet20"] and resdense.list_models("no_such_net") == []
    assert isinstance(resdense.create_model("densenet121"), DenseNet)


# --- the block interface, block settings, and settings a model does not take ------------------

from resdense.models import ResidualBlock  # noqa: E402
from resdense.models.resnet import resnet_imagenet  # noqa: E402

RESIDUAL_FAMILY = [n for n in resdense.list_models() if model_entry(n).family == "resnet"]


@pytest.mark.parametrize("name", RESIDUAL_FAMILY)
def test_every_residual_models_blocks_implement_the_interface(name):
    with torch.device("meta"):  # structure only: no memory, no time
        model = resdense.create_model(name)
    blocks = [b for stage in model.stage_names for b in model.get_submodule(stage)]
    assert blocks and all(isinstance(b, ResidualBlock) for b in blocks)
    # Nothing outside the interface carries the shortcut flag the analyses used to probe for.
    assert {id(m) for m in model.modules() if hasattr(m, "use_shortcut")} == {id(b) for b in blocks}
    assert all(b.preact == ("preact" in name) for b in blocks)


TINY_RESIDUAL = [
    ("cifar_resnet", {"depth": 8}), ("cifar_resnet", {"depth": 8, "shortcut": "B"}),
    ("cifar_resnet", {"depth": 8, "shortcut": "C"}), ("cifar_plain", {"depth": 8}),
    ("cifar_resnet", {"depth": 11, "bottleneck": True}), ("cifar_preact_resnet", {"depth": 8}),
    ("cifar_preact_resnet", {"depth": 11, "bottleneck": True, "shortcut": "A"}),
    ("cifar_resnet", {"depth": 8, "norm_layer": "none"}),
]


def _randomised(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(resdense.create_model(name, **kwargs)).eval()  # running statistics as a trained net has them


def _block_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[ResidualBlock, torch.Tensor]]:
    """Every block with the input it sees in ``model(x)``, in depth order."""
    seen = []

    def keep(block: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        seen.append((block, inp[0].clone()))

    handles = [b.register_forward_pre_hook(keep) for b in model.modules() if isinstance(b, ResidualBlock)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name, kwargs", TINY_RESIDUAL)
def test_block_is_post_of_residual_plus_shortcut(name, kwargs):
    model = _randomised(name, **kwargs)
    with torch.no_grad():
        for block, x in _block_inputs(model, torch.randn(2, 3, 16, 16)):
            added = block.residual(x) + block.shortcut(x) if block.use_shortcut else block.residual(x)
            assert torch.allclose(block(x.clone()), block.post_activation(added), atol=1e-6)


def _old_forward_shortcut(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """The four copies of forward_shortcut the blocks had before the interface, as one reference."""
    if block.preact:
        return x if block.downsample is None else block.downsample(block.relu(block.bn1(x)))
    return block.relu(x if block.downsample is None else block.downsample(x))


def _forward_with(model: nn.Module, x: torch.Tensor, replaced: nn.Module, stand_in) -> torch.Tensor:
    """``model(x)`` with the block ``replaced`` computed by ``stand_in(block, input)`` instead."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in model.stage_names:
        for block in model.get_submodule(stage):
            h = stand_in(block, h) if block is replaced else block(h)
    return model.forward_head(model.final_act(model.final_norm(h)))


def _identity(_block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


@pytest.mark.parametrize("name, kwargs", TINY_RESIDUAL)
def test_lesioning_through_the_interface_equals_the_old_behaviour(name, kwargs):
    from resdense.analysis.lesion import lesioned, residual_blocks

    model = _randomised(name, **kwargs)
    x = torch.randn(2, 3, 16, 16)
    inputs = _block_inputs(model, x)
    names = {id(b): n for n, b in residual_blocks(model)}
    assert [id(b) for b, _ in inputs] == list(names)  # every block, in depth order
    with torch.no_grad():
        for block, inp in inputs:
            assert torch.equal(block.forward_shortcut(inp.clone()), _old_forward_shortcut(block, inp.clone()))
            if not block.use_shortcut and block(inp.clone()).shape != inp.shape:
                continue  # a plain block that reshapes cannot be deleted (lesion_blocks marks it)
            # The old lesion: a residual block by its shortcut path, a plain one by the identity.
            old = _old_forward_shortcut if block.use_shortcut else _identity
            with lesioned(model, [names[id(block)]]):
                got = model(x)
            assert torch.allclose(got, _forward_with(model, x, block, old), atol=1e-6), names[id(block)]


@pytest.mark.parametrize("name, kwargs", TINY_RESIDUAL)
def test_zero_initialised_blocks_are_their_shortcut(name, kwargs):
    torch.manual_seed(0)
    model = resdense.create_model(name, **kwargs, zero_init_last=True).eval()
    with torch.no_grad():
        for block, x in _block_inputs(model, torch.randn(2, 3, 16, 16)):
            if block.use_shortcut:
                assert torch.allclose(block(x.clone()), block.forward_shortcut(x.clone()), atol=1e-6)
            else:  # a plain block is never zeroed: it would pass no signal at all
                conv, norm = block.branch_end()
                assert (conv.weight != 0).any() and (norm is None or (norm.weight != 0).all())


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet110", "resnet50", "cifar_resnet"])
def test_block_settings_pass_through_to_every_block(name):
    torch.manual_seed(0)
    base = resdense.create_model(name)
    torch.manual_seed(0)
    drop = resdense.create_model(name, block_kwargs={"drop_rate": 0.5})
    blocks = [m for m in drop.modules() if isinstance(m, ResidualBlock)]
    assert blocks and all(b.drop_rate == 0.5 for b in blocks)
    assert all(b.drop_rate == 0.0 for b in base.modules() if isinstance(b, ResidualBlock))
    # Functional dropout: the same modules, weights and state_dict; only training differs.
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in drop.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(drop.eval()(x), base.eval()(x))
        drop.train()
        torch.manual_seed(1)
        a = drop(x)
        torch.manual_seed(2)
        assert not torch.equal(a, drop(x))


def test_block_settings_reach_a_bottleneck_alongside_resnet_settings():
    model = resdense.create_model("cifar_resnet", depth=11, bottleneck=True, stride_in_1x1=True,
                                  block_kwargs={"drop_rate": 0.1})
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1) and block.drop_rate == 0.1


@pytest.mark.parametrize("block_kwargs, match", [
    ({"bogus": 3}, "block_kwargs of BasicBlock has no setting 'bogus'; its settings are: drop_rate"),
    ({"stride": 2}, "fixes 'stride'"),
    ({"drop_rate": 1.5}, "drop_rate must be in"),
    ([("drop_rate", 0.1)], "must be a mapping"),
])
def test_bad_block_settings_are_config_errors(block_kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resdense.create_model("resnet20", block_kwargs=block_kwargs)


@pytest.mark.parametrize("name", resdense.list_models())
def test_an_unknown_setting_is_a_config_error_naming_the_accepted_ones(name):
    with pytest.raises(ConfigError) as info:
        resdense.create_model(name, bogus_setting=3)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name} has no setting 'bogus_setting'")
    assert "num_classes" in message and "in_chans" in message


@pytest.mark.parametrize("name, kwargs, match", [
    ("plain20", {"shortcut": "A"}, "plain20 fixes 'shortcut'"),
    ("resnet20", {"depth": 32}, "resnet20 has no setting 'depth'"),
    ("resnet50", {"layers": (1, 1, 1, 1)}, "resnet50 fixes 'layers'"),
    ("densenet40_k12", {"growth_rate": 24}, "densenet40_k12 fixes 'growth_rate'"),
    ("cifar_vgg19_bn", {"head": "imagenet"}, "fixes 'head'"),
])
def test_a_setting_the_spec_fixes_is_a_config_error(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        resdense.create_model(name, **kwargs)


def test_overridable_defaults_stay_overridable():
    assert resdense.create_model("resnet20", num_classes=5).num_classes == 5
    assert resdense.create_model("preact_resnet110", shortcut="A").layer2[0].downsample.__class__ is ZeroPadShortcut
    assert resdense.create_model("densenet121", growth_rate=16).num_features != 1024


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_imagenet_builder_agrees_with_the_explicit_variants(depth):
    with torch.device("meta"):
        for preact, name in ((False, f"resnet{depth}"), (True, f"preact_resnet{depth}")):
            ours, variant = resnet_imagenet(depth, preact=preact), resdense.create_model(name)
            assert {k: v.shape for k, v in ours.state_dict().items()} == \
                {k: v.shape for k, v in variant.state_dict().items()}
            assert type(ours.layer1[0]) is type(variant.layer1[0])
