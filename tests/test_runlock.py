"""One writer per run directory: a second process is refused with the first one's id, a killed
process leaves no lock behind, and study processes sharing a folder train each run once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from resdense.errors import UserError
from resdense.runlock import RunLock, RunLockedError, owner
from resdense.train.config import TrainConfig
from resdense.train.runner import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
TINY = ["--data", "synthetic", "--model", "cifar_resnet", "-a", "depth=8", "--epochs", "1", "--batch-size", "32",
        "--train-subset", "64", "--precision", "fp32", "--threads", "1", "--no-progress"]


def _holder(run_dir: Path) -> subprocess.Popen:
    """A process that locks ``run_dir`` and sleeps until killed."""
    code = textwrap.dedent(f"""
        import time
        from resdense.runlock import RunLock
        RunLock({str(run_dir)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_with_the_first_ones_pid(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        assert owner(run_dir)["pid"] == holder.pid
        proc = subprocess.run([sys.executable, "-m", "resdense", "train", *TINY, "--out", str(run_dir)],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"process {holder.pid}" in lines[0] and "Traceback" not in proc.stderr
        # --resume is refused the same way, and nothing of the holder's is touched
        cfg = TrainConfig(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic", epochs=1, batch_size=32,
                          train_subset=64, precision="fp32", out=str(run_dir), progress=False)
        with pytest.raises(RunLockedError, match=str(holder.pid)):
            train(cfg, resume=True)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_gone_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    assert not RunLock(run_dir).try_acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert owner(run_dir) is None  # the kernel dropped it: no stale lock to clean
    lock = RunLock(run_dir)
    assert lock.try_acquire()
    lock.release()


def test_lock_in_one_process_is_released_after_train(tmp_path):
    cfg = TrainConfig(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic", epochs=1, batch_size=32,
                      train_subset=64, precision="fp32", threads=1, out=str(tmp_path / "run"), progress=False)
    train(cfg)
    assert owner(tmp_path / "run") is None
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg)  # the .lock file alone is not a run, but a finished run is


def test_two_study_processes_share_the_runs(tmp_path):
    """Two `resdense study` processes on one folder (one of them with --jobs 2): every run is
    trained exactly once, and the last to finish writes the report."""
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "resdense", "study", "degradation", "--data", "fashion-mnist", "--depths", "8,14",
            "--seeds", "0", "--set", "train_subset=128", "--set", "epochs=2", "--set", "batch_size=32",
            "--set", "val_size=200", "--set", "test_subset=200", "--set", "eval_batch_size=200",
            "--set", "precision=fp32", "--set", "threads=1", "--out", str(out)]
    a = subprocess.Popen([*argv, "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    time.sleep(0.5)
    b = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, err_a + err_b
    names = ["plain8-seed0", "resnet8-seed0", "plain14-seed0", "resnet14-seed0"]
    by_b = {n for n in names if f"{n}: training (pid {b.pid})" in out_b}
    by_a = {n for n in names if (out / n / "train.log").is_file()}  # --jobs workers log beside the run
    assert by_a | by_b == set(names) and not by_a & by_b, (by_a, by_b)
    for n in names:
        epochs = [json.loads(line)["epoch"] for line in (out / n / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2], (n, epochs)  # trained once: no epoch written twice
        if n in by_a:
            assert (out / n / "train.log").read_text().count("training cifar_") == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert "report:" in out_a + out_b


def test_ctrl_c_stops_a_parallel_study_with_checkpoints_and_the_same_command_continues(tmp_path):
    """Ctrl-C (SIGINT to the whole process group) during `--jobs 2`: each job finishes its step and
    checkpoints, the study prints one line and exits 130; the same command then finishes the study."""
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "resdense", "study", "degradation", "--data", "fashion-mnist", "--depths", "8,14",
            "--seeds", "0", "--set", "train_subset=1000", "--set", "epochs=6", "--set", "batch_size=32",
            "--set", "val_size=200", "--set", "test_subset=200", "--set", "eval_batch_size=200",
            "--set", "precision=fp32", "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # both jobs are past their first epoch
        if len(list(out.glob("*/metrics.jsonl"))) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr and "run the same `resdense study` command" in lines[0]
    stopped = [p for p in out.glob("*/last") if not (p.parent / "summary.json").is_file()]
    assert stopped, "no run was stopped mid-way"
    again = subprocess.run([a for a in argv], capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    for run in stopped:
        log = (run.parent / "train.log").read_text()
        assert "resuming" in log  # continued from its checkpoint, not from scratch
        assert [json.loads(x)["epoch"] for x in (run.parent / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
