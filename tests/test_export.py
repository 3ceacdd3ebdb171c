"""BN folding, the inference path, and ONNX / TorchScript / safetensors export round-trips."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

import resdense
from resdense.errors import CheckpointError, ConfigError, UserError
from resdense.export import (EXPORT_FORMATS, bf16_supported, export_model, find_conv_bn_pairs, fold_bn,
                             inference_model)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine weights (a fresh BN is the identity, which would let
    a wrong fold pass). Mild enough that deep nets keep O(1) outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                n = m.num_features

                def u() -> torch.Tensor:
                    return torch.rand(n, generator=g) * 0.6 - 0.3

                m.running_mean.copy_(u())
                m.running_var.copy_(1 + u())
                m.weight.copy_(1 + u())
                m.bias.copy_(u())
    return model


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


# (name, builder kwargs, input size, BNs that must be folded: None = all of them)
FOLD_CASES = [
    ("resnet20", {}, 32, None),
    ("resnet50", {}, 32, None),
    ("plain20", {}, 32, None),
    ("cifar_vgg19_bn", {}, 32, None),
    # Pre-activation: only bn2 (after conv1, inside each of the 3 blocks) can be folded.
    ("cifar_preact_resnet", {"depth": 8}, 32, 3),
    # DenseNet-BC with one layer per block: only norm2 (after the 1x1 bottleneck conv) of each layer.
    ("cifar_densenet", {"depth": 10, "bc": True}, 32, 3),
]


@pytest.mark.parametrize("name, kwargs, size, expect_folded", FOLD_CASES, ids=[c[0] for c in FOLD_CASES])
def test_fold_bn_is_exact(name, kwargs, size, expect_folded):
    torch.manual_seed(0)
    model = randomize_bn(resdense.create_model(name, **kwargs)).train()
    n_bn = count_bn(model)
    folded = fold_bn(model)
    assert model.training and count_bn(model) == n_bn  # the original is untouched
    assert not folded.training
    want = n_bn if expect_folded is None else expect_folded
    assert len(folded.folded_bn) == want
    assert count_bn(folded) == n_bn - want
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model.eval()(x)
        out = folded(x)
    assert ref.abs().max() > 1e-2  # a dead output would make any fold look exact
    assert (out - ref).abs().max().item() <= 1e-4


def test_preact_block_input_bn_is_left_alone():
    model = resdense.create_model("cifar_preact_resnet", depth=8)
    pairs = dict((bn, conv) for conv, bn in find_conv_bn_pairs(model))
    # bn1 of a block reads the block input (shared with the shortcut): never foldable.
    assert "layer1.0.bn1" not in pairs and "final_norm" not in pairs
    assert pairs["layer1.0.bn2"] == "layer1.0.conv1"


class _SharedConvOutput(nn.Module):
    """conv -> bn, but the conv output also feeds a second branch: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, groups=2, bias=True)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        y = self.bn(c) + c
        y = self.bn2(self.conv2(y))  # foldable: grouped conv with a bias
        return self.bn3(self.conv3(y))  # not foldable: uses batch statistics even in eval


def test_fold_bn_only_folds_what_is_exact():
    model = randomize_bn(_SharedConvOutput()).eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(model, x)
    assert folded.folded_bn == [("conv2", "bn2")]
    assert isinstance(folded.bn2, nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-5


def test_inference_model_matches_and_leaves_original():
    model = randomize_bn(resdense.create_model("resnet20")).eval()
    fast = inference_model(model, dtype=torch.float32)
    x = torch.randn(3, 3, 32, 32)
    out = fast(x)
    assert out.dtype == torch.float32 and not out.requires_grad
    with torch.no_grad():
        assert (out - model(x)).abs().max().item() <= 1e-4
    assert count_bn(model) == 19 and count_bn(fast) == 0
    assert fast.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.autocast_dtype is None
    with pytest.raises(ConfigError, match="dtype"):
        inference_model(model, fold=False, dtype=torch.int8)


def test_bf16_detection_follows_cpu_flags(monkeypatch):
    import resdense.hardware as hw

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert hw.isa_cap() is None
    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert not bf16_supported("cpu")
    assert hw.resolve_precision("auto", torch.device("cpu")) is None  # fp32 where bf16 is emulated
    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert bf16_supported("cpu")
    assert hw.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    # With bf16 hardware, the default path autocasts (checked without running the model).
    assert inference_model(nn.Sequential(nn.Conv2d(3, 2, 1)), fold=False).autocast_dtype == torch.bfloat16


@pytest.mark.parametrize("var, value, native", [
    ("ONEDNN_MAX_CPU_ISA", "AVX2", False), ("ONEDNN_MAX_CPU_ISA", "avx512_core", False),
    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True), ("ONEDNN_MAX_CPU_ISA", "ALL", True),
    ("ATEN_CPU_CAPABILITY", "avx2", False), ("ATEN_CPU_CAPABILITY", "avx512", True),
])
def test_bf16_detection_follows_an_isa_cap(monkeypatch, var, value, native):
    """A CPU with AVX512-BF16 capped below it (one machine standing in for an older one) runs bf16
    emulated, so auto picks fp32 there; the cap is what benchmarks record."""
    import resdense.hardware as hw

    monkeypatch.setattr(hw, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv(var, value)
    assert bf16_supported("cpu") is native
    assert hw.resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert hw.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16  # forcing still forces
    assert hw.isa_cap() == f"{var}={value}"


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return randomize_bn(resdense.create_model("cifar_resnet", depth=8)).eval()


def _files(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_round_trip(tmp_path, small_model, fmt, fold):
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / f"m.{fmt}"
    result = export_model(small_model, path, fmt, example_input=x, fold_bn=fold)
    assert _files(tmp_path) == [path.name]  # no temporary file left behind
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-3
    assert result.bytes == path.stat().st_size > 0
    assert (result.folded_bn > 0) == fold

    x5 = torch.randn(5, 3, 32, 32)  # another batch size: the ONNX batch axis is dynamic
    with torch.no_grad():
        ref = small_model(x5)
    if fmt == "onnx":
        import onnxruntime as ort

        out = torch.from_numpy(ort.InferenceSession(str(path)).run(["logits"], {"input": x5.numpy()})[0])
    elif fmt == "torchscript":
        out = torch.jit.load(str(path))(x5)
    else:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["resdense"])
        assert meta["model"] == "cifar_resnet" and meta["folded_bn"] is fold
        target = fold_bn(small_model) if fold else resdense.create_model("cifar_resnet", depth=8).eval()
        target.load_state_dict(load_file(str(path)), strict=True)
        with torch.no_grad():
            out = target(x5)
    assert (out - ref).abs().max().item() <= 1e-4


def test_failed_check_publishes_nothing(tmp_path, small_model, monkeypatch):
    import resdense.export as ex

    monkeypatch.setattr(ex, "EXPORT_TOLERANCE", -1.0)  # every check fails
    path = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError, match="was not written"):
        export_model(small_model, path, "safetensors", example_input=torch.randn(1, 3, 32, 32))
    assert _files(tmp_path) == []


