"""A study and a DDP run on a real one-node Slurm (Debian's slurm-wlm, started by the fixture):
a job array of study workers trains each run once and ends with the one-process table; a task
requeued mid-run continues its run to the same results; ``study status`` names the Slurm job of
each running run; ``srun --ntasks=2`` trains as two gloo ranks. Without Slurm (or root) these
skip and say why; the Slurm-free parts (flags, script, locking, retries) run everywhere."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from resdense.studies import engine
from resdense.studies.slurm import LOGS, SCRIPT
from resdense.train import checkpoint as ckpt
from resdense.train import runner
from resdense.runlock import owner
from resdense.train.distributed import launch_env
from slurm_cluster import SlurmCluster, unavailable

# Four runs (plain and ResNet at depths 8 and 14, one seed) of 32 steps each: long enough to be
# caught mid-run, short enough for a 2-core machine.
STUDY = ["study", "degradation", "--preset", "smoke", "--data", "synthetic", "--seeds", "0", "--depths", "8,14",
         "--set", "train_subset=256", "--set", "epochs=2", "--set", "precision=fp32", "--set", "threads=1",
         "--set", "tensorboard=False"]
RUNS = ("plain8-seed0", "resnet8-seed0", "plain14-seed0", "resnet14-seed0")


@pytest.fixture(scope="session")
def slurm():
    """A one-node Slurm for this test session; skips (saying why) where it cannot start."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        pytest.skip(f"a one-node Slurm did not start here: {str(e)[:300]}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same study in one process: the table every Slurm variant must end with."""
    out = tmp_path_factory.mktemp("slurm-reference") / "study"
    code, _, err = run_cli([*STUDY, "--out", str(out)])
    assert code == 0, err
    return _table(out)


def _submit(slurm, monkeypatch, out: Path, *flags: str) -> str:
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    code, stdout, err = run_cli([*STUDY, "--out", str(out), "--slurm", *flags])
    assert code == 0, err
    assert f"script: {out / SCRIPT}" in stdout and "follow: resdense study status" in stdout
    return re.search(r"submitted Slurm job (\d+)", stdout).group(1)


def _logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / LOGS).glob("*.out")))


def _table(out: Path) -> list:
    """The study's group table, less the wall times (which no two runs share)."""
    rows = json.loads((out / "table.json").read_text())["table"]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def test_an_array_of_three_tasks_trains_each_run_once_and_ends_with_the_one_process_table(
        slurm, reference, tmp_path, monkeypatch):
    out = tmp_path / "study"
    job = _submit(slurm, monkeypatch, out, "--array-size", "3")
    assert "#SBATCH --array=0-2%3" in (out / SCRIPT).read_text()
    seen_running, deadline = [], time.monotonic() + 150
    while any(line.startswith(job) for line in slurm.jobs()) and time.monotonic() < deadline:
        code, status, err = run_cli(["study", "status", str(out)])
        assert code == 0, err
        seen_running += [ln for ln in status.splitlines() if ln.strip().startswith("running")]
        time.sleep(0.5)
    slurm.wait_done(job, timeout=10)
    assert any(f"Slurm job {job}_" in ln and f"on {slurm.host}" in ln for ln in seen_running), seen_running
    logs = _logs(out)
    assert len(list((out / LOGS).glob(f"{job}_*.out"))) == 3
    for run in RUNS:
        assert logs.count(f"{run}: training") == 1 and f"{run}: resuming" not in logs, logs[-3000:]
    assert logs.count(f"report: {out}/report.html and") == 1  # the task that finished the last run wrote it
    assert _table(out) == reference
    code, status, _ = run_cli(["study", "status", str(out)])
    assert "4 runs: 4 done, 0 running, 0 waiting, 0 failed" in status and f"report: {out}/report.html" in status


