"""Helpers shared by the study, analysis and rendering tests: running the CLI in this process,
a small test split, and tiny finished studies built once per session (the degradation study,
interrupted and resumed, and one of every other spec)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from resdense.cli import main
from resdense.data.datasets import DatasetSplits, ImageSet
from resdense.train import runner

DEPTHS = (8, 14)
TEST_IMAGES = 400  # the test split is cut to this many images: a study's cost is mostly its final test pass
STUDY_ARGS = ["--data", "fashion-mnist", "--depths", ",".join(map(str, DEPTHS)),
              "--set", "train_subset=256", "--set", "epochs=2", "--set", "batch_size=64", "--set", "eval_batch_size=400",
              "--set", "val_size=400", "--set", "curve_every=2", "--set", "precision=fp32", "--set", "threads=1"]
INTERRUPTED = "plain14-seed0"  # the third run: interrupted after its first epoch, then resumed
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def small_test_split() -> Iterator[None]:
    """Cut every dataset's test split to its first TEST_IMAGES images (training data stays real),
    and give back torch's thread count afterwards (the runs here set threads=1)."""
    original, threads = DatasetSplits.load_test, torch.get_num_threads()

    def first_images(self: DatasetSplits) -> ImageSet:
        test = original(self)
        return ImageSet(test.images[:TEST_IMAGES], test.labels[:TEST_IMAGES])

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DatasetSplits, "load_test", first_images)
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: tiny tensors gain nothing from threads, and on a busy shared
    CPU OpenMP threads waiting on each other make each forward ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``resdense ARGV`` in this process: (exit code, stdout, stderr); argparse's exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def build_tiny_study(base: Path) -> tuple[Path, dict[str, Any]]:
    """Train the tiny two-depth study once per session (both study and analyze tests use it).

    The first ``resdense study degradation`` is interrupted (Ctrl-C) after the first epoch of
    the third run; the second finishes it. What each phase saw is kept in ``observations.json``
    beside the study: exit codes, logs, which runs were trained and how, and the finished runs'
    files as they were before the second phase.
    """
    study, notes_path = base / "study", base / "observations.json"
    if notes_path.is_file():
        return study, json.loads(notes_path.read_text())
    shutil.rmtree(base, ignore_errors=True)  # a half-built study from an earlier failure
    base.mkdir(parents=True)
    argv = ["study", "degradation", *STUDY_ARGS, "--seeds", "0", "--out", str(study)]
    real_train = runner.train
    calls: list[list[Any]] = []

    def interrupting_train(cfg, **kwargs):
        calls.append([Path(cfg.out).name, kwargs.get("resume")])
        if Path(cfg.out).name == INTERRUPTED:
            def stop(ctx, row):
                raise KeyboardInterrupt  # what Ctrl-C raises, between two epochs
            kwargs["epoch_callback"] = stop
        return real_train(cfg, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "train", interrupting_train)
        code1, out1, err1 = run_cli(argv)
    first_calls, calls[:] = list(calls), []
    finished = {name: _fingerprint(study / name / "summary.json") for name in ("plain8-seed0", "resnet8-seed0")}
    interrupted_metrics = (study / INTERRUPTED / "metrics.jsonl").read_text().splitlines()

    def recording_train(cfg, **kwargs):
        calls.append([Path(cfg.out).name, kwargs.get("resume")])
        return real_train(cfg, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "train", recording_train)
        code2, out2, err2 = run_cli(argv)
    notes = {
        "first": {"code": code1, "stdout": out1, "stderr": err1, "calls": first_calls},
        "second": {"code": code2, "stdout": out2, "stderr": err2, "calls": calls},
        "finished_unchanged": {name: _fingerprint(study / name / "summary.json") == fp for name, fp in finished.items()},
        "interrupted_metrics": interrupted_metrics,
    }
    notes_path.write_text(json.dumps(notes))
    return study, notes


# The smoke preset, cut further: one seed, one epoch of 128 images; depth 8 where there is a choice.
TINY = ["--data", "fashion-mnist", "--preset", "smoke", "--seeds", "0", "--set", "train_subset=128",
        "--set", "epochs=1", "--set", "precision=fp32", "--set", "threads=1"]
SPEC_ARGS = {"efficiency": [], "shortcuts": ["--depth", "8"], "remedies": ["--depth", "8"]}


def build_tiny_studies(base: Path) -> Path:
    """One tiny finished study of every spec in ``base/NAME`` (degradation's is the one of
    build_tiny_study), built once per session."""
    if (base / "done").is_file():
        return base
    base.mkdir(parents=True, exist_ok=True)
    degradation, _ = build_tiny_study(base.parent / "tiny-degradation-study")
    if not (base / "degradation").exists():
        (base / "degradation").symlink_to(degradation)
    for name, extra in SPEC_ARGS.items():
        code, out, err = run_cli(["study", name, *TINY, *extra, "--out", str(base / name)])
        assert code == 0, err
    (base / "done").write_text("")
    return base


def randomise_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every BN non-trivial running statistics and affine parameters, as a trained net has,
    so eval-mode outputs differ from layer to layer and deletions change predictions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
