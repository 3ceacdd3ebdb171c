"""The training-throughput and data-pipeline benchmarks in quick mode, and the usual-way data
path they compare against. No timing is asserted: quick-mode numbers mean nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resdense.bench import BENCHMARKS, BenchOptions, pipeline, training
from resdense.data import Augment, TensorLoader
from resdense.hardware import resolve_precision

QUICK = dict(quick=True, threads=1, verbose=False)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_registered_in_order():
    from resdense.bench import ALL

    names = list(ALL)  # what `resdense bench all` runs, in order
    assert names[-2:] == ["pipeline", "training"] and {"peak", "memory", "inference", "scaling"} <= set(names)
    # the long time-to-accuracy run is registered, but runs by name only
    assert "time-to-accuracy" in BENCHMARKS and "time-to-accuracy" not in names
    assert BENCHMARKS["pipeline"] is pipeline.run and BENCHMARKS["training"] is training.run


def test_cli_bench_pipeline_quick(tmp_path, capsys):
    from resdense import cli

    assert cli.main(["bench", "pipeline", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "usual, 2 workers" in out and "random uint8" in out
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    assert doc["benchmark"] == "pipeline" and doc["quick"] is True and doc["goal"]["vs_best_usual"] == 20
    rows = doc["rows"]
    by_data: dict[str, list] = {}
    for r in rows:
        by_data.setdefault(r["data"], []).append(r)
    assert "random 3x32x32" in by_data and {n["data"] for n in doc["data"]} >= set(by_data)
    for group in by_data.values():
        assert [r["pipeline"] for r in group] == ["resdense", "usual, 0 workers", "usual, 2 workers"]
        assert [r["workers"] for r in group] == [0, 0, 2]
        for r in group:
            assert _positive(r["batches_per_s"]) and r["batch"] == 128
            assert r["images_per_s"] == pytest.approx(128 * r["batches_per_s"])
            assert len(r["batch_times_s"]) == 2 and all(_positive(t) for t in r["batch_times_s"])
        fast, usual0, usual2 = group
        assert usual0["resdense_speedup"] == pytest.approx(fast["batches_per_s"] / usual0["batches_per_s"])
        best = max(usual0["batches_per_s"], usual2["batches_per_s"])
        assert fast["vs_best_usual"] == pytest.approx(fast["batches_per_s"] / best)
        assert fast["goal_met"] == (fast["vs_best_usual"] >= 20)
    assert by_data["random 3x32x32"][0]["shape"] == "3x32x32"
    if "fashion-mnist" in by_data:
        assert by_data["fashion-mnist"][0]["shape"] == "1x28x28"


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_training_quick_rows_and_profile(tmp_path, precision):
    rows = training.run(BenchOptions(out_dir=tmp_path, precision=precision, **QUICK))
    assert [r["column"] for r in rows] == ["usual", "resdense", "resdense+compile"]
    usual, fast, compiled = rows
    assert compiled["skipped"] == "pass --compile" and "images_per_s" not in compiled
    assert usual["memory_format"] == "nchw" and usual["precision"] == "fp32"
    assert fast["memory_format"] == "channels_last"
    expected = resolve_precision(precision, torch.device("cpu"))
    assert fast["precision"] == ("fp32" if expected is None else str(expected).removeprefix("torch."))
    for r in (usual, fast):
        assert r["case"] == "cifar_resnet(depth=8)" and r["batch"] == 16 and r["timed_steps"] == 1
        assert _positive(r["images_per_s"]) and _positive(r["step_s"]) and _positive(r["first_step_s"])
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["speedup_vs_usual"] == pytest.approx(r["images_per_s"] / usual["images_per_s"])
        assert r["share_of_peak"] > 0 and r["achieved_gflops"] == pytest.approx(r["share_of_peak"] * r["peak_gflops"])
    doc = json.loads((tmp_path / "training.json").read_text())
    assert doc["benchmark"] == "training" and doc["rows"] == json.loads(json.dumps(rows))
    prof = doc["profile"]
    assert prof["case"] == "cifar_resnet(depth=8)" and prof["column"] == "resdense"
    top = prof["top"]
    assert 0 < len(top) <= 12
    assert set(top[0]) == {"op", "calls", "self_cpu_ms", "self_cpu_pct", "cpu_total_ms"}
    assert all(_positive(e["self_cpu_ms"]) and e["calls"] >= 1 for e in top)
    assert [e["self_cpu_ms"] for e in top] == sorted((e["self_cpu_ms"] for e in top), reverse=True)
    assert 0 < sum(e["self_cpu_pct"] for e in top) <= 100 + 1e-6
    assert any("conv" in e["op"] for e in top)  # a conv net's step is mostly convolutions


def test_compile_column_uses_torch_compile_and_survives_failure(monkeypatch):
    case = training.TrainCase("cifar_resnet", {"depth": 8}, (3, 16, 16), batch=4, warmup=1, windows=1, per_window=1)
    compiled = []

    def fake_compile(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row, prof = training.measure(case, "resdense+compile", torch.device("cpu"))
        assert len(compiled) == 1 and prof is None
        assert row["compile_s"] >= 0 and _positive(row["images_per_s"])

        def broken_compile(model, **kwargs):
            raise RuntimeError("no C++ compiler\nmore")

        monkeypatch.setattr(torch, "compile", broken_compile)
        rows, _ = training._measure_case(case, BenchOptions(compile=True, **QUICK), torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert [r["column"] for r in rows] == list(training.COLUMNS_RUN)
    assert rows[2]["error"] == "RuntimeError: no C++ compiler" and _positive(rows[1]["images_per_s"])


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 28, 28)])
def test_usual_dataset_matches_resdense_loader(shape):
    images, labels = pipeline.random_images(24, shape, seed=3)
    mean, std = _stats(images)
    # Without augmentation both paths must give the very same normalised tensors.
    plain = pipeline.UsualDataset(images, labels, mean, std, augment=None)
    x0, y0 = plain[5]
    assert x0.dtype == torch.float32 and x0.shape == shape and isinstance(y0, int) and y0 == int(labels[5])
    loader = TensorLoader(images, labels, 24, mean=mean, std=std, channels_last=False)
    xb, yb = next(iter(loader))
    ours = torch.stack([plain[i][0] for i in range(24)])
    torch.testing.assert_close(ours, xb, rtol=0, atol=1e-5)
    assert torch.equal(yb, labels)
    # With augmentation: same shapes and dtypes, values within the normalised range of [0, 1].
    usual = next(iter(pipeline.usual_loader(images, labels, mean, std, batch_size=8)))
    fast = next(iter(TensorLoader(images, labels, 8, shuffle=True, augment=Augment(), mean=mean, std=std)))
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    for x, y in (usual, fast):
        assert x.shape == (8, *shape) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert (x >= (0 - m) / s - 1e-5).all() and (x <= (1 - m) / s + 1e-5).all()
    assert usual[0].is_contiguous() and fast[0].is_contiguous(memory_format=torch.channels_last)


def test_pad_crop_on_hand_made_image():
    img = Image.fromarray(np.arange(1, 10, dtype=np.uint8).reshape(3, 3))  # [[1 2 3] [4 5 6] [7 8 9]]
    def crop(top: int, left: int) -> list[list[int]]:
        return np.asarray(pipeline.pad_crop(img, 1, top, left)).tolist()

    assert crop(1, 1) == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert crop(0, 0) == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]  # zero padding enters at the top left
    assert crop(2, 2) == [[5, 6, 0], [8, 9, 0], [0, 0, 0]]
    assert crop(0, 2) == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    # An RGB image: every offset matches zero-padding the CHW tensor and slicing it.
    rgb = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(rgb, (2, 2, 2, 2))
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    for top in range(5):
        for left in range(5):
            out = pipeline.to_tensor(pipeline.pad_crop(pil, 2, top, left))
            assert torch.equal((out * 255).round().to(torch.uint8), padded[:, top:top + 5, left:left + 6])


def test_usual_flip_mirrors_and_augment_support_matches_resdense():
    img = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)
    labels = torch.zeros(1, dtype=torch.int64)
    flip_only = pipeline.UsualDataset(img, labels, (0.0,), (1 / 255,), augment=Augment(pad=0, flip=1.0))
    assert flip_only[0][0].round().to(torch.uint8).tolist() == [[[3, 2, 1], [6, 5, 4], [9, 8, 7]]]
    never = pipeline.UsualDataset(img, labels, (0.0,), (1 / 255,), augment=Augment(pad=0, flip=0.0))
    assert never[0][0].round().to(torch.uint8).tolist() == [[[1, 2, 3], [4, 5, 6], [7, 8, 9]]]
    # pad 1 + flip: 9 crops x 2 flips = 18 distinct images; both ways must draw exactly those.
    torch.manual_seed(0)
    aug = Augment(pad=1, flip=0.5)
    usual = pipeline.UsualDataset(img, labels, (0.0,), (1 / 255,), augment=aug)
    seen_usual = {tuple(usual[0][0].round().to(torch.uint8).flatten().tolist()) for _ in range(400)}
    batch = aug.apply(img.expand(400, 1, 3, 3), torch.Generator().manual_seed(0))
    seen_fast = {tuple(x.flatten().tolist()) for x in batch}
    padded = F.pad(img[0, 0], (1, 1, 1, 1))
    expected = {tuple(c.flatten().tolist()) for t in range(3) for l in range(3)
                for c in (padded[t:t + 3, l:l + 3], padded[t:t + 3, l:l + 3].flip(1))}
    assert len(expected) == 18 and seen_usual == expected and seen_fast == expected


def test_endless_crosses_epochs_and_sets_them():
    images, labels = pipeline.random_images(8, (1, 4, 4))
    loader = TensorLoader(images, labels, 4, shuffle=True)
    batches = pipeline.endless(loader)
    firsts = [next(batches)[1] for _ in range(5)]
    assert loader.epoch == 2 and all(len(y) == 4 for y in firsts)
    assert sorted(torch.cat(firsts[:2]).tolist()) == sorted(labels.tolist())
