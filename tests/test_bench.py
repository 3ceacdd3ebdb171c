"""Benchmarks in quick mode: they run, and their rows and files are well formed. No timing is
ever asserted (the numbers of a quick run mean nothing)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import resdense

from resdense.bench import BENCHMARKS, BenchOptions, run_benchmarks
from resdense.bench import memory, scaling
from resdense.bench._common import format_table, with_threads
from resdense.errors import ConfigError

# One thread: on a CPU shared with other jobs, OpenMP threads waiting on descheduled peers make
# two-thread runs of tiny models many times slower.
QUICK = dict(quick=True, threads=1, verbose=False)


def run_cli(argv: list[str]) -> int:
    """`resdense ARGV` in this process; returns the exit code."""
    from resdense.cli import main

    return main(argv)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_cli_bench_memory_quick(tmp_path, capsys):
    """The real thing: one fresh process per case, peak RSS, JSON on disk."""
    assert run_cli(["bench", "memory", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mem-eff" in out and "goal" in out
    doc = json.loads((tmp_path / "memory.json").read_text())
    assert doc["benchmark"] == "memory" and doc["quick"] is True and doc["env"]["torch"] == torch.__version__
    rows = doc["rows"]
    assert [r["kwargs"]["memory_efficient"] for r in rows] == [False, True]
    for r in rows:
        assert r["peak_valid"] is True and r["method"].startswith("VmHWM")
        assert _finite(r["step_mb"]) and r["step_mb"] > 0 and r["peak_mb"] >= r["baseline_mb"] > 0
        assert _finite(r["step_s"]) and r["step_s"] > 0 and r["params"] > 0
    plain, eff = rows
    assert eff["mem_ratio"] == pytest.approx(eff["step_mb"] / plain["step_mb"])
    assert eff["time_ratio"] == pytest.approx(eff["step_s"] / plain["step_s"])
    assert isinstance(eff["goal_met"], bool)


def test_measure_train_step_in_process():
    before = torch.get_num_threads()
    try:
        row = memory.measure_train_step(memory.TrainStepCase("cifar_resnet", {"depth": 8}, (3, 16, 16), batch=3,
                                                              steps=2, threads=1))
    finally:
        torch.set_num_threads(before)
    assert row["params"] == 75_290 and row["batch"] == 3 and len(row["step_times_s"]) == 2
    assert row["step_mb"] >= 0 and row["peak_mb"] >= row["baseline_mb"]


# The tolerance follows the arithmetic the row used: fp32 matches eager to rounding; bf16 keeps
# about three significant digits through twenty layers.
TOLERANCE = {"fp32": 1e-4, "bfloat16": 5e-2}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_quick(tmp_path, precision):
    # Each precision path is forced, so the test means the same on every CPU.
    rows = BENCHMARKS["inference"](BenchOptions(out_dir=tmp_path, precision=precision, **QUICK))
    assert [r["variant"] for r in rows] == ["eager", "resdense", "onnxruntime"]
    assert [r["precision"] for r in rows] == ["fp32", "fp32" if precision == "fp32" else "bfloat16", "fp32"]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["rel_diff"] <= TOLERANCE[r["precision"]]
        # achieved FLOP/s = 2 x MACs per image x images/s, over the peak of the row's precision
        macs = resdense.model_info("resnet20", input_size=(3, 32, 32)).macs
        assert r["achieved_gflops"] == pytest.approx(2 * macs * r["throughput_ips"] / 1e9)
        assert r["share_of_peak"] == pytest.approx(r["achieved_gflops"] / r["peak_gflops"]) and r["share_of_peak"] > 0
        assert _finite(r["latency_ms"]) and r["latency_ms"] > 0 and r["throughput_ips"] > 0
    assert rows[0]["max_abs_diff"] == 0 and rows[0]["speedup_vs_eager"] == 1
    doc = json.loads((tmp_path / "inference.json").read_text())
    assert doc["rows"] == json.loads(json.dumps(rows))


def test_peak_quick_measures_both_precisions(tmp_path):
    rows = BENCHMARKS["peak"](BenchOptions(out_dir=tmp_path, **QUICK))
    assert [r["dtype"] for r in rows] == ["fp32", "bfloat16"]
    for r in rows:
        assert r["tflops"] == pytest.approx(2 * r["n"] ** 3 / r["best_s"] / 1e12) and r["tflops"] > 0
        assert r["calls"] >= 3
    assert rows[0]["native"] is True and isinstance(rows[1]["native"], bool)
    assert json.loads((tmp_path / "peak.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_scaling_quick_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    # In-process measurement keeps this fast; the fresh-process path is covered by the memory test.
    monkeypatch.setattr(scaling, "train_step_row", memory.measure_train_step)
    rows = scaling.run(BenchOptions(out_dir=tmp_path, quick=True, threads=1))
    assert {r["series"] for r in rows} == {"resnet", "plain", "densenet-bc", "densenet-bc mem-eff"}
    by_series = {r["series"]: r for r in rows}
    assert by_series["resnet"]["params"] == by_series["plain"]["params"]  # twins differ only in shortcuts
    assert all(r["ms_per_image"] == pytest.approx(1e3 * r["step_s"] / r["batch"]) for r in rows)
    assert "densenet-bc mem-eff L=10" in capsys.readouterr().out
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["figure"].endswith("scaling.png")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_add_ratios_and_goal():
    rows = [{"pair": "a", "kwargs": {"memory_efficient": False}, "step_mb": 100.0, "step_s": 2.0},
            {"pair": "a", "kwargs": {"memory_efficient": True}, "step_mb": 40.0, "step_s": 2.4},
            {"pair": "b", "kwargs": {"memory_efficient": False}, "step_mb": 100.0, "step_s": 1.0},
            {"pair": "b", "kwargs": {"memory_efficient": True}, "step_mb": 40.0, "step_s": 1.5}]
    memory.add_ratios(rows, ["a", "b"])
    assert rows[1]["mem_ratio"] == pytest.approx(0.4) and rows[1]["time_ratio"] == pytest.approx(1.2)
    assert rows[1]["goal_met"] is True and rows[3]["goal_met"] is False  # 1.5x the time is too slow
    assert "mem_ratio" not in rows[0]


def test_format_table_aligns_and_marks_missing():
    table = format_table([{"a": "x", "b": 1.5}, {"a": "longer", "b": None}], [("a", "name", "s"), ("b", "val", ".2f")])
    lines = table.splitlines()
    assert lines[0].split() == ["name", "val"] and lines[1].split() == ["x", "1.50"] and lines[2].split() == ["longer", "-"]
    assert len({len(line) for line in lines}) == 1


def test_registry_hook_and_threads_restored():
    assert {"memory", "inference", "scaling"} <= set(BENCHMARKS)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        run_benchmarks(["nope"], BenchOptions(quick=True))
    before = torch.get_num_threads()
    seen = []
    with_threads(lambda opts: seen.append(torch.get_num_threads()) or [])(BenchOptions(threads=1))
    assert seen == [1] and torch.get_num_threads() == before


def test_time_to_accuracy_quick_reports_both_ways(tmp_path):
    """Smoke test on 1,024 real Fashion-MNIST images, one epoch each way: rows, times, speedups."""
    rows = BENCHMARKS["time-to-accuracy"](BenchOptions(out_dir=tmp_path, precision="fp32", **QUICK))
    assert [r["way"] for r in rows] == ["usual", "resdense"]
    for r in rows:
        assert r["epochs"] == 1 and 0 <= r["final_accuracy"] <= 1 and r["wall_s"] > 0
        assert r["precision"] == "fp32"
        for key in ("time_to_0.50", "time_to_0.60"):
            reached = r["curve"][0]["test_accuracy"] >= float(key.rsplit("_", 1)[1])
            assert (r[key] == r["curve"][0]["wall_s"]) if reached else r[key] is None
    doc = json.loads((tmp_path / "tta.json").read_text())
    assert doc["targets"] == [0.5, 0.6] and doc["rows"] == json.loads(json.dumps(rows))


def test_a_process_capped_at_avx2_runs_and_records_fp32(tmp_path):
    """One CPU standing in for an AVX2-only one (the cap must be set before torch loads, hence a
    fresh process): bf16 counts as emulated whatever /proc/cpuinfo says, and the JSON says so."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    proc = subprocess.run([sys.executable, "-m", "resdense", "bench", "peak", "--quick", "--threads", "1",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "peak.json").read_text())
    assert doc["env"]["isa_cap"] == "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
    assert doc["env"]["cpu_capability"] in ("AVX2", "DEFAULT")  # DEFAULT on a CPU without AVX2
    assert doc["env"]["bf16_native"] is False
    assert [(r["dtype"], r["native"]) for r in doc["rows"]] == [("fp32", True), ("bfloat16", False)]
