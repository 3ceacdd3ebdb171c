"""Two gloo processes (torchrun + DDP) train to the weights one process reaches on the same
global batches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from resdense.cli import main
from resdense.data import load_dataset
from resdense.data.loader import Augment, TensorLoader
from resdense.models import create_model
from resdense.train import checkpoint as ckpt
from resdense.train.config import TrainConfig, apply_overrides
from resdense.train.runner import build_optimizer, seed_everything
from resdense.train.schedule import make_schedule, train_image_size

ARGS = ["--model", "cifar_resnet", "-a", "depth=8", "--data", "synthetic", "--epochs", "2", "--batch-size", "64",
        "--train-subset", "256", "--lr", "0.05", "--set", "schedule=cosine", "--set", "warmup=0.2",
        "--set", "label_smoothing=0.1", "--set", "eval_batch_size=256", "--precision", "fp32", "--no-progress",
        "--threads", "1"]


def reference_config(epochs: int = 2) -> TrainConfig:
    """The TrainConfig that ARGS (with ``epochs``) resolve to, for the one-process computation."""
    return apply_overrides(TrainConfig(), {
        "model": "cifar_resnet", "model_kwargs": {"depth": 8}, "data": "synthetic", "epochs": epochs, "batch_size": 64,
        "train_subset": 256, "lr": 0.05, "schedule": "cosine", "warmup": 0.2, "label_smoothing": 0.1,
        **{k: v for k, v in __import__("resdense.train.recipes", fromlist=["recipe"]).recipe("quick").items()
           if k in ("momentum", "nesterov", "weight_decay", "decay_norm_and_bias", "pad", "flip", "min_scale",
                    "resize_ramp", "resize_step")},
    }, "test")


def _reference_weights(cfg: TrainConfig, world_size: int = 2) -> dict[str, torch.Tensor]:
    """One process doing what DDP does: per-shard forward (batch norm sees one shard, as in each
    DDP process), the loss averaged over shards, one optimiser step per global batch."""
    seed_everything(cfg.seed, False)
    splits = load_dataset(cfg.data)
    pick = torch.randperm(len(splits.train.images), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_subset]
    images, labels = splits.train.images[pick], splits.train.labels[pick]
    model = create_model(cfg.model, num_classes=splits.num_classes, in_chans=splits.in_chans, **cfg.model_kwargs)
    model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    loaders = [TensorLoader(images, labels, cfg.batch_size, shuffle=True, augment=Augment(cfg.pad, cfg.flip),
                            drop_last=True, seed=cfg.seed, rank=r, world_size=world_size, mean=splits.mean,
                            std=splits.std) for r in range(world_size)]
    schedule = make_schedule(cfg, cfg.epochs * len(loaders[0]))
    step = 0
    for epoch in range(cfg.epochs):
        size = train_image_size(epoch, cfg.epochs, tuple(images.shape[-2:]), cfg.min_scale, cfg.resize_ramp,
                                cfg.resize_step)
        for loader in loaders:
            loader.set_epoch(epoch, size)
        model.train()
        for shards in zip(*loaders):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            loss = sum(F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing) for x, y in shards) / world_size
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "resdense", "train", *ARGS, "--nproc", "2", "--out", str(run)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 logs
    ddp = ckpt.read_weights(run / "last")
    torch.set_num_threads(1)
    reference = _reference_weights(reference_config())
    assert reference.keys() <= ddp.keys()
    for name, ref in reference.items():
        assert torch.allclose(ddp[name], ref, atol=2e-5, rtol=1e-4), f"{name}: max diff {(ddp[name] - ref).abs().max():.3g}"


def test_sync_bn_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", *ARGS, "--sync-bn", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--sync-bn" in err and len(err.strip().splitlines()) == 1
