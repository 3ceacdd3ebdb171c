"""``resdense analyze gradients|responses|lesion|reuse`` on a tiny trained study and a tiny DenseNet."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from resdense.train.config import TrainConfig, apply_overrides
from resdense.train.runner import train

from conftest import DEPTHS, PNG_MAGIC, build_tiny_study, run_cli, small_test_split

NETS = [f"{kind}{depth}" for depth in DEPTHS for kind in ("plain", "resnet")]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Iterator[Path]:
    """The study of test_studies.py (trained once per session, whichever module asks first)."""
    with small_test_split():
        path, notes = build_tiny_study(tmp_path_factory.getbasetemp() / "tiny-degradation-study")
        assert notes["second"]["code"] == 0, notes["second"]["stderr"]
        yield path


@pytest.fixture(scope="module")
def densenet_run(tmp_path_factory) -> Path:
    """A DenseNet-BC of depth 10 (one dense layer per block), one short epoch on synthetic data."""
    out = tmp_path_factory.mktemp("densenet") / "run"
    cfg = apply_overrides(TrainConfig(), dict(
        model="cifar_densenet", model_kwargs={"depth": 10, "growth_rate": 4, "bc": True}, data="synthetic",
        epochs=1, batch_size=64, train_subset=128, val_size=128, eval_batch_size=500, lr=0.05, progress=False,
        precision="fp32", threads=1, out=str(out)), "test")
    with small_test_split():
        train(cfg)
    return out


def _png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_gradients_prints_ratios_at_init_and_trained(study, tmp_path):
    code, out, err = run_cli(["analyze", "gradients", "--study", str(study), "--out", str(tmp_path),
                              "--batches", "1", "--batch-size", "64"])
    assert code == 0, err
    for net in NETS:
        for stage in ("init", "trained"):
            line = re.search(rf"{net}\s+{stage}: first/last conv gradient-norm ratio (\S+)", out)
            assert line, f"no ratio for {net} {stage} in:\n{out}"
            assert float(line.group(1)) > 0
    reports = json.loads((tmp_path / "gradients.json").read_text())
    assert set(reports) == {f"{net} ({stage})" for net in NETS for stage in ("init", "trained")}
    # The printed ratio is the one saved.
    printed = float(re.search(r"plain14\s+init: first/last conv gradient-norm ratio (\S+)", out).group(1))
    assert reports["plain14 (init)"]["ratio_first_last"] == pytest.approx(printed, rel=2e-3)
    # Plain and residual twins of one depth share a figure.
    for depth in DEPTHS:
        _png(tmp_path / f"gradients_depth{depth}.png")
    assert not (tmp_path / "gradients.png").exists()


@pytest.mark.parametrize("analysis, expect", [("responses", r"plain8: \d+ layers, response std mean"),
                                              ("lesion", r"resnet14: baseline [\d.]+% error; \d+/\d+ blocks removable")])
def test_responses_and_lesion_write_figures_and_json(analysis, expect, study, tmp_path):
    code, out, err = run_cli(["analyze", analysis, "--study", str(study), "--out", str(tmp_path),
                              "--batches", "1", "--batch-size", "50"])
    assert code == 0, err
    assert re.search(expect, out), out
    reports = json.loads((tmp_path / f"{analysis}.json").read_text())
    assert set(reports) == set(NETS)
    for depth in DEPTHS:
        _png(tmp_path / f"{analysis}_depth{depth}.png")


def test_analysis_goes_into_the_study_by_default(study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study / "resnet8-seed0", copy / "resnet8-seed0", symlinks=True)
    code, _, err = run_cli(["analyze", "responses", "--study", str(copy), "--batches", "1", "--batch-size", "50"])
    assert code == 0, err
    assert json.loads((copy / "analysis" / "responses.json").read_text()).keys() == {"resnet8"}
    _png(copy / "analysis" / "responses.png")  # one depth: one figure, no depth suffix


@pytest.mark.parametrize("analysis", ["gradients", "responses", "lesion"])
def test_a_two_seed_study_draws_every_net_over_its_seeds(analysis, study, tmp_path, monkeypatch):
    """Two nets x two seeds: each net is one line of the figure (mean and band), printed with its
    spread, and saved with both runs; no run is labelled by its checkpoint folder."""
    from resdense import plots

    for net in ("plain8", "resnet8"):
        for seed in (0, 1):
            shutil.copytree(study / f"{net}-seed0", tmp_path / "s" / f"{net}-seed{seed}", symlinks=True)
    drawn: list[dict[str, Any]] = []
    name = {"gradients": "plot_gradient_norms", "responses": "plot_layer_responses", "lesion": "plot_lesion"}[analysis]
    real = getattr(plots, name)
    monkeypatch.setattr(plots, name, lambda reports, path, **kw: drawn.append(dict(reports)) or real(reports, path, **kw))
    code, out, err = run_cli(["analyze", analysis, "--study", str(tmp_path / "s"), "--batches", "1", "--batch-size", "50"])
    assert code == 0, err
    assert "last" not in out.split() and "(2 seeds:" in out
    [members] = drawn  # one depth: one figure with both nets
    keys = {"plain8", "resnet8"} if analysis != "gradients" else {f"{n} ({s})" for n in ("plain8", "resnet8")
                                                                   for s in ("init", "trained")}
    assert set(members) == keys and all(len(v) == 2 for v in members.values())
    saved = json.loads((tmp_path / "s" / "analysis" / f"{analysis}.json").read_text())
    assert set(saved) == keys
    assert all(set(v["runs"]) == {k.split(" ")[0] + "-seed0", k.split(" ")[0] + "-seed1"} for k, v in saved.items())
    _png(tmp_path / "s" / "analysis" / f"{analysis}.png")


def test_reuse_on_a_densenet_writes_the_heatmap(densenet_run):
    code, out, err = run_cli(["analyze", "reuse", "--checkpoint", str(densenet_run)])
    assert code == 0, err
    assert "densenet10: 3 dense blocks" in out
    _png(densenet_run / "analysis" / "reuse_densenet10.png")
    report: dict[str, Any] = json.loads((densenet_run / "analysis" / "reuse.json").read_text())["densenet10"]
    assert len(report["blocks"]) == 3


def test_reuse_without_a_densenet_exits_2(study, tmp_path):
    code, out, err = run_cli(["analyze", "reuse", "--study", str(study), "--out", str(tmp_path / "a")])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "DenseNet" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "a").exists()  # refused before writing anything


@pytest.mark.parametrize("argv, expect", [
    (["analyze", "gradients", "--study", "{tmp}"], "no trained runs"),
    (["analyze", "lesion", "--study", "{tmp}/missing"], "no trained runs"),
    (["analyze", "responses", "--checkpoint", "{tmp}/missing"], "no such checkpoint"),
    (["analyze", "responses", "--checkpoint", "{tmp}"], "holds no checkpoint"),
    (["analyze", "gradients"], "--study"),                       # neither source
    (["analyze", "pictures", "--study", "{tmp}"], "invalid choice"),
])
def test_bad_analyze_input_exits_2_with_one_line(argv, expect, tmp_path):
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expect in lines[0]
    assert not (tmp_path / "missing").exists() and not (tmp_path / "analysis").exists()  # nothing created


def test_empty_study_exits_2_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-m", "resdense", "analyze", "gradients", "--study", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no trained runs" in proc.stderr
