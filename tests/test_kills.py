"""SIGKILL a real `resdense train` at chosen moments, inside checkpoint writes included, resume
each time, and end with the weights and metrics of a run that was never stopped.

A small wrapper script (written here, not shipped) imports resdense, wraps a few of its functions
to print a marker at a moment of interest, and, at the one occurrence the test names, sleeps
there so the kill lands exactly at that moment. The runs form a chain: each resumed process is
killed at the next moment, and the last one finishes. A resume that was not exact would leave a
difference in the final weights (nothing later can undo it), so the final comparison checks
every resume of the chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from resdense.train import checkpoint as ckpt
from resdense.train.config import apply_overrides
from resdense.train.runner import train

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "2", "--batch-size", "64",
        "--train-subset", "512", "--set", "eval_batch_size=256", "--no-progress", "--precision", "fp32",
        "--threads", "1", "--lr", "0.05", "--checkpoint-every", "3"]

WRAPPER = textwrap.dedent('''
    import os, sys, time
    from resdense.train import checkpoint as ckpt, engine, runner

    name, _, nth = os.environ["KILL_AT"].partition(":")
    seen = {}

    def marker(label):
        seen[label] = seen.get(label, 0) + 1
        print(f"@{label} {seen[label]}", flush=True)
        if label == name and seen[label] == int(nth):
            time.sleep(60)  # the test kills us here

    def wrap(owner, attr, label, after=False, when=lambda *a: True):
        real = getattr(owner, attr)
        def wrapper(*args, **kwargs):
            if not after and when(*args):
                marker(label)
            out = real(*args, **kwargs)
            if after and when(*args):
                marker(label)
            return out
        setattr(owner, attr, wrapper)

    wrap(ckpt, "save_file", "weights-written", after=True)       # temp dir holds the weights only
    wrap(ckpt, "_point", "renamed", when=lambda link, t: link.name == "last")   # renamed, `last` not yet swapped
    wrap(ckpt, "_remove_unreferenced", "linked")                 # `last` swapped, old checkpoints not yet removed
    wrap(runner, "_write_metrics", "metrics")                    # epoch checkpoint written, metrics not yet
    wrap(engine.F, "cross_entropy", "step")                      # inside a training step
    wrap(runner, "final_evaluation", "final-eval")               # all trained, the test set not yet read
    from resdense.cli import main
    sys.exit(main(sys.argv[1:]))
''')

# (moment, its occurrence in that process): each process resumes where the previous one was killed.
CHAIN = [("weights-written", 1), ("renamed", 2), ("linked", 1), ("metrics", 1), ("step", 5), ("final-eval", 1)]


def _assert_loadable(run: Path) -> None:
    point = ckpt.find_resume_point(run)
    if point is None:
        assert not (run / "last").exists() or not (run / "last").resolve().exists()
        return
    ckpt.check_state(ckpt.read_state(point), point)
    ckpt.read_weights(point)
    ckpt.read_meta(point)


def test_sigkill_at_many_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    from resdense.cli import build_parser
    from resdense.cli.train import config_from_args

    whole = tmp_path / "whole"
    cfg, _ = config_from_args(build_parser().parse_args(["train", *TINY, "--out", str(whole)]))
    train(apply_overrides(cfg, {"checkpoint_every": None}, "test"))  # checkpoints must not change the result

    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    run = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for i, (moment, nth) in enumerate(CHAIN):
        argv = [sys.executable, str(script), "train", *TINY, "--out", str(run), *(["--resume"] if i else [])]
        proc = subprocess.Popen(argv, env={**env, "KILL_AT": f"{moment}:{nth}"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        target = f"@{moment} {nth}"
        for line in proc.stdout:
            if line.strip() == target:
                proc.send_signal(signal.SIGKILL)
                break
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"{target}: the run ended with {proc.returncode} before it"
        _assert_loadable(run)
    done = subprocess.run([sys.executable, "-m", "resdense", "train", *TINY, "--out", str(run), "--resume"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wa, wb = ckpt.read_weights(whole / "last"), ckpt.read_weights(run / "last")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    keys = ("epoch", "step", "lr", "train_loss", "train_error", "val_loss", "val_error")
    rows = [[{k: r[k] for k in keys} for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
            for d in (whole, run)]
    assert rows[0] == rows[1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_error_last"] == json.loads((whole / "summary.json").read_text())["test_error_last"]
    assert sorted(p.name for p in run.rglob(".*")) == [".lock"]  # the killed writers' temporaries are gone
