"""The efficiency, shortcuts and remedies studies: the runs each spec builds (without training),
each claim's decision on hand-made results, margins, one tiny end-to-end study of each on a real
Fashion-MNIST slice, and the index page over every study in a folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from resdense.models import create_model
from resdense.studies import STUDIES, StudyConfig, get_study
from resdense.studies.report import group_table, verdicts
from resdense.studies.stats import Claim, decide

from conftest import SPEC_ARGS, build_tiny_studies, run_cli, small_test_split


@pytest.fixture(scope="module")
def tiny_studies(tmp_path_factory) -> Iterator[Path]:
    with small_test_split():
        yield build_tiny_studies(tmp_path_factory.getbasetemp() / "tiny-studies")


# --- each spec builds the runs it should -------------------------------------------------------

def _runs(name: str, **kwargs: Any) -> dict[str, Any]:
    spec = get_study(name)
    study = StudyConfig(study=name, options={**spec.default_options, **kwargs.pop("options", {})}, **kwargs)
    return {r.name: r for r in spec.runs(study)}


def test_efficiency_runs_densenets_and_basic_and_bottleneck_resnets_on_one_recipe():
    runs = _runs("efficiency", seeds=[0, 1])
    assert sorted(runs) == sorted(f"{g}-seed{s}" for s in (0, 1) for g in (
        "densenet-bc-22", "densenet-bc-40", "resnet-20", "resnet-32", "resnet-bottleneck-20"))
    d40, b20 = runs["densenet-bc-40-seed1"].config, runs["resnet-bottleneck-20-seed0"].config
    assert (d40.model, d40.model_kwargs, d40.seed) == ("cifar_densenet", {"depth": 40, "growth_rate": 12, "bc": True}, 1)
    assert (b20.model, b20.model_kwargs) == ("cifar_resnet", {"depth": 20, "bottleneck": True})
    # one recipe for every net: the configs differ only in model, seed and folder
    configs = [r.config.to_dict() for r in runs.values()]
    same = {k for k in configs[0] if all(c[k] == configs[0][k] for c in configs)}
    assert set(configs[0]) - same == {"model", "model_kwargs", "seed", "out"}
    assert all(c["eval_train"] and c["epochs"] == 10 and c["train_subset"] == 1000 for c in configs)
    paper = _runs("efficiency", preset="paper", seeds=[0])
    assert {r.config.recipe for r in paper.values()} == {"densenet-cifar-paper"}
    assert "densenet-bc-100-seed0" in paper and "resnet-110-seed0" in paper


def test_shortcuts_runs_four_nets_that_differ_only_in_their_shortcut():
    runs = _runs("shortcuts", seeds=[2], options={"depth": 20})
    assert sorted(runs) == ["plain-20-seed2", "resnetA-20-seed2", "resnetB-20-seed2", "resnetC-20-seed2"]
    assert {r.config.model_kwargs["shortcut"] for r in runs.values()} == {"none", "A", "B", "C"}
    assert {r.config.model for r in runs.values()} == {"cifar_resnet"} and {r.seed for r in runs.values()} == {2}
    params = {r.labels["shortcut"]: sum(p.numel() for p in create_model(r.config.model, **r.config.model_kwargs).parameters())
              for r in runs.values()}
    assert params["none"] == params["A"] < params["B"] < params["C"]  # A adds nothing; C projects everywhere
    with pytest.raises(Exception, match="6n\\+2"):
        _runs("shortcuts", options={"depth": 21})


def test_remedies_applies_each_remedy_to_the_plain_net_only():
    runs = _runs("remedies", seeds=[0])
    cfg = {r.labels["net"]: r.config for r in runs.values()}
    assert set(cfg) == {"plain", "plain+small-batch", "plain+clip", "plain+l2", "plain-no-bn", "resnet", "resnet+zero-init"}
    base = cfg["plain"]
    assert cfg["plain+small-batch"].batch_size == 16 and base.batch_size == 64
    assert cfg["plain+clip"].grad_clip == 1.0 and base.grad_clip is None
    assert cfg["plain+l2"].weight_decay == pytest.approx(10 * base.weight_decay)
    assert cfg["plain-no-bn"].model_kwargs == {"depth": 32, "norm_layer": "none"}
    assert cfg["resnet+zero-init"].model_kwargs == {"depth": 32, "zero_init_last": True}
    assert all(c.record_gradients for c in cfg.values())  # gradient norms in every run
    # apart from its remedy, each run is the plain one
    for net in ("plain+small-batch", "plain+clip", "plain+l2"):
        diff = {k for k, v in cfg[net].to_dict().items() if base.to_dict()[k] != v}
        assert diff - {"out"} == {"plain+small-batch": {"batch_size"}, "plain+clip": {"grad_clip"},
                                  "plain+l2": {"weight_decay"}}[net]


# --- claims decided on hand-made results --------------------------------------------------------

def _rows(errors: dict[str, list[float]], labels: dict[str, dict[str, Any]], params: dict[str, int] | None = None,
          key: str = "test_error") -> list[dict[str, Any]]:
    rows = []
    for group, vals in errors.items():
        for seed, e in enumerate(vals):
            row = {"run": f"{group}-seed{seed}", "group": group, "seed": seed, **labels[group], "train_error": e,
                   "running_train_error": e, "val_error": e, "test_error": e, "wall_time": 1.0,
                   "params": (params or {}).get(group), "macs": 100 * (params or {}).get(group, 0) or None}
            row[key] = e
            rows.append(row)
    return rows


def test_efficiency_compares_the_best_resnet_with_the_largest_cheaper_densenet():
    spec, study = get_study("efficiency"), StudyConfig(study="efficiency", options={"margin": 0.5})
    labels = {"densenet-bc-22": {"family": "densenet-bc", "depth": 22}, "densenet-bc-40": {"family": "densenet-bc", "depth": 40},
              "resnet-20": {"family": "resnet", "depth": 20}, "resnet-32": {"family": "resnet", "depth": 32},
              "resnet-bottleneck-20": {"family": "resnet-bottleneck", "depth": 20}}
    params = {"densenet-bc-22": 70_000, "densenet-bc-40": 180_000, "resnet-20": 270_000, "resnet-32": 460_000,
              "resnet-bottleneck-20": 180_000}
    errors = {"densenet-bc-22": [0.16, 0.17, 0.16], "densenet-bc-40": [0.130, 0.128, 0.131],
              "resnet-20": [0.14, 0.15, 0.14], "resnet-32": [0.132, 0.135, 0.134],
              "resnet-bottleneck-20": [0.140, 0.143, 0.139]}
    by = {v.claim: v for v in verdicts(spec, study, _rows(errors, labels, params))}
    v = by["params"]
    # best ResNet: resnet-32 (lowest mean); the largest DenseNet-BC below its 460k parameters: BC-40
    assert v.contrast == "densenet-bc-40 − resnet-32" and "2.6× fewer parameters" in v.text
    assert v.decision == "reproduced" and v.predicted == "< +0.5" and v.ci_high < 0.5
    assert by["bottleneck_20"].decision == "reproduced"  # the bottleneck is even a little better here
    # DenseNet-BC-40 clearly worse than the best ResNet: contradicted
    worse = dict(errors, **{"densenet-bc-40": [0.16, 0.165, 0.162]})
    assert {v.claim: v for v in verdicts(spec, study, _rows(worse, labels, params))}["params"].decision == "not_reproduced"


def test_bottleneck_claim_is_non_inferiority_within_one_point():
    spec, study = get_study("efficiency"), StudyConfig(study="efficiency", options={"margin": 0.5})
    labels = {"resnet-20": {"family": "resnet", "depth": 20}, "resnet-bottleneck-20": {"family": "resnet-bottleneck", "depth": 20},
              "densenet-bc-22": {"family": "densenet-bc", "depth": 22}}
    close = {"resnet-20": [0.14, 0.15, 0.14], "resnet-bottleneck-20": [0.142, 0.151, 0.143], "densenet-bc-22": [0.2] * 3}
    v = {v.claim: v for v in verdicts(spec, study, _rows(close, labels, {"resnet-20": 2, "resnet-bottleneck-20": 1,
                                                                         "densenet-bc-22": 1}))}["bottleneck_20"]
    assert v.decision == "reproduced" and 0 < v.difference < 1 and v.ci_high < 1.0


def test_a_margin_moves_the_threshold_both_ways():
    claim = Claim("c", "B at most 1 point worse than A", (("b", 1.0), ("a", -1.0)), sign=-1, margin=1.0)

    def vals(b: list[float]) -> dict[str, dict[int, float]]:
        return {"a": {0: 0.10, 1: 0.11, 2: 0.10}, "b": dict(enumerate(b))}

    assert decide(claim, vals([0.104, 0.116, 0.105])).decision == "reproduced"       # +0.5 ± small < +1
    assert decide(claim, vals([0.125, 0.135, 0.126])).decision == "not_reproduced"   # +2.5 ± small > +1
    v = decide(claim, vals([0.09, 0.13, 0.11]))
    assert v.decision == "inconclusive" and "+1" in v.reason and v.predicted == "< +1"


def test_shortcut_claims_on_hand_made_results():
    spec, study = get_study("shortcuts"), StudyConfig(study="shortcuts", options={"depth": 56})
    labels = {g: {"shortcut": s, "depth": 56} for g, s in (("plain-56", "none"), ("resnetA-56", "A"),
                                                           ("resnetB-56", "B"), ("resnetC-56", "C"))}
    errors = {"plain-56": [0.30, 0.33, 0.31], "resnetA-56": [0.10, 0.11, 0.10], "resnetB-56": [0.095, 0.10, 0.096],
              "resnetC-56": [0.02, 0.03, 0.025]}
    by = {v.claim: v for v in verdicts(spec, study, _rows(errors, labels))}
    assert all(by[f"{x}_fixes_degradation"].decision == "reproduced" for x in "ABC")
    assert by["B_not_essential"].decision == "reproduced"  # B gains ~0.6 of A's ~21: far less than half
    # C gains ~8 points over A where half of A's gain is ~10.5: still less than half, but is it decided?
    assert by["C_not_essential"].difference == pytest.approx(100 * (0.5 * (0.3133 - 0.1033) - (0.1033 - 0.025)), abs=0.05)
    # a C that gains more than A itself did contradicts "not essential"
    big = dict(errors, **{"resnetA-56": [0.20, 0.21, 0.20], "resnetC-56": [0.01, 0.012, 0.011]})
    assert {v.claim: v for v in verdicts(spec, study, _rows(big, labels))}["C_not_essential"].decision == "not_reproduced"


def test_remedy_claims_need_half_the_gap_closed():
    spec, study = get_study("remedies"), StudyConfig(study="remedies", options={"depth": 32})
    nets = ("plain", "plain+small-batch", "plain+clip", "plain+l2", "plain-no-bn", "resnet", "resnet+zero-init")
    labels = {f"{n}-32": {"net": n, "depth": 32} for n in nets}
    errors = {"plain-32": [0.30, 0.34, 0.32], "resnet-32": [0.10, 0.11, 0.10],
              "plain+small-batch-32": [0.12, 0.13, 0.12],   # closes ~90% of the gap
              "plain+clip-32": [0.30, 0.35, 0.31],          # closes nothing
              "plain+l2-32": [0.22, 0.25, 0.21],            # about half: undecided
              "plain-no-bn-32": [0.80, 0.85, 0.82], "resnet+zero-init-32": [0.10, 0.105, 0.10]}
    by = {v.claim: v for v in verdicts(spec, study, _rows(errors, labels))}
    assert by["premise"].decision == "reproduced"
    assert by["plain+small-batch"].decision == "reproduced"
    assert by["plain+clip"].decision == "not_reproduced"
    assert by["plain+l2"].decision == "inconclusive"
    assert by["no_bn"].decision == "reproduced" and not by["no_bn"].headline
    assert by["zero_init"].decision == "reproduced" and by["zero_init"].predicted == "< +1"
    half_gap = 100 * 0.5 * ((0.30 + 0.34 + 0.32) / 3 - (0.10 + 0.11 + 0.10) / 3)
    closed = 100 * ((0.30 + 0.34 + 0.32) / 3 - (0.12 + 0.13 + 0.12) / 3)
    assert by["plain+small-batch"].difference == pytest.approx(closed - half_gap)


# --- the pieces the remedies rest on ----------------------------------------------------------

def test_grad_clip_bounds_the_step_and_the_curve_records_the_norm_before_clipping():
    from resdense.train.engine import TrainState, train_one_epoch

    def one_step(clip: float | None) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        model = create_model("cifar_resnet", depth=8, in_chans=1, num_classes=10)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0, weight_decay=0.0)
        batch = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,)))]
        curve: list[dict[str, float]] = []
        train_one_epoch(model, batch, opt, lambda step: 1.0, TrainState(), device=torch.device("cpu"),
                        curve=curve, curve_every=1, grad_clip=clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        return after - before, curve[0]["grad_norm"]

    free, norm = one_step(None)
    clipped, norm_clipped = one_step(1e-3)
    assert norm > 1e-2 and norm_clipped == pytest.approx(norm, rel=1e-4)  # the same step, measured before clipping
    assert float(free.norm()) == pytest.approx(norm, rel=1e-3)             # lr 1, no momentum: the step is the gradient
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-2)


def test_every_run_summary_gives_params_and_macs(tiny_studies):
    summary = json.loads((tiny_studies / "shortcuts" / "resnetC-8-seed0" / "summary.json").read_text())
    model = create_model("cifar_resnet", depth=8, shortcut="C", in_chans=1, num_classes=10)
    assert summary["params"] == sum(p.numel() for p in model.parameters()) and summary["macs"] > 0


def test_norm_layer_none_removes_every_norm_and_zero_init_still_starts_at_identity():
    net = create_model("cifar_plain", depth=8, norm_layer="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    res = create_model("cifar_resnet", depth=8, norm_layer="none", zero_init_last=True)
    assert all(float(b.conv2.weight.detach().abs().sum()) == 0 for b in res.layer1)


# --- end to end, tiny, on real Fashion-MNIST ----------------------------------------------------

@pytest.mark.parametrize("name", list(SPEC_ARGS))
def test_tiny_study_end_to_end_writes_rows_verdicts_report_and_figures(tiny_studies, name):
    out = tiny_studies / name
    table = json.loads((out / "table.json").read_text())
    spec = get_study(name)
    study = StudyConfig(study=name, seeds=[0], preset="smoke",
                        options={**spec.default_options, **({"depth": 8} if SPEC_ARGS[name] else {})})
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["run"] for r in rows) == sorted(r.name for r in spec.runs(study))
    assert all(r["params"] > 0 and r["macs"] > 0 and 0 <= r["test_error"] <= 1 for r in rows)
    assert {v["claim"] for v in table["verdicts"]} == {c.id for c in spec.claims(study, group_table(spec, rows)) if c.tested}
    assert all(v["decision"] == "inconclusive" and v["n_seeds"] == 1 for v in table["verdicts"])  # one seed decides nothing
    report = (out / "report.md").read_text()
    for figure in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "params" in report and "MACs" in report


def test_remedies_runs_record_gradient_norms(tiny_studies):
    run = tiny_studies / "remedies" / "plain+clip-8-seed0"
    curve = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    assert curve and all(p["grad_norm"] > 0 for p in curve)
    assert sorted(p.name for p in (run / "gradients").iterdir()) == [
        "epoch-0000.json", "epoch-0000.png", "epoch-0001.json", "epoch-0001.png"]
    out = tiny_studies / "remedies"
    assert (out / "grad_norm_curves.png").is_file() and (out / "gradients_first.png").is_file()


def test_index_links_every_studys_report(tiny_studies):
    code, out, err = run_cli(["report", str(tiny_studies)])
    assert code == 0, err
    page = (tiny_studies / "index.html").read_text()
    for name in ("degradation", *SPEC_ARGS):
        assert f"href='{name}/report.html'" in page and (tiny_studies / name / "report.html").is_file()
    assert set(STUDIES) == {"degradation", *SPEC_ARGS}  # a new study joins this test


@pytest.mark.parametrize("name,preset", [(n, p) for n, spec in STUDIES.items() for p in spec.presets])
def test_every_preset_of_every_study_builds_valid_runs_and_models(name, preset):
    from resdense.studies.engine import check_models

    spec = get_study(name)
    study = StudyConfig(study=name, preset=preset, seeds=[0, 1], options=dict(spec.default_options))
    runs = spec.runs(study)  # each config is validated as it is built
    assert runs and len({r.name for r in runs}) == len(runs) and {r.seed for r in runs} == {0, 1}
    check_models(runs)  # every model builds (on the meta device)
    claims = spec.claims(study, None)
    assert claims and all(c.terms for c in claims)


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_has_a_smoke_preset_of_one_small_step_per_run(name):
    """`--preset smoke` checks any study end to end in seconds: with the default options and
    seeds, every run trains one step on a few images and evaluates a few."""
    spec = get_study(name)
    assert "smoke" in spec.presets
    runs = spec.runs(StudyConfig(study=name, preset="smoke", options=dict(spec.default_options)))
    assert {r.seed for r in runs} == {0, 1, 2} and len(runs) <= 21
    for r in runs:
        cfg = r.config
        assert cfg.epochs == 1 and cfg.iterations is None and cfg.train_subset <= cfg.batch_size <= 16
        assert cfg.val_size <= 16 and cfg.test_subset <= 16