def _mid_run(out: Path, skip: tuple = ()) -> object:
    """The run (not one of ``skip``) a process trains past its first epoch of two, or None."""
    for name in RUNS:
        run_dir, holder = out / name, owner(out / name)
        metrics = run_dir / "metrics.jsonl"
        if name not in skip and holder and metrics.is_file() and len(metrics.read_text().splitlines()) == 1 \
                and not engine.finished(run_dir):
            return name
    return None


def _interrupt_mid_run(slurm, out: Path, task: str, command: list[str], deadline: float, skip: tuple = ()) -> str:
    """Wait until ``task`` trains a run past its first epoch, run ``command`` (a signal), wait for the
    task to be back in the queue and let it start at once; return the run it interrupted."""
    while _mid_run(out, skip) is None:
        assert time.monotonic() < deadline and slurm.jobs(), slurm.jobs()
        time.sleep(0.05)
    run = _mid_run(out, skip)
    assert slurm.run(*command).returncode == 0
    while not any(line.startswith(task) and "PENDING" in line for line in slurm.jobs()):
        assert time.monotonic() < deadline, slurm.jobs()
        time.sleep(0.2)
    # Slurm holds a requeued job back for two minutes (BeginTime); the test does not wait for that.
    slurm.run("scontrol", "update", f"jobid={task}", "starttime=now", check=True)
    return run


def test_a_task_requeued_mid_run_continues_it_to_the_uninterrupted_results(slurm, reference, tmp_path, monkeypatch):
    """First the time-limit warning (USR1 to the batch shell, as --signal=B:USR1@N sends it): the
    worker checkpoints and requeues its task; then `scontrol requeue`: it checkpoints, Slurm requeues."""
    out = tmp_path / "study"
    job = _submit(slurm, monkeypatch, out, "--array-size", "1")
    task, deadline = f"{job}_0", time.monotonic() + 150
    first = _interrupt_mid_run(slurm, out, task, ["scancel", "--batch", "--signal=USR1", task], deadline)
    # Another run: the resumed one may still be starting (no handler yet: SIGTERM would just end it).
    second = _interrupt_mid_run(slurm, out, task, ["scontrol", "requeue", task], deadline, skip=(first,))
    slurm.wait_done(job, timeout=120)
    assert "Restarts=2" in slurm.run("scontrol", "show", "job", task).stdout
    logs = _logs(out)
    assert "stopped by SIGUSR1" in logs and logs.count(f"requeued Slurm job {job}") == 1  # by the worker, on USR1
    assert "stopped by SIGTERM" in logs  # scontrol requeue: Slurm requeued it
    assert re.findall(r"(\S+): resuming", logs) == [first, second], logs[-3000:]
    assert _table(out) == reference


