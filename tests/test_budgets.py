"""Verdicts that name their budget, and a study's claims controlled together (issue 20, items 1,
2 and 4): Holm–Bonferroni on hand-made tables, the budgets in table.json against the runs' own
results, the printed decision lines, the index page, and the paper's numbers beside the table."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from resdense.studies import STUDIES, StudyConfig, degradation
from resdense.studies.spec import STANDARD
from resdense.studies.budget import budget_text, decided_at, runs_budget
from resdense.studies.stats import Claim, decide, decide_all, t_sf

from conftest import build_tiny_study, run_cli, small_test_split


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> Iterator[tuple[Path, dict[str, Any]]]:
    with small_test_split():
        yield build_tiny_study(tmp_path_factory.getbasetemp() / "tiny-degradation-study")


def _claim(name: str, sign: int = 1, margin: float = 0.0) -> Claim:
    return Claim(name, f"{name} beats base", ((name, 1.0), ("base", -1.0)), sign=sign, margin=margin)


def _values(per_seed: dict[str, list[float]]) -> dict[str, dict[str, dict[int, float]]]:
    """Contrasts (points) per seed for each claim's group, against a base of zeros."""
    groups = {name: {s: x / 100 for s, x in enumerate(xs)} for name, xs in per_seed.items()}
    seeds = len(next(iter(per_seed.values())))
    return {"train_error": {**groups, "base": {s: 0.0 for s in range(seeds)}}}


# --- Holm–Bonferroni on hand-made tables ---------------------------------------------------------

def test_a_claim_that_passes_alone_fails_under_control():
    values = _values({"strong": [9.0, 10.0, 11.0],   # far from zero: t ≈ 17, p ≈ 0.002
                      "edge": [1.0, 2.0, 3.5],       # t ≈ 2.98 on 2 df: p ≈ 0.048, just under 5%
                      "null": [-1.0, 0.5, 1.0]})     # inside the noise
    claims = [_claim("strong"), _claim("edge"), _claim("null")]
    alone = decide(claims[1], values["train_error"])
    assert alone.decision == "reproduced" and 0.025 < alone.p_value < 0.05
    assert [v.decision for v in decide_all(claims[1:2], values)] == ["reproduced"]  # a family of one: unchanged
    strong, edge, null = decide_all(claims, values)
    assert strong.decision == "reproduced" and strong.holm_level == pytest.approx(0.05 / 3)
    # The second smallest p is tested at 5%/2 and fails: inconclusive, with its unadjusted interval kept.
    assert edge.decision_alone == "reproduced" and edge.decision == "inconclusive"
    assert edge.holm_level == pytest.approx(0.025) and edge.family == 3
    assert (edge.ci_low, edge.ci_high) == (alone.ci_low, alone.ci_high) and edge.ci_low > 0
    assert edge.p_holm == pytest.approx(max(3 * strong.p_value, 2 * edge.p_value))
    assert "Holm" in edge.reason and "seeds would decide" in edge.reason
    assert null.decision == "inconclusive" and null.decision_alone == "inconclusive"


def test_control_never_turns_a_claim_that_fails_alone_into_a_pass():
    rng = random.Random(20)
    for _ in range(100):
        k, seeds = rng.randint(1, 7), rng.randint(2, 5)
        claims = [_claim(f"c{i}", sign=rng.choice((1, -1)), margin=rng.choice((0.0, 0.5, 1.0))) for i in range(k)]
        values = _values({c.id: [rng.gauss(rng.uniform(-4, 4), rng.uniform(0.1, 3)) for _ in range(seeds)]
                          for c in claims})
        for claim, v in zip(claims, decide_all(claims, values)):
            assert v.decision_alone == decide(claim, values["train_error"]).decision
            assert v.decision in (v.decision_alone, "inconclusive")
            assert v.family == k and (v.p_holm is None or v.p_holm >= v.p_value)


