"""The degradation study end to end (a small real Fashion-MNIST subset), its resume after an
interruption, ``resdense report`` from result files alone, the verdict, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from resdense.studies import StudyConfig, get_study
from resdense.studies.report import group_table, verdicts
from resdense.studies.stats import Claim, decide, t_quantile
from resdense.train import runner

from conftest import (DEPTHS, INTERRUPTED, PNG_MAGIC, STUDY_ARGS, TEST_IMAGES, build_tiny_study, run_cli,
                      small_test_split)

ROW_KEYS = {"run", "group", "kind", "depth", "seed", "train_error", "running_train_error", "val_error", "test_error",
            "test_error_best", "wall_time", "curve", "epochs", "config"}


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
        assert ROW_KEYS <= set(r)
        assert r["seed"] == 0 and len(r["epochs"]) == 2 and r["curve"] and r["group"] == f"{r['kind']}-{r['depth']}"
        assert r["train_error_kind"] == "eval"  # the final model on its training images, not the running error
        for key in ("train_error", "running_train_error", "val_error", "test_error", "test_error_best"):
            assert 0.0 <= r[key] <= 1.0
        assert r["config"]["train_subset"] == 256 and r["config"]["val_size"] == 400 and r["config"]["eval_train"]
        assert r["test_images"] == TEST_IMAGES
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
    doc = json.loads((study / "table.json").read_text())
    verdicts = {v["claim"]: v for v in doc["verdicts"]}
    # The quick budget decides the two halves; "deeper ResNets are better" is measured, not decided.
    assert set(verdicts) == {"degradation", "shortcuts_remove_degradation"}
    [measured] = doc["measured"]
    assert measured["claim"] == "deeper_resnet_better" and "decision" not in measured
    assert "64k iterations" in measured["why_not_decided"]
    for v in verdicts.values():
        # one seed: a difference, no uncertainty, so never a decision either way
        assert v["n_seeds"] == 1 and v["stderr"] is None and v["decision"] == "inconclusive"
        assert {"claim", "difference", "stderr", "n_seeds", "decision"} <= set(v)
    train_err = {(r["kind"], r["depth"]): r["train_error"] for r in rows}
    assert verdicts["degradation"]["difference"] == pytest.approx(100 * (train_err[("plain", 14)] - train_err[("plain", 8)]))
    assert verdicts["shortcuts_remove_degradation"]["difference"] == pytest.approx(100 * (
        train_err[("plain", 14)] - train_err[("plain", 8)] - train_err[("resnet", 14)] + train_err[("resnet", 8)]))
    assert json.loads((study / "study.json").read_text())["verdicts"] == doc["verdicts"]
    md = (study / "report.md").read_text()
    assert "](curves.png)" in md and "](error_vs_depth.png)" in md and doc["verdict_text"] in md
    assert "Decision rule" in md and "inconclusive" in md and "NOT solved" not in md
    for name in ("curves.png", "error_vs_depth.png"):
        data = (study / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "shortcut option A for the residual nets" in md
    # The CLI's own summary: one line per net and each claim's decision.
    out = notes["second"]["stdout"]
    assert "plain-14" in out and "resnet-8" in out and out.count("INCONCLUSIVE") == 2
    assert "(measured, not decided) Deeper residual nets are better" in out


def test_study_resumes_without_retraining_finished_runs(tiny_study):
    study, notes = tiny_study
    first, second = notes["first"], notes["second"]
    assert first["code"] == 130 and "interrupted" in first["stderr"]
    assert [c[0] for c in first["calls"]] == ["plain8-seed0", "resnet8-seed0", INTERRUPTED]
    assert len(notes["interrupted_metrics"]) == 1  # it stopped after its first of two epochs
    # The second run trains only what is left: the interrupted run resumes, the last one starts.
    assert [c[0] for c in second["calls"]] == [INTERRUPTED, "resnet14-seed0"]
    assert "(2 finished earlier, skipped)" in second["stdout"]
    assert f"{INTERRUPTED}: resuming" in second["stdout"] and "resnet14-seed0: training" in second["stdout"]
    assert "at step 4 (after epoch 1)" in second["stdout"]  # from its checkpoint, not from scratch
    assert all(notes["finished_unchanged"].values()), notes["finished_unchanged"]
    metrics = (study / INTERRUPTED / "metrics.jsonl").read_text().splitlines()
    # Epoch 1 is the row written before the interruption, timings and all: it was not trained again.
    assert len(metrics) == 2 and metrics[0] == notes["interrupted_metrics"][0]
    assert (study / INTERRUPTED / "summary.json").is_file()


def test_report_redraws_from_result_files_alone(tiny_study, tmp_path, monkeypatch):
    study, _ = tiny_study
    for name in ("study.json", "results.jsonl"):  # no run folders, no checkpoints
        shutil.copy(study / name, tmp_path / name)

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


def test_rerun_with_other_settings_warns_in_one_line(tiny_study, tmp_path, monkeypatch):
    study, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    monkeypatch.setattr(runner, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("all runs are finished")))
    argv = ["study", "degradation", *[a.replace("epochs=2", "epochs=3") for a in STUDY_ARGS], "--seeds", "0",
            "--out", str(copy)]
    with small_test_split():
        code, out, err = run_cli(argv)
    assert code == 0, err
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "'epochs': 2" in warning[0] and "'epochs': 3" in warning[0]


# --- the decision rule on hand-made result tables ------------------------------------------------

def _values(errors: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {group: dict(enumerate(vals)) for group, vals in errors.items()}


SHORTCUTS = Claim("shortcuts", "shortcuts remove degradation",
                  (("plain-56", 1.0), ("plain-20", -1.0), ("resnet-56", -1.0), ("resnet-20", 1.0)), sign=1)
DEEPER = Claim("deeper", "deeper is better", (("resnet-56", 1.0), ("resnet-20", -1.0)), sign=-1)


def test_decision_reproduced_with_paired_seeds():
    v = decide(SHORTCUTS, _values({"plain-56": [0.31, 0.34, 0.29], "plain-20": [0.13, 0.15, 0.10],
                                   "resnet-56": [0.08, 0.10, 0.07], "resnet-20": [0.08, 0.09, 0.07]}))
    per_seed = [100 * (0.31 - 0.13 - 0.08 + 0.08), 100 * (0.34 - 0.15 - 0.10 + 0.09), 100 * (0.29 - 0.10 - 0.07 + 0.07)]
    assert v.decision == "reproduced" and v.n_seeds == 3 and v.method.startswith("paired")
    assert v.difference == pytest.approx(sum(per_seed) / 3)
    sd = statistics.stdev(per_seed)
    assert v.stderr == pytest.approx(sd / math.sqrt(3))
    assert v.ci_low == pytest.approx(v.difference - 2.920 * v.stderr)  # t_{0.95, 2}: one-sided 5%
    assert v.ci_low > 0


def test_decision_not_reproduced_when_the_interval_is_on_the_other_side():
    # the deeper ResNet is clearly worse on every seed
    v = decide(DEEPER, _values({"resnet-56": [0.20, 0.22, 0.21], "resnet-20": [0.10, 0.11, 0.10]}))
    assert v.decision == "not_reproduced" and v.ci_low > 0 and v.predicted == "< 0"


def test_decision_inconclusive_inside_the_noise_and_says_what_would_decide():
    v = decide(DEEPER, _values({"resnet-56": [0.09, 0.07, 0.10], "resnet-20": [0.08, 0.09, 0.08]}))
    assert v.decision == "inconclusive" and v.ci_low < 0 < v.ci_high
    assert "seeds" in v.reason or "budget" in v.reason
    one = decide(DEEPER, _values({"resnet-56": [0.05], "resnet-20": [0.30]}))
    assert one.decision == "inconclusive" and one.stderr is None and "one seed" in one.reason
    missing = decide(DEEPER, _values({"resnet-20": [0.3, 0.2]}))
    assert missing.decision == "inconclusive" and missing.difference is None


def test_decision_without_common_seeds_uses_welch():
    values = {"resnet-56": {0: 0.20, 1: 0.22, 2: 0.21}, "resnet-20": {3: 0.10, 4: 0.11, 5: 0.10, 6: 0.12}}
    v = decide(DEEPER, values)
    assert v.method.startswith("independent") and v.decision == "not_reproduced"
    a, b = [100 * x for x in values["resnet-56"].values()], [100 * x for x in values["resnet-20"].values()]
    assert v.stderr == pytest.approx(math.sqrt(statistics.variance(a) / 3 + statistics.variance(b) / 4))


def test_t_quantiles():
    assert t_quantile(1) == pytest.approx(6.314) and t_quantile(2) == pytest.approx(2.920)
    assert t_quantile(2.9) == t_quantile(2)  # fractional Welch df round down: wider, never narrower
    assert t_quantile(1000) == pytest.approx(1.645)


def test_verdicts_from_rows_and_table_means():
    spec = get_study("degradation")
    study = StudyConfig(options={"depths": [20, 32, 56]}, seeds=[0, 1], preset="paper")
    rows = []
    errors = {("plain", 20): [0.1, 0.12], ("plain", 32): [0.9, 0.9], ("plain", 56): [0.3, 0.33],
              ("resnet", 20): [0.08, 0.09], ("resnet", 32): [0.9, 0.9], ("resnet", 56): [0.07, 0.09]}
    for (kind, depth), vals in errors.items():
        for seed, e in enumerate(vals):
            rows.append({"run": f"{kind}{depth}-seed{seed}", "group": f"{kind}-{depth}", "seed": seed, "kind": kind,
                         "depth": depth, "train_error": e, "running_train_error": e + 0.02, "val_error": e + 0.01,
                         "test_error": e + 0.03, "wall_time": 1.0})
    by = {v.claim: v for v in verdicts(spec, study, rows)}
    assert set(by) == {"degradation", "shortcuts_remove_degradation", "deeper_resnet_better"}  # paper: all three
    # the middle depth decides nothing: shallowest against deepest
    assert by["degradation"].difference == pytest.approx(100 * ((0.3 - 0.1) + (0.33 - 0.12)) / 2)
    table = group_table(spec, rows)
    assert [(t["kind"], t["depth"]) for t in table] == [("plain", 20), ("plain", 32), ("plain", 56),
                                                       ("resnet", 20), ("resnet", 32), ("resnet", 56)]
    assert table[0]["train_error"] == pytest.approx(0.11) and table[0]["train_error_std"] == pytest.approx(0.0141421, rel=1e-5)


def test_run_config_keeps_model_settings_beside_depth_and_shortcut():
    study = StudyConfig(options={"depths": [20, 32], "shortcut": "B"}, seeds=[3],
                        overrides={"model_kwargs": {"zero_init_last": True}, "epochs": 1})
    runs = {r.name: r.config for r in get_study("degradation").runs(study)}
    plain, res = runs["plain20-seed3"], runs["resnet20-seed3"]
    assert plain.model_kwargs == {"zero_init_last": True, "depth": 20}
    assert res.model_kwargs == {"zero_init_last": True, "depth": 20, "shortcut": "B"}
    assert (plain.model, res.model, res.seed, res.epochs) == ("cifar_plain", "cifar_resnet", 3, 1)
    assert sorted(runs) == ["plain20-seed3", "plain32-seed3", "resnet20-seed3", "resnet32-seed3"]
    # the run's depth wins over a depth smuggled in through --set
    clash = StudyConfig(options={"depths": [20, 56]}, seeds=[0], overrides={"model_kwargs": {"depth": 110}})
    assert {r.config.model_kwargs["depth"] for r in get_study("degradation").runs(clash)} == {20, 56}


# --- bad input: one line, exit 2, nothing trained -----------------------------------------------

def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_depth_exits_2_in_a_subprocess(tmp_path):
    out = tmp_path / "x"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "resdense", "study", "degradation", "--depths", "20,21", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "6n+2" in _one_line(proc.stderr) and "21" in proc.stderr
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("argv, expect", [
    (["study", "degradation", "--depths", "20,20", "--out", "{tmp}/s"], "distinct"),
    (["study", "degradation", "--depths", "20", "--out", "{tmp}/s"], "two or more"),
    (["study", "degradation", "--depths", "8,14", "--jobs", "0", "--out", "{tmp}/s"], "--jobs"),
    (["study", "degradation", "--depths", "20,x", "--out", "{tmp}/s"], "integers"),
    (["study", "degradation", "--depths", "8,14", "--set", "bogus=1", "--out", "{tmp}/s"], "bogus"),
    (["study", "degradation", "--depths", "8,14", "--preset", "slow", "--out", "{tmp}/s"], "preset"),
    (["report", "{tmp}"], "study.json"),
    (["report", "{tmp}/missing"], "study.json"),
])
def test_bad_study_input_exits_2_with_one_line(argv, expect, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("bad input must not train")

    monkeypatch.setattr(runner, "train", no_training)
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert expect in _one_line(err)


def test_study_list_names_every_study_with_its_presets_and_claims():
    code, out, err = run_cli(["study", "list"])
    assert code == 0, err
    assert out.startswith("degradation: ") and "presets: quick, smoke, standard, paper" in out
    assert ("claim: Degradation: plain-56 ends with higher training error than plain-20 [plain-56 − plain-20 > 0] "
            "(decided by presets quick, smoke, standard, paper)") in out
    assert "[(plain-56 − plain-20) − (resnet-56 − resnet-20) > 0] (decided by presets quick, smoke, standard, paper)" in out
    assert "[resnet-56 − resnet-20 < 0] (decided by presets standard, paper)" in out


def test_report_on_a_folder_of_studies_writes_an_index_linking_each_report(tiny_study, tmp_path):
    study, _ = tiny_study
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        for f in ("study.json", "results.jsonl"):
            shutil.copy(study / f, tmp_path / name / f)
    code, out, err = run_cli(["report", str(tmp_path)])
    assert code == 0, err
    assert "2 studies (first, second)" in out
    page = (tmp_path / "index.html").read_text()
    for name in ("first", "second"):
        assert f"href='{name}/report.html'" in page and (tmp_path / name / "report.html").is_file()
    assert page.count("inconclusive") == 4  # two decided claims per study, one seed each
