"""`resdense train | eval | predict` from the command line, on synthetic and real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resdense.cli import main
from resdense.data import load_dataset

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TINY = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
        "--train-subset", "256", "--set", "eval_batch_size=256", "--no-progress", "--precision", "fp32"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    return run


def test_train_writes_a_run_and_eval_reports_test_error(trained_run, capsys):
    assert (trained_run / "summary.json").is_file()
    assert main(["eval", "--checkpoint", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "test error" in out and "confusion" in out
    report = json.loads((trained_run / "eval_test.json").read_text())
    assert sum(map(sum, report["confusion"])) == report["n"] > 0
    assert (trained_run / "confusion_test.png").stat().st_size > 1000


def test_predict_gives_topk_class_names(trained_run, tmp_path, capsys):
    splits = load_dataset("synthetic")
    paths = []
    for i in range(3):
        arr = splits.val.images[i, 0].numpy()
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).convert("RGB").save(path)  # an RGB file for a grayscale model: converted
        paths.append(str(path))
    assert main(["predict", "--checkpoint", str(trained_run), "--top-k", "2", "--json", *paths]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [len(r["top"]) for r in results] == [2, 2, 2]
    assert all(r["top"][0]["class"] in splits.classes for r in results)
    assert all(0 <= p["probability"] <= 1 for r in results for p in r["top"])


def test_record_gradients_stores_a_figure_per_epoch(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--record-gradients", "--out", str(run)]) == 0
    names = sorted(p.name for p in (run / "gradients").iterdir())
    assert names == ["epoch-0000.json", "epoch-0000.png", "epoch-0001.json", "epoch-0001.png"]
    report = json.loads((run / "gradients" / "epoch-0001.json").read_text())
    assert len(report["norms"]) == len(report["layer_names"]) > 5


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnt20", "--out", "{tmp}/a"], "did you mean resnet20"),
    (["train", "--recipe", "fastest", "--out", "{tmp}/a"], "unknown recipe"),
    (["train", "--lr", "-1", "--out", "{tmp}/a"], "--lr"),
    (["train", "--batch-size", "0", "--out", "{tmp}/a"], "--batch-size"),
    (["train", "--bogus", "--out", "{tmp}/a"], "unrecognized arguments: --bogus"),
    (["train", "--set", "nonsense=1", "--out", "{tmp}/a"], "unknown setting"),
    (["train", "--data", "mnist", "--data-dir", "{tmp}/nothing", "--out", "{tmp}/a"], "--download"),
    (["train", "--data", "{tmp}/no-such-folder", "--out", "{tmp}/a"], "{tmp}/no-such-folder"),
    (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/a"], "cannot read config file"),
    (["eval", "--checkpoint", "{tmp}/nowhere"], "no such checkpoint"),
    (["predict", "--checkpoint", "{tmp}/nowhere", "x.png"], "no such checkpoint"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, message, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "resdense", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.replace("{tmp}", str(tmp_path)) in lines[0], proc.stderr


def test_existing_run_and_bad_checkpoint_are_one_line_errors(trained_run, tmp_path, capsys):
    assert main(["train", *TINY, "--out", str(trained_run)]) == 2
    assert "--resume" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not a checkpoint")
    (bad / "meta.json").write_text(json.dumps({"model": "cifar_resnet", "model_kwargs": {"depth": 8}}))
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    img = tmp_path / "broken.png"
    img.write_bytes(b"\x89PNG not really")
    assert main(["predict", "--checkpoint", str(trained_run), str(img)]) == 2
    assert "cannot decode image" in capsys.readouterr().err


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST not installed (make data)")
def test_real_fashion_mnist_slice_clearly_beats_chance(tmp_path):
    """Integration: a small ResNet on 3,000 real Fashion-MNIST images, then the real test set."""
    from resdense.train.config import TrainConfig, apply_overrides
    from resdense.train.recipes import recipe
    from resdense.train.runner import train

    cfg = apply_overrides(TrainConfig(), {**recipe("quick"), "model": "cifar_resnet", "model_kwargs": {"depth": 8},
                                          "data": "fashion-mnist", "epochs": 3, "batch_size": 128, "lr": 0.2,
                                          "train_subset": 3000, "progress": False, "out": str(tmp_path / "run"),
                                          "precision": "fp32"}, "test")
    summary = train(cfg)
    assert summary["test_error_last"] < 0.35, summary  # chance is 0.90
    assert np.isfinite(summary["final_train_error"])


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """SIGKILL a real `resdense train` process after its first epoch, `--resume` it, and compare
    with a run that was never stopped: the weights are equal, not merely close."""
    import os
    import signal
    import time

    import torch

    from resdense.train.checkpoint import read_weights

    args = [sys.executable, "-m", "resdense", "train", *TINY, "--epochs", "5", "--train-subset", "1024",
            "--threads", "1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert subprocess.run([*args, "--out", str(whole)], capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen([*args, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        metrics = cut / "metrics.jsonl"  # written right after the epoch's checkpoint
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (cut / "summary.json").exists()
    resumed = subprocess.run([*args, "--out", str(cut), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epoch 1/5" not in resumed.stdout  # it continued; it did not start over
    a, b = read_weights(whole / "last"), read_weights(cut / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_set_takes_yaml_booleans_and_keeps_other_words():
    from resdense.cli._util import parse_overrides

    assert parse_overrides(["eval_train=false", "tta_flip=True", "nesterov=TRUE", "shortcut=none", "lr=0.1"]) == {
        "eval_train": False, "tta_flip": True, "nesterov": True, "shortcut": "none", "lr": 0.1}
