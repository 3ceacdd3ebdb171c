"""Fused multi-seed training equals separate runs.

The K copies are compared with K separate runs of the same settings: every weight and batch-norm
statistic, the momentum buffers, the metrics rows, the training curve and the summary.
Training these tiny nets is chaotic at the start: two separate fp32 runs that differ only in
their memory format (channels-last or not) were measured 0.028 apart in some weight after 24
steps at lr 0.02 (see the README), as far as fused and separate are. So the long comparisons
run in float64 (where the copies stay within 1e-8 of their separate runs: a wrong data order, momentum or BN statistic is off by far more), and one short fp32 comparison holds
the fp32 path to fp32 tolerance while rounding has not yet grown.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from resdense.train import checkpoint as ckpt
from resdense.train.config import TrainConfig, apply_overrides
from resdense.train.fused import fuse_key, fuse_refusal, train_fused
from resdense.train.runner import train

SEEDS = (0, 1, 2)
TIMING = {"images_per_s", "epoch_time", "wall_time"}

# Each family with settings that exercise another corner of the fused step.
FAMILIES = {
    "resnet-A": ("cifar_resnet", {"depth": 8}, {"grad_clip": 0.5, "nesterov": True}),
    "resnet-B": ("cifar_resnet", {"depth": 8, "shortcut": "B"},
                 {"warmup_lr": 0.01, "warmup_until_error": 0.85, "label_smoothing": 0.1}),
    "plain": ("cifar_plain", {"depth": 8}, {"decay_norm_and_bias": False, "curve_every": 3}),
    "densenet-bc": ("cifar_densenet", {"depth": 10, "growth_rate": 4, "bc": True}, {"channels_last": False}),
}


def _cfg(out: Path, seed: int, model: str, kwargs: dict, extra: dict) -> TrainConfig:
    values = dict(model=model, model_kwargs=kwargs, data="synthetic", epochs=2, batch_size=16, train_subset=96,
                  val_size=32, eval_batch_size=128, test_subset=32, lr=0.05, eval_train=True, progress=False,
                  precision="fp32", threads=1, seed=seed, tensorboard=False, curve_every=4, out=str(out))
    return apply_overrides(TrainConfig(), {**values, **extra}, "test")


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture(scope="module")
def plain_alone(tmp_path_factory) -> Path:
    """The plain family's separate runs of every seed in float64, trained once for the tests that compare with them."""
    base = tmp_path_factory.mktemp("plain-alone")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, kwargs, extra = FAMILIES["plain"]
        for s in SEEDS:
            _quiet(train, _cfg(base / f"alone{s}", s, model, kwargs, extra))
    finally:
        torch.set_default_dtype(before)
    return base


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def _close(a, b, rtol: float, atol: float, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], rtol, atol, f"{what}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, rtol, atol, f"{what}[{i}]")
    elif isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
        assert a == pytest.approx(b, rel=rtol, abs=atol), what
    elif not isinstance(a, float):
        assert a == b, what


def assert_same_run(alone: Path, fused: Path, rtol: float, atol: float) -> None:
    """Two run folders hold the same run: weights and BN statistics, momentum, RNG, metrics, curve, summary."""
    a, b = ckpt.read_weights((alone / "last").resolve()), ckpt.read_weights((fused / "last").resolve())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    sa, sb = (ckpt.read_state((d / "last").resolve()) for d in (alone, fused))
    for key, state in sa["optimizer"]["state"].items():
        torch.testing.assert_close(sb["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=rtol, atol=atol)
    assert [g["lr"] for g in sb["optimizer"]["param_groups"]] == [g["lr"] for g in sa["optimizer"]["param_groups"]]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])  # the global RNG as its separate run left it
    assert (sa["step"], sa["epoch"], sa["warmup_done"]) == (sb["step"], sb["epoch"], sb["warmup_done"])
    _close(_rows(alone / "metrics.jsonl"), _rows(fused / "metrics.jsonl"), rtol, atol, "metrics")
    _close(_rows(alone / "curve.jsonl"), _rows(fused / "curve.jsonl"), rtol, atol, "curve")
    sum_a, sum_b = (json.loads((d / "summary.json").read_text()) for d in (alone, fused))
    for d in (sum_a, sum_b):
        for key in ("wall_time", "images_per_s", "config", "finished"):  # when and how fast: the machine's, not the run's
            d.pop(key)
    _close(sum_a, sum_b, rtol, atol, "summary")