def test_srun_two_tasks_train_as_two_gloo_ranks_matching_one_process(slurm, tmp_path):
    from test_distributed import ARGS, _reference_weights, reference_config

    args = [*ARGS[:ARGS.index("--epochs")], "--epochs", "1", *ARGS[ARGS.index("--epochs") + 2:]]  # one epoch will do
    run = tmp_path / "ddp"
    proc = slurm.run("srun", "--ntasks=2", "--cpus-per-task=1", sys.executable, "-m", "resdense", "train", *args,
                     "--out", str(run), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1  # only rank 0 logs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _reference_weights(reference_config(epochs=1))
    finally:
        torch.set_num_threads(threads)
    ddp = ckpt.read_weights(run / "last")
    for name, ref in reference.items():
        assert torch.allclose(ddp[name], ref, atol=2e-5, rtol=1e-4), f"{name}: max diff {(ddp[name] - ref).abs().max():.3g}"


# --- without Slurm -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expect", [
    (["--partition", "gpu"], "--partition is a Slurm setting: add --slurm"),
    (["--slurm", "--time", "4 hours"], "--time must be a Slurm time limit"),
    (["--slurm", "--partition", "a b"], "--partition must be a Slurm partition name"),
    (["--slurm", "--array-size", "0"], "--array-size: must be from 1 to 10000"),
    (["--slurm", "--signal-lead", "5"], "--signal-lead: must be from 10 to 3600"),
    (["--slurm", "--gpus-per-task", "99"], "--gpus-per-task: must be from 0 to 16"),
    (["--slurm", "--sbatch-arg", "account=abc"], "--sbatch-arg takes one sbatch option"),
    (["--retries", "11"], "--retries: must be from 0 to 10"),
])
def test_bad_slurm_flags_exit_2_in_one_line_before_anything_is_written(flags, expect, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: never reached
    code, _, err = run_cli([*STUDY, "--out", str(tmp_path / "s"), *flags])
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_without_sbatch_slurm_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = run_cli([*STUDY, "--out", str(tmp_path / "s"), "--slurm"])
    assert code == 2 and "needs Slurm's sbatch on PATH" in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_working_locks_is_refused_in_one_line(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    code, _, err = run_cli([*STUDY, "--out", str(tmp_path / "s")])
    assert code == 2 and "file locks do not work in" in err and "ENOLCK" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_failing_run_is_retried_then_reported_failed_and_the_others_finish(tmp_path, monkeypatch):
    real, calls = runner.train, []

    def flaky(cfg, **kwargs):
        calls.append(Path(cfg.out).name)
        if Path(cfg.out).name == "resnet8-seed0":
            raise RuntimeError("simulated crash")
        return real(cfg, **kwargs)

    monkeypatch.setattr(runner, "train", flaky)
    out = tmp_path / "s"
    code, stdout, err = run_cli([*STUDY, "--set", "train_subset=16", "--set", "epochs=1", "--retries", "1",
                                 "--out", str(out)])
    assert code == 1 and "1 run(s) failed after 2 attempt(s) each (resnet8-seed0)" in err, err
    assert calls.count("resnet8-seed0") == 2 and all(calls.count(r) == 1 for r in RUNS if r != "resnet8-seed0")
    assert json.loads((out / "resnet8-seed0" / engine.FAILED_FILE).read_text())["attempts"] == 2
    assert not (out / "report.html").exists()
    code, status, _ = run_cli(["study", "status", str(out)])
    assert "3 done, 0 running, 0 waiting, 1 failed" in status
    assert "failed   resnet8-seed0: 2 attempts, last: RuntimeError: simulated crash" in status


def test_a_worker_signalled_outside_training_stops_in_one_line_with_the_signals_exit_code(tmp_path, monkeypatch):
    """The time-limit warning between two runs (or while one starts) ends the worker as a stop,
    exit 128 + SIGUSR1, so the task is requeued, instead of USR1's default: killed, not requeued."""
    real = runner.train

    def signalled_first(cfg, **kwargs):
        if Path(cfg.out).name == "resnet8-seed0":  # the second run, before its training loop
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(cfg, **kwargs)

    monkeypatch.setattr(runner, "train", signalled_first)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # nothing to requeue here
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        code, stdout, err = run_cli([*STUDY, "--set", "train_subset=16", "--set", "epochs=1", "--slurm-worker",
                                     "--out", str(tmp_path / "s")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 128 + signal.SIGUSR1 and "stopped by SIGUSR1 outside a run's training" in err, err
    assert (tmp_path / "s" / "plain8-seed0" / "summary.json").is_file()
    assert not (tmp_path / "s" / "resnet8-seed0" / "config.json").exists()


def test_status_of_a_folder_that_is_not_a_study_is_one_line(tmp_path):
    code, _, err = run_cli(["study", "status", str(tmp_path)])
    assert code == 2 and "is not a study folder" in err and len(err.strip().splitlines()) == 1


def test_srun_environment_gives_rank_world_size_and_rendezvous():
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "PATH": ""}
    place = launch_env(env)
    assert place["rank"] == 3 and place["world_size"] == 4 and place["local_rank"] == 1
    assert place["init_method"].startswith("tcp://gpu07:")
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None  # a batch script's shell is one process
    assert launch_env({"WORLD_SIZE": "2", "RANK": "1"})["init_method"] == "env://"
