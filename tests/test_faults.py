"""Faults a trusted trainer survives: a full disk (injected, and a real small tmpfs), SIGTERM and
Ctrl-C at step boundaries (also inside evaluation), mid-epoch checkpoints that resume to the very
weights and metrics of an uninterrupted run, and warnings that must not leak onto the screen."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from resdense.cli import main
from resdense.errors import CheckpointError, WriteError
from resdense.train import checkpoint as ckpt
from resdense.train import engine, runner
from resdense.train.config import TrainConfig, apply_overrides
from resdense.train.runner import train
from resdense.train.stop import StopNow, TrainingStopped

SRC = Path(__file__).resolve().parents[1] / "src"
SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 794304 vs 794256"
TINY = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "2", "--batch-size", "64",
        "--train-subset", "512", "--set", "eval_batch_size=256", "--no-progress", "--precision", "fp32",
        "--threads", "1", "--lr", "0.05"]


def cfg(out: Path, **overrides) -> TrainConfig:
    """The run TINY describes on the command line (the quick recipe; 8 steps per epoch, 2 epochs)."""
    from resdense.cli import build_parser
    from resdense.cli.train import config_from_args

    base, _ = config_from_args(build_parser().parse_args(["train", *TINY, "--out", str(out)]))
    return apply_overrides(base, overrides, "test")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to."""
    run = tmp_path_factory.mktemp("faults") / "whole"
    train(cfg(run))
    return run


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = ckpt.read_weights(a / "last"), ckpt.read_weights(b / "last")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    keys = ("epoch", "step", "lr", "train_loss", "train_error", "val_loss", "val_error", "train_size")
    rows = [[{k: r[k] for k in keys} for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
            for d in (a, b)]
    assert rows[0] == rows[1]  # the resumed epoch's row too: its running sums were restored


def leftovers(run: Path) -> list[str]:
    """Temporary files or directories anywhere in the run (the lock file is not one)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock")


def signal_at_call(monkeypatch, calls: dict[int, int]) -> None:
    """Raise signal ``calls[n]`` inside the n-th training forward pass (a step in progress)."""
    real = engine.F.cross_entropy
    count = {"n": 0}

    def cross_entropy(*args, **kwargs):
        count["n"] += 1
        if count["n"] in calls:
            signal.raise_signal(calls[count["n"]])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.F, "cross_entropy", cross_entropy)


# --- SIGTERM / Ctrl-C ---------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])  # USR1: Slurm's time-limit warning
def test_a_signal_mid_epoch_finishes_the_step_checkpoints_it_and_resumes_exactly(whole, tmp_path, monkeypatch, signum):
    run = tmp_path / "cut"
    signal_at_call(monkeypatch, {11: signum})  # step 11 = epoch 2, batch 3
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg(run))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    assert stopped.value.exit_code == 128 + signum
    assert "step 11 (epoch 2, batch 3 of 8)" in str(stopped.value) and "--resume" in str(stopped.value)
    last = (run / "last").resolve()
    assert last.name == "step-0000011"
    state = ckpt.read_state(last)
    assert state["step"] == 11 and state["position"]["batch"] == 3 and state["position"]["epoch"] == 1
    assert not (run / "summary.json").exists() and leftovers(run) == []
    monkeypatch.undo()
    train(cfg(run), resume=True)
    assert_same_run(whole, run)


def test_checkpoint_every_n_steps_and_a_crash_after_it_resume_exactly(whole, tmp_path, monkeypatch):
    run = tmp_path / "cut"
    real = engine.F.cross_entropy
    count = {"n": 0}

    def crash_in_step_13(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 13:
            raise RuntimeError("power cut (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.F, "cross_entropy", crash_in_step_13)
    with pytest.raises(RuntimeError, match="power cut"):
        train(cfg(run, checkpoint_every=5))  # checkpoints at steps 5, 8 (epoch end), 10
    assert (run / "last").resolve().name == "step-0000010"
    monkeypatch.undo()
    train(cfg(run, checkpoint_every=5), resume=True)
    assert_same_run(whole, run)


def test_a_signal_during_validation_stops_there_and_the_resume_validates(whole, tmp_path, monkeypatch):
    run = tmp_path / "cut"
    real = engine.predict_logits
    count = {"n": 0}

    def predict(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 1:  # the first validation batch of epoch 1
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "predict_logits", predict)
    with pytest.raises(TrainingStopped, match="while validating epoch 1"):
        train(cfg(run))
    state = ckpt.read_state((run / "last").resolve())
    assert state["position"]["batch"] == 8 and state["step"] == 8 and state["metrics"] == []
    monkeypatch.undo()
    train(cfg(run), resume=True)
    assert_same_run(whole, run)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "cut"
    signal_at_call(monkeypatch, {11: signal.SIGINT, 12: signal.SIGINT})
    real_stop = engine.train_one_epoch

    def no_step_boundary(*args, **kwargs):  # the loop must not reach a boundary between the two
        kwargs["should_stop"] = None
        return real_stop(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", no_step_boundary)
    with pytest.raises(StopNow) as stopped:
        train(cfg(run))
    assert stopped.value.exit_code == 130
    message = str(stopped.value)
    assert "second Ctrl-C" in message and "epoch 1, step 8" in message and "--resume" in message
    assert (run / "last").resolve().name == "epoch-0001" and leftovers(run) == []


def test_sigterm_to_the_command_line_exits_143_with_one_line_and_resumes(whole, tmp_path):
    run = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "resdense", "train", *TINY, "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # SIGTERM once training has begun
        if line.startswith("training "):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "--resume" in lines[0], err
    assert ckpt.find_resume_point(run) is not None
    resumed = subprocess.run([sys.executable, "-m", "resdense", "train", *TINY, "--out", str(run), "--resume"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(whole, run)


# --- a full disk --------------------------------------------------------------------------------

def test_a_full_disk_at_the_second_checkpoint_is_one_line_and_keeps_the_first(whole, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real = ckpt.torch.save
    calls = {"n": 0}

    def short_write(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's state.pt, as torch reports a short write
            raise RuntimeError(SHORT_WRITE)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", short_write)
    assert main(["train", *TINY, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    for part in ("cannot write", "epoch-0002/state.pt", "disk is full", "free on its disk",
                 "previous checkpoint", "(end of epoch 1, step 8) is intact", "--resume"):
        assert part in line, line
    assert (run / "last").resolve().name == "epoch-0001" and leftovers(run) == []
    monkeypatch.undo()
    assert main(["train", *TINY, "--out", str(run), "--resume"]) == 0
    assert_same_run(whole, run)


def test_a_full_disk_writing_metrics_or_an_export_is_one_line(tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if ".metrics.jsonl." in target or ".model.safetensors." in target:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "metrics.jsonl: the disk is full" in line and "(end of epoch 1, step 8) is intact" in line
    assert leftovers(run) == []
    out = tmp_path / "exports" / "model.safetensors"
    assert main(["export", "--model", "cifar_resnet", "-a", "depth=8", "--format", "safetensors",
                 "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and f"cannot write {out}: the disk is full" in line
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real tmpfs (root only); yields a function that mounts it at a size and remounts it larger."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = []

    def mount(size_kb: int, remount: bool = False) -> Path:
        opts = f"{'remount,' if remount else ''}size={size_kb}k"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); needs root and CAP_SYS_ADMIN")
        mounted.append(mnt)
        return mnt

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_real_full_tmpfs_then_resume_after_freeing_space(whole, tiny_tmpfs, tmp_path):
    # Room for one checkpoint and a half: the first is written, the second cannot be.
    one = sum(f.stat().st_size for f in (whole / "last").resolve().iterdir())
    disk = tiny_tmpfs((one * 3 // 2) // 1024 + 64)
    run = disk / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    args = [sys.executable, "-m", "resdense", "train", *TINY, "--out", str(run)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the disk is full" in lines[0] and "(end of epoch 1, step 8) is intact" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and leftovers(run) == []
    ckpt.read_state((run / "last").resolve())  # the first checkpoint loads
    tiny_tmpfs(64 * 1024, remount=True)  # the user frees space
    proc = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(whole, run)


# --- warnings and damaged state files -----------------------------------------------------------

def test_refusing_a_pickled_state_shows_resdense_words_only(whole, tmp_path):
    import pickle

    bad = tmp_path / "ckpt"
    shutil.copytree((whole / "last").resolve(), bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (bad / "state.pt").write_bytes(pickle.dumps({"x": Evil()}, protocol=4))  # torch warns about protocol 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="pickled code"):
            ckpt.read_state(bad)
    assert caught == []


def test_a_state_that_loads_but_is_not_a_training_state_is_a_checkpoint_error(whole, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    last = (run / "last").resolve()
    state = ckpt.read_state(last)
    for damage in ({"step": "8"}, {"rng": {}}, {"metrics": [1, 2]},
                   {"position": {"epoch": 2, "batch": 3}}, {"optimizer": {"state": {}, "param_groups": []}}):
        torch.save({**state, **damage}, last / "state.pt")
        with pytest.raises(CheckpointError):
            train(cfg(run, epochs=3), resume=True, flag_overrides={"epochs": 3})


def test_write_errors_are_oserrors_too_so_caches_keep_tolerating_them(tmp_path, monkeypatch):
    from resdense import _io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.tempfile, "mkstemp", full)
    with pytest.raises(OSError) as info:
        _io.atomic_write_text(tmp_path / "x.json", "{}")
    assert isinstance(info.value, WriteError) and info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"cannot write {tmp_path / 'x.json'}: the disk is full")


# --- DDP: one rank's signal stops every rank at the same step -----------------------------------

def _ddp_rank(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist

    from resdense.train.stop import StopFlag

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        flag = StopFlag()
        answers = []
        for step in range(4):
            if rank == 1 and step == 2:
                flag.signum = signal.SIGTERM  # what the handler does on rank 1 only
            answers.append(flag.requested())
        results[rank] = (answers, flag.stopping)
    finally:
        dist.destroy_process_group()


def test_under_ddp_one_ranks_signal_stops_all_ranks_at_the_same_step():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(2, port, results), nprocs=2, join=True)
    assert results[0] == results[1] == ([False, False, True, True], signal.SIGTERM)