def _both(tmp_path: Path, model: str, kwargs: dict, extra: dict, seeds=SEEDS, alone=SEEDS) -> None:
    """Train seeds ``alone`` one by one (into tmp_path/alone<seed>) and ``seeds`` fused (tmp_path/fused<seed>)."""
    for s in alone:
        _quiet(train, _cfg(tmp_path / f"alone{s}", s, model, kwargs, extra))
    summaries = _quiet(train_fused, [_cfg(tmp_path / f"fused{s}", s, model, kwargs, extra) for s in seeds])
    assert [r["seed"] for r in summaries] == list(seeds)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_copies_equal_separate_runs_in_float64(family, tmp_path, float64, plain_alone):
    model, kwargs, extra = FAMILIES[family]
    plain = family == "plain"
    _both(tmp_path, model, kwargs, extra, alone=() if plain else SEEDS)
    for s in SEEDS:
        assert_same_run((plain_alone if plain else tmp_path) / f"alone{s}", tmp_path / f"fused{s}", rtol=1e-6, atol=1e-8)
    if "warmup_lr" in extra:  # some copies left the warm-up, some did not: the copies stepped at their own lr
        first = [json.loads((tmp_path / f"fused{s}" / "curve.jsonl").read_text().splitlines()[0]) for s in SEEDS]
        assert len({p["lr"] for p in first}) > 1


def test_fused_copies_equal_separate_runs_in_fp32_while_rounding_is_small(tmp_path):
    model, kwargs, extra = FAMILIES["plain"]
    _both(tmp_path, model, kwargs, {**extra, "epochs": None, "iterations": 2})
    for s in SEEDS:
        assert_same_run(tmp_path / f"alone{s}", tmp_path / f"fused{s}", rtol=1e-5, atol=1e-5)


def test_a_diverging_copy_ends_as_its_separate_run_while_the_others_go_on(tmp_path, float64, monkeypatch, plain_alone):
    from resdense.data.loader import TensorLoader

    iterate = TensorLoader.__iter__

    def poisoned(self):  # seed 1's training batch 3 of epoch 2 is NaN: its loss is not finite there
        for i, (x, y) in enumerate(iterate(self)):
            yield (x * math.nan if (self.shuffle, self.seed, self.epoch, i) == (True, 1, 1, 2) else x), y

    monkeypatch.setattr(TensorLoader, "__iter__", poisoned)
    model, kwargs, extra = FAMILIES["plain"]
    _both(tmp_path, model, kwargs, {**extra, "on_divergence": "finish"}, alone=(1,))  # 0 and 2: as plain_alone's
    summaries = [json.loads((tmp_path / f"fused{s}" / "summary.json").read_text()) for s in SEEDS]
    assert [s.get("diverged", "")[:29] for s in summaries] == ["", "the loss became nan at step 8", ""]
    assert [s["steps"] for s in summaries] == [12, 8, 12]
    for s in SEEDS:
        assert_same_run((tmp_path if s == 1 else plain_alone) / f"alone{s}", tmp_path / f"fused{s}", rtol=1e-6, atol=1e-8)


def test_fused_runs_stopped_inside_an_epoch_resume_as_separate_runs(tmp_path, float64, monkeypatch, plain_alone):
    from resdense.train.stop import StopFlag, TrainingStopped

    model, kwargs, extra = FAMILIES["plain"]
    seeds = (0, 1)
    calls = {"n": 0}

    def signal_at_the_tenth_step(self):
        calls["n"] += 1
        if calls["n"] >= 10:
            self.signum = self._agreed = 15
        return calls["n"] >= 10

    with monkeypatch.context() as mp:
        mp.setattr(StopFlag, "requested", signal_at_the_tenth_step)
        with pytest.raises(TrainingStopped, match="2 fused runs"):
            _quiet(train_fused, [_cfg(tmp_path / f"fused{s}", s, model, kwargs, extra) for s in seeds])
    for s in seeds:  # resumed one by one, without fusing: the checkpoints are ordinary ones
        assert (tmp_path / f"fused{s}" / "last").resolve().name == "step-0000009"  # inside epoch 2 (6 steps each)
        _quiet(train, _cfg(tmp_path / f"fused{s}", s, model, kwargs, extra), resume=True)
        assert_same_run(plain_alone / f"alone{s}", tmp_path / f"fused{s}", rtol=1e-6, atol=1e-8)