def test_non_inferiority_p_value_is_taken_against_the_margin():
    claim = _claim("b", sign=-1, margin=1.0)  # "b at most 1 point worse than base": b − base < +1
    values = _values({"b": [0.4, 0.5, 0.6]})
    [v] = decide_all([claim], values)
    assert v.decision == "reproduced" and v.threshold == 1.0
    assert v.p_value == pytest.approx(t_sf((1.0 - v.difference) / v.stderr, v.df))
    # Against a plain sign the same numbers would contradict "b − base < 0".
    assert decide(_claim("b", sign=-1), values["train_error"]).decision == "not_reproduced"


# --- budgets: from the runs' own results ---------------------------------------------------------

def _summaries(study: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: json.loads(p.read_text()) for p in study.glob("*/summary.json")}


def test_budgets_in_table_json_equal_the_runs_steps_and_images(tiny_study):
    study, _ = tiny_study
    summaries = _summaries(study)
    assert {s["train_images"] for s in summaries.values()} == {256}  # --set train_subset=256
    [steps] = {s["steps"] for s in summaries.values()}
    assert steps == 2 * (256 // 64)  # two epochs of four steps: what the runs did
    doc = json.loads((study / "table.json").read_text())
    runs = {c["claim"]: c["budget"]["runs"] for c in [*doc["verdicts"], *doc["measured"]]}
    assert runs == {"degradation": 2, "shortcuts_remove_degradation": 4, "deeper_resnet_better": 2}
    for claim in [*doc["verdicts"], *doc["measured"]]:
        budget = claim["budget"]
        assert (budget["steps"], budget["images"], budget["batch"], budget["epochs"]) == (steps, 256, 64, 2)
        assert budget["uniform"] and claim["paper_budget"] == degradation.PAPER_BUDGET.to_dict()


def test_a_budget_over_runs_that_differ_gives_the_range():
    rows = [{"group": "plain", "steps": 150, "epochs": [{}] * 10, "config": {"batch_size": 64, "train_subset": 1000}},
            {"group": "small", "steps": 620, "epochs": [{}] * 10, "config": {"batch_size": 16, "train_subset": 1000}},
            {"group": "other", "steps": 9, "config": {"batch_size": 1}}]
    budget = runs_budget(rows, ["plain", "small"])
    assert budget == {"steps": [150, 620], "batch": [16, 64], "images": 1000, "epochs": 10, "uniform": False, "runs": 2}
    assert budget_text(budget) == "150–620 steps × 16–64 on 1,000 images (10 epochs), runs differ"
    paper = degradation.PAPER_BUDGET.to_dict()
    assert decided_at("REPRODUCED", runs_budget(rows, ["plain"]), paper) == (
        "REPRODUCED at 150 steps × 64 on 1,000 images (10 epochs) (paper: 64,000 × 128 on 45,000 CIFAR-10 images)")


# --- what a reader sees ----------------------------------------------------------------------

def test_printed_decision_lines_carry_the_budget_beside_the_papers(tiny_study):
    study, notes = tiny_study
    out = notes["second"]["stdout"]
    steps = {s["steps"] for s in _summaries(study).values()}.pop()
    expect = f"INCONCLUSIVE at {steps} steps × 64 on 256 images (2 epochs) (paper: 64,000 × 128 on 45,000 CIFAR-10 images)"
    decisions = [line for line in out.splitlines() if "INCONCLUSIVE" in line or "REPRODUCED" in line]
    assert len(decisions) == 2 and all(line.endswith(expect) for line in decisions), decisions
    assert "Holm–Bonferroni at a family-wise 5%" in out
    assert "(measured, not decided) Deeper residual nets are better" in out and "(paper: 64,000 × 128" in out
    assert "(against the paper) plain-14 − plain-8 here" in out and "plain-56 − plain-20 is about +4.01" in out


def test_report_states_the_holm_rule_and_the_papers_numbers(tiny_study):
    study, _ = tiny_study
    md = (study / "report.md").read_text()
    assert "Holm–Bonferroni" in md and "5%/k" in md and "decision alone" in md and "90% interval (unadjusted)" in md
    assert "6.97" in md and "14.22" in md  # Table 6 and the reproduction beside the study's table
    assert "in the paper's budget plain-56 − plain-20 is about +4.01" in md
    assert "(paper: 64,000 × 128 on 45,000 CIFAR-10 images)" in json.loads((study / "table.json").read_text())["verdict_text"]
    page = (study / "report.html").read_text()
    assert "Holm–Bonferroni" in page and "paper: 64,000 × 128" in page


def test_index_page_shows_each_studys_budget(tiny_study, tmp_path):
    study, _ = tiny_study
    (tmp_path / "one").mkdir()
    for f in ("study.json", "results.jsonl"):
        shutil.copy(study / f, tmp_path / "one" / f)
    code, _, err = run_cli(["report", str(tmp_path)])
    assert code == 0, err
    page, md = (tmp_path / "index.html").read_text(), (tmp_path / "index.md").read_text()
    assert "<strong>Budget:</strong> 8 steps × 64 on 256 images (2 epochs) (paper: 64,000 × 128 on 45,000 CIFAR-10 " \
           "images)" in page
    assert md.count("on 256 images (2 epochs)") == 1


def test_study_list_shows_each_presets_budget_beside_the_papers():
    code, out, err = run_cli(["study", "list"])
    assert code == 0, err
    assert ("  budget of preset quick: 150 steps × 64 on 1,000 images (10 epochs) "
            "(paper: 64,000 × 128 on 45,000 CIFAR-10 images)") in out
    assert "budget of preset paper: 300 epochs × 64 on all training images (paper: 234,600 × 64 on 50,000" in out
    # The remedies' small-batch arm asks for four times the steps of the others: both are listed.
    assert "150 steps × 64 on 1,000 images (10 epochs); 620 steps × 16 on 1,000 images (10 epochs)" in out


# --- the standard preset (item 3) -----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(STUDIES))
def test_standard_preset_trains_every_run_on_all_images_with_the_papers_recipe_shape(name):
    spec = STUDIES[name]
    runs = spec.runs(StudyConfig(study=name, preset="standard", seeds=[0], options=dict(spec.default_options)))
    for run in runs:
        cfg = run.config
        assert cfg.train_subset is None and cfg.test_subset is None, run.name  # every training and test image
        assert (cfg.schedule, cfg.milestones, cfg.momentum) == ("step", [0.5, 0.75], 0.9), run.name
        assert cfg.weight_decay == pytest.approx(1e-3 if "+l2" in run.group else 1e-4), run.name  # remedies' 10x L2 arm
        assert cfg.epochs == STANDARD["epochs"] and cfg.iterations is None and cfg.pad == 4 and cfg.flip == 0.5, run.name
    assert {r.config.batch_size for r in runs} <= {64, 128, 16}


def test_deeper_resnet_better_is_decided_on_the_standard_and_paper_presets_only():
    decided = {p for p in degradation.PRESETS
               if next(c for c in degradation.claims(StudyConfig(preset=p)) if c.id == "deeper_resnet_better").tested}
    assert decided == {"standard", "paper"}


def test_study_list_marks_the_standard_preset_uncalibrated_and_names_measured_hardware():
    code, out, _ = run_cli(["study", "list"])
    assert code == 0
    for spec in STUDIES.values():
        block = out.split(f"{spec.name}: ", 1)[1].split("\n  claim:", 1)[0]
        assert "budget of preset standard: 30 epochs" in block and "not yet calibrated:" in block
        assert "measured: " in block and "EPYC" in block
    # A claim that exists on one preset only (the bottleneck claim at the depth the arms share) is listed.
    assert "bottleneck ResNet-110" in out and "bottleneck ResNet-20" in out
