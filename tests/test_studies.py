"""The degradation study end to end (a small real Fashion-MNIST subset), its resume after an
interruption, ``resdense report`` from result files alone, the verdict, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from resdense.cli import main
from resdense.data.datasets import DatasetSplits, ImageSet
from resdense.studies.degradation import StudyConfig, final_table, run_config, verdict
from resdense.train import runner

DEPTHS = (8, 14)
TEST_IMAGES = 400  # the test split is cut to this many images: a study's cost is mostly its final test pass
STUDY_ARGS = ["--data", "fashion-mnist", "--depths", ",".join(map(str, DEPTHS)),
              "--set", "train_subset=256", "--set", "epochs=2", "--set", "batch_size=64", "--set", "eval_batch_size=400",
              "--set", "val_size=400", "--set", "curve_every=2", "--set", "precision=fp32", "--set", "threads=1"]
INTERRUPTED = "plain14-seed0"  # the third run: interrupted after its first epoch, then resumed
ROW_KEYS = {"run", "kind", "depth", "seed", "final_train_error", "final_val_error", "test_error", "test_error_best",
            "wall_time", "curve", "epochs", "config"}
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
    argv = ["study", "degradation", *STUDY_ARGS, "--out", str(study)]
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


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Iterator[tuple[Path, dict[str, Any]]]:
    with small_test_split():
        yield build_tiny_study(tmp_path_factory.getbasetemp() / "tiny-degradation-study")


# --- the study end to end ---------------------------------------------------------------------

def test_study_writes_rows_report_and_figures(tiny_study):
    study, notes = tiny_study
    assert notes["second"]["code"] == 0, notes["second"]["stderr"]
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert {(r["kind"], r["depth"]) for r in rows} == {(k, d) for k in ("plain", "resnet") for d in DEPTHS}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["seed"] == 0 and len(r["epochs"]) == 2 and r["curve"]
        for key in ("final_train_error", "final_val_error", "test_error", "test_error_best"):
            assert 0.0 <= r[key] <= 1.0
        assert r["config"]["train_subset"] == 256 and r["config"]["val_size"] == 400
    # Twins differ only in the model: same recipe, data, seed and order.
    by = {(r["kind"], r["depth"]): r["config"] for r in rows}
    for depth in DEPTHS:
        plain, res = dict(by[("plain", depth)]), dict(by[("resnet", depth)])
        assert res["model_kwargs"].pop("shortcut") == "A"
        assert plain["model_kwargs"] == res["model_kwargs"]
        for cfg in (plain, res):
            for key in ("model", "model_kwargs", "out"):
                cfg.pop(key)
        assert plain == res

    page = (study / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # self-contained: both figures embedded
    assert "<img src='curves.png'" not in page
    judged = json.loads((study / "table.json").read_text())["verdict"]
    assert ("NOT reproduced" in page) == (judged["reproduced"] is False) and "reproduced" in page
    assert "shortcuts" in page
    # The verdict follows from the rows: the deep plain net vs the shallow one.
    train_err = {(r["kind"], r["depth"]): r["final_train_error"] for r in rows}
    assert judged["reproduced"] == (train_err[("plain", 14)] > train_err[("plain", 8)])
    assert judged["solved"] == (train_err[("resnet", 14)] <= train_err[("resnet", 8)])
    md = (study / "report.md").read_text()
    assert "](curves.png)" in md and "](error_vs_depth.png)" in md and judged["text"] in md
    for name in ("curves.png", "error_vs_depth.png"):
        data = (study / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "shortcut A for the residual nets" in md
    # The CLI's own summary: one line per net and the verdict.
    assert judged["text"] in notes["second"]["stdout"]


def test_study_resumes_without_retraining_finished_runs(tiny_study):
    study, notes = tiny_study
    first, second = notes["first"], notes["second"]
    assert first["code"] == 130 and "interrupted" in first["stderr"]
    assert first["calls"] == [["plain8-seed0", False], ["resnet8-seed0", False], [INTERRUPTED, False]]
    assert len(notes["interrupted_metrics"]) == 1  # it stopped after its first of two epochs
    # The second run trains only what is left: the interrupted run resumes, the last one starts.
    assert second["calls"] == [[INTERRUPTED, True], ["resnet14-seed0", False]]
    assert "plain8-seed0: finished earlier, skipped" in second["stdout"]
    assert "resnet8-seed0: finished earlier, skipped" in second["stdout"]
    assert f"{INTERRUPTED}: resuming" in second["stdout"]
    assert "at epoch 1, step 4" in second["stdout"]  # from its checkpoint, not from scratch
    assert all(notes["finished_unchanged"].values()), notes["finished_unchanged"]
    metrics = (study / INTERRUPTED / "metrics.jsonl").read_text().splitlines()
    # Epoch 1 is the row written before the interruption, timings and all: it was not trained again.
    assert len(metrics) == 2 and metrics[0] == notes["interrupted_metrics"][0]
    assert (study / INTERRUPTED / "summary.json").is_file()


def test_report_redraws_from_result_files_alone(tiny_study, tmp_path, monkeypatch):
    study, _ = tiny_study
    shutil.copy(study / "results.jsonl", tmp_path / "results.jsonl")  # no run folders, no checkpoints

    def no_training(*args, **kwargs):
        raise AssertionError("report must not train")

    monkeypatch.setattr(runner, "train", no_training)
    code, out, err = run_cli(["report", str(tmp_path)])
    assert code == 0, err
    for name in ("report.md", "report.html", "table.json", "curves.png", "error_vs_depth.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "table.json").read_text()) == json.loads((study / "table.json").read_text())
    assert "report:" in out
    # Deleted outputs come back on the next report.
    for name in ("curves.png", "error_vs_depth.png", "report.html"):
        (tmp_path / name).unlink()
    assert run_cli(["report", str(tmp_path)])[0] == 0
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_report_names_the_residual_nets_shortcut(tiny_study, tmp_path):
    study, _ = tiny_study
    rows = [json.loads(line) for line in (study / "results.jsonl").read_text().splitlines()]
    for r in rows:
        if r["kind"] == "resnet":
            r["config"]["model_kwargs"]["shortcut"] = "B"
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_cli(["report", str(tmp_path)])[0] == 0
    assert "shortcut B for the residual nets" in (tmp_path / "report.md").read_text()


# --- the verdict on hand-made tables ----------------------------------------------------------

def _rows(errors: dict[tuple[str, int], float | list[float]]) -> list[dict[str, Any]]:
    """Study rows with the given final training error (one per seed when a list)."""
    rows = []
    for (kind, depth), values in errors.items():
        for seed, value in enumerate(values if isinstance(values, list) else [values]):
            rows.append({"kind": kind, "depth": depth, "seed": seed, "final_train_error": value,
                         "final_val_error": value + 0.01, "test_error": value + 0.02})
    return rows


@pytest.mark.parametrize("plain_deep, res_deep, reproduced, solved", [
    (0.20, 0.05, True, True),    # the paper's picture
    (0.08, 0.05, False, True),   # deep plain net trains fine: no degradation
    (0.20, 0.12, True, False),   # the residual net degrades too
    (0.10, 0.10, False, True),   # equal is neither worse for plain nor worse for ResNet
])
def test_verdict_compares_deepest_with_shallowest(plain_deep, res_deep, reproduced, solved):
    table = final_table(_rows({("plain", 20): 0.10, ("plain", 32): 0.99, ("plain", 56): plain_deep,
                               ("resnet", 20): 0.10, ("resnet", 32): 0.99, ("resnet", 56): res_deep}))
    judged = verdict(table)
    assert (judged["reproduced"], judged["solved"]) == (reproduced, solved)
    assert (judged["shallow"], judged["deep"]) == (20, 56)  # the middle depth does not decide
    assert ("Degradation reproduced" in judged["text"]) == reproduced
    assert ("Degradation NOT reproduced" in judged["text"]) == (not reproduced)
    assert ("NOT solved by shortcuts" in judged["text"]) == (not solved)
    assert f"plain-56 ends with training error {100 * plain_deep:.2f}%" in judged["text"]


@pytest.mark.parametrize("errors", [
    {("plain", 20): 0.1, ("resnet", 20): 0.1},                                  # one depth
    {("plain", 20): 0.1, ("resnet", 20): 0.1, ("plain", 56): 0.2},              # ResNet-56 not finished
    {},
])
def test_verdict_needs_both_kinds_at_two_depths(errors):
    judged = verdict(final_table(_rows(errors)))
    assert judged["reproduced"] is None and judged["solved"] is None
    assert "two depths" in judged["text"]


def test_final_table_means_over_seeds_in_order():
    table = final_table(_rows({("resnet", 56): [0.10, 0.20], ("plain", 56): 0.3, ("plain", 20): [0.1, 0.1, 0.4]}))
    assert [(t["kind"], t["depth"], t["seeds"]) for t in table] == [("plain", 20, 3), ("plain", 56, 1), ("resnet", 56, 2)]
    res = table[2]
    assert res["final_train_error"] == pytest.approx(0.15)
    assert res["final_train_error_std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std
    assert res["test_error"] == pytest.approx(0.17)
    assert table[1]["final_train_error_std"] == 0.0
    assert table[0]["final_train_error"] == pytest.approx(0.2)


def test_run_config_keeps_model_settings_beside_depth_and_shortcut():
    study = StudyConfig(depths=[20], shortcut="B", overrides={"model_kwargs": {"zero_init_last": True}, "epochs": 1})
    plain, res = run_config(study, "plain", 20, 0), run_config(study, "resnet", 20, 3)
    assert plain.model_kwargs == {"zero_init_last": True, "depth": 20}
    assert res.model_kwargs == {"zero_init_last": True, "depth": 20, "shortcut": "B"}
    assert (plain.model, res.model, res.seed, res.epochs) == ("cifar_plain", "cifar_resnet", 3, 1)
    # the run's depth wins over a depth smuggled in through --set
    clash = StudyConfig(overrides={"model_kwargs": {"depth": 110}})
    assert run_config(clash, "resnet", 56, 0).model_kwargs["depth"] == 56


# --- bad input: one line, exit 2, nothing trained -----------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_depth_exits_2_in_a_subprocess(tmp_path):
    out = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "resdense", "study", "degradation", "--depths", "21", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "6n+2" in _one_line(proc.stderr) and "21" in proc.stderr
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, expect", [
    (["study", "degradation", "--depths", "20,20", "--out", "{tmp}/s"], "distinct"),
    (["study", "degradation", "--depths", "20,x", "--out", "{tmp}/s"], "integers"),
    (["study", "degradation", "--depths", "8,14", "--set", "bogus=1", "--out", "{tmp}/s"], "bogus"),
    (["study", "degradation", "--depths", "8,14", "--preset", "slow", "--out", "{tmp}/s"], "preset"),
    (["report", "{tmp}"], "results.jsonl"),
    (["report", "{tmp}/missing"], "results.jsonl"),
])
def test_bad_study_input_exits_2_with_one_line(argv, expect, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("bad input must not train")

    monkeypatch.setattr(runner, "train", no_training)
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert expect in _one_line(err)