def test_fuse_key_and_refusals():
    base = _cfg(Path("x"), 0, "cifar_resnet", {"depth": 8}, {})
    assert fuse_key(base) == fuse_key(apply_overrides(base, {"seed": 3, "out": "y"}, "t"))
    assert fuse_key(base) != fuse_key(apply_overrides(base, {"lr": 0.2}, "t"))
    assert fuse_refusal(base) is None
    assert "dropout" in fuse_refusal(apply_overrides(base, {"model": "cifar_densenet", "model_kwargs": {"depth": 10},
                                                           "drop_rate": 0.2}, "t"))
    assert "compile" in fuse_refusal(apply_overrides(base, {"compile": True}, "t"))


def test_a_smoke_study_gives_the_same_table_fused_and_unfused(tmp_path):
    from conftest import run_cli

    args = ["study", "degradation", "--data", "synthetic", "--preset", "smoke", "--seeds", "0,1", "--depths", "8,14",
            "--set", "precision=fp32", "--set", "threads=1"]
    code, fused_out, err = run_cli([*args, "--fuse-seeds", "--out", str(tmp_path / "fused")])
    assert code == 0, err
    assert "seeds fused" in fused_out and "fused (pid" in fused_out and "gains little" in fused_out
    code, alone_out, err = run_cli([*args, "--no-fuse-seeds", "--out", str(tmp_path / "alone")])
    assert code == 0, err
    assert "fused" not in alone_out

    def table(out: str) -> list[str]:
        return [line for line in out.splitlines() if line.startswith(("group ", "plain-", "resnet-"))]

    assert table(fused_out) == table(alone_out) and len(table(alone_out)) == 5
    rows = {}
    for kind in ("fused", "alone"):
        rows[kind] = sorted((json.loads(line) for line in (tmp_path / kind / "results.jsonl").read_text().splitlines()),
                            key=lambda r: (r["group"], r["seed"]))
    for a, b in zip(rows["alone"], rows["fused"]):
        for key in ("train_error", "val_error", "test_error"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), (a["group"], key)


# --- graph-captured steps: refused off CUDA; the static shapes they would capture ----------------------

def test_cuda_graphs_on_a_cpu_is_refused_in_one_line_before_anything_is_written(tmp_path):
    from conftest import run_cli

    code, out, err = run_cli(["train", "--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "1",
                              "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path / "run")])
    assert code == 2 and err.count("\n") == 1 and "--cuda-graphs" in err and "CUDA device" in err
    assert not (tmp_path / "run").exists()


def test_static_shapes_one_graph_per_image_size_of_full_batches():
    from resdense.errors import ConfigError
    from resdense.train.graphs import describe, static_shapes

    cfg = apply_overrides(TrainConfig(), {"batch_size": 128, "min_scale": 0.5, "resize_ramp": 0.5, "resize_step": 4,
                                          "cuda_graphs": True}, "t")
    shapes = static_shapes(cfg, (32, 32), 3, total_epochs=10, min_scale=0.5)
    assert shapes[0] == (128, 3, 16, 16) and shapes[-1] == (128, 3, 32, 32)
    assert len(shapes) == len(set(shapes)) and all(s[0] == 128 for s in shapes)
    assert describe(shapes).startswith("CUDA graphs: one per image size, batch 128: 16x16, ")
    assert static_shapes(apply_overrides(cfg, {"min_scale": 1.0}, "t"), (28, 28), 1, 10, 1.0) == [(128, 1, 28, 28)]
    with pytest.raises(ConfigError, match="graphs"):  # 2-pixel steps from 4 to 32 pixels: too many graphs
        static_shapes(apply_overrides(cfg, {"resize_step": 2, "resize_ramp": 1.0}, "t"), (32, 32), 3, 30, 0.125)


def test_the_gpu_check_script_dry_run_checks_its_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "out"), "--preset", "no-such", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "preset 'no-such' does not exist" in out and "using 'quick' instead" in out
    for net in script.NETS:
        assert f"{net:9} fused         input 3x128x3x32x32" in out
    assert "cpu step of resnet20 fused: ok" in out and "plan problem" not in out
    assert not (tmp_path / "out").exists()
    # The time arithmetic is checked: a limit too short for the measurements and the study is a problem.
    plan = script.make_plan(script.argparse.Namespace(preset="quick", data="synthetic", limit=300, batch=128, size=32,
                                                      steps=50))
    assert any("more than the" in p for p in script.check_plan(plan))