def test_unknown_format_and_missing_onnxruntime(tmp_path, small_model, monkeypatch):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="onnx, torchscript, safetensors"):
        export_model(small_model, tmp_path / "m.tflite", "tflite", example_input=x)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(UserError, match=r"pip install 'resdense\[onnx\]'"):
        export_model(small_model, tmp_path / "m.onnx", "onnx", example_input=x)
    assert _files(tmp_path) == []


def run_cli(argv: list[str]) -> int:
    """`resdense ARGV` in this process; returns the exit code."""
    from resdense.cli import main

    return main(argv)


def test_cli_export_model(tmp_path, capsys):
    out = tmp_path / "net.onnx"
    assert run_cli(["export", "--model", "cifar_resnet", "-a", "depth=8", "--input", "1x28x28",
                    "--format", "onnx", "--fold-bn", "--out", str(out)]) == 0
    assert "BN folded" in capsys.readouterr().out and out.exists()
    import onnx

    graph = onnx.load(str(out))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    # Batch, height and width are free (the net pools adaptively to 1x1); the channels are not.
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    props = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert props == {"model": "cifar_resnet", "input_size": [1, 28, 28], "classes": [str(i) for i in range(10)],
                     "mean": [0.0], "std": [1.0]}


def test_cli_export_user_errors(tmp_path, capsys):
    assert run_cli(["export", "--model", "resnt20", "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert run_cli(["export", "--model", "resnet20", "-a", "bogus=1", "--format", "safetensors",
                    "--out", str(tmp_path / "x.st")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_an_exported_onnx_file_predicts_as_its_run(tmp_path, small_model, capsys, one_thread):
    """export -> predict on the .onnx equals predict on the run; the file carries what predict needs,
    takes other image sizes, and the exported safetensors loads back with resdense.load."""
    import numpy as np
    import onnx
    from PIL import Image

    from resdense.export import onnx_session

    weights, run, onnx_file, st_file = (tmp_path / n for n in ("w.pth", "run", "m.onnx", "m.safetensors"))
    torch.save(small_model.state_dict(), weights)
    classes = [f"kind{i}" for i in range(10)]
    assert run_cli(["import", str(weights), "--model", "cifar_resnet", "-a", "depth=8", "--out", str(run),
                    "--classes", ",".join(classes), "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3",
                    "--input-size", "16"]) == 0
    assert run_cli(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(onnx_file)]) == 0
    assert run_cli(["export", "--checkpoint", str(run), "--format", "safetensors", "--fold-bn", "--out", str(st_file)]) == 0
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_file)).metadata_props}
    assert props == {"model": "cifar_resnet", "classes": classes, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                     "input_size": [3, 16, 16]}

    image = tmp_path / "query.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    tops = []
    for source in (run, onnx_file, st_file):
        assert run_cli(["predict", "--checkpoint", str(source), "--json", "--top-k", "10", str(image)]) == 0
        tops.append({p["class"]: p["probability"] for p in json.loads(capsys.readouterr().out)[0]["top"]})
    # predict on a run folds BN and runs bf16 where the CPU has it natively; ONNX runs fp32.
    tolerance = 1e-2 if bf16_supported("cpu") else 1e-5
    assert set(tops[0]) == set(classes) and tops[1] == pytest.approx(tops[0], abs=tolerance)
    assert tops[2] == pytest.approx(tops[0], abs=tolerance)  # the exported safetensors predicts as well

    x = torch.randn(1, 3, 20, 12)  # height and width are free in the file
    with torch.no_grad():
        expected = small_model(x)
    got = onnx_session(onnx_file).run(["logits"], {"input": x.numpy()})[0]
    assert (torch.from_numpy(got) - expected).abs().max().item() <= 1e-4

    exported, original = resdense.load(st_file), resdense.load(run)
    assert exported.classes == classes and exported.input_size == (3, 16, 16)
    probs = [[p for _, p in m.predict(image, top_k=10)[0]] for m in (exported, original)]
    assert probs[0] == pytest.approx(probs[1], abs=1e-5)
    with pytest.raises(CheckpointError, match="ONNX file"):
        resdense.load(onnx_file)
    with pytest.raises(CheckpointError, match="batch norm folded"):
        resdense.create_model("cifar_resnet", pretrained=st_file)
