"""What a run builds once, before its first step: data, loaders, model, optimiser, the run's length
and warm-up (:class:`RunContext`, :func:`build_context`).

The context is the machinery a run steps; what the run has done (step, metrics, best
validation error ...) is its :class:`~resdense.train.state.RunState`.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

from ..data import load_dataset
from ..data.loader import Augment, TensorLoader
from ..errors import ConfigError
from ..hardware import resolve_device, resolve_precision
from ..models import create_model
from . import finetune, graphs
from .config import TrainConfig
from .schedule import short_run_total


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def model_depth(model: nn.Module) -> int:
    """Weighted layers on the main path (convolutions outside shortcuts, plus linear layers):
    the depth in a model's name."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = finetune.param_groups(model, cfg)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@dataclass
class RunContext:
    """Everything a run builds once: data, loaders, model, optimiser, schedule."""

    cfg: TrainConfig  # as resolved for this run: model_kwargs hold what the data filled in
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    splits: Any
    train_loader: TensorLoader
    val_loader: Optional[TensorLoader]
    model: nn.Module
    train_model: nn.Module  # the model stepped by the optimiser (compiled and/or DDP-wrapped)
    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup_lr: Optional[float]
    world_size: int = 1
    rank: int = 0


def drop_rate(cfg: TrainConfig) -> Optional[float]:
    """The dropout rate the run's settings give the model builder (None: the model's own)."""
    return cfg.drop_rate if cfg.drop_rate is not None else (cfg.drop_rate_without_augment if not cfg.augment else None)


def _model_kwargs(cfg: TrainConfig, splits: Any) -> dict[str, Any]:
    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("num_classes", splits.num_classes)
    kwargs.setdefault("in_chans", splits.in_chans)
    drop = drop_rate(cfg)
    if drop is not None:
        kwargs.setdefault("drop_rate", drop)
    return kwargs


def _train_images(cfg: TrainConfig, splits: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels: all of them, or the run's seeded subset."""
    images, labels = splits.train.images, splits.train.labels
    if cfg.train_subset is not None:
        if cfg.train_subset > len(images):
            raise ConfigError(f"--train-subset {cfg.train_subset} is larger than the {len(images)} training images")
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_subset]
        images, labels = images[pick], labels[pick]
    if cfg.batch_size > len(images):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(images)} training images")
    return images, labels


def _loaders(cfg: TrainConfig, splits: Any, device: torch.device, rank: int,
             world_size: int) -> tuple[TensorLoader, Optional[TensorLoader]]:
    """The training loader (this rank's shard, augmented) and the validation loader (None without
    a validation split)."""
    images, labels = _train_images(cfg, splits)
    augment = Augment(cfg.pad, cfg.flip) if cfg.augment else None
    common = dict(mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last)
    train_loader = TensorLoader(images, labels, cfg.batch_size, shuffle=True, augment=augment, drop_last=True,
                                seed=cfg.seed, rank=rank, world_size=world_size, **common)
    val_loader = (TensorLoader(splits.val.images, splits.val.labels, cfg.eval_batch_size, **common)
                  if len(splits.val.images) else None)
    return train_loader, val_loader


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, world_size: int) -> tuple[nn.Module, nn.Module]:
    """The model (SyncBatchNorm where asked) and the module the optimiser steps (DDP-wrapped
    and/or compiled)."""
    train_model = model
    if cfg.sync_bn:
        if world_size == 1:
            raise ConfigError("--sync-bn only matters with several processes (--nproc N or torchrun)")
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); drop it")
        model = train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.cuda_graphs:  # compiled too, for CUDA-graph replay
        train_model = graphs.GraphStep(train_model)
    elif cfg.compile:
        train_model = torch.compile(train_model)
    return model, train_model


def build_context(cfg: TrainConfig, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None) -> RunContext:
    """Build run ``cfg`` (``cfg`` itself is left as it is: the context's ``cfg`` is a copy whose
    ``model_kwargs`` also hold what the data filled in, e.g. ``num_classes``)."""
    device = device or resolve_device(cfg.device)
    with torch.device("meta"):  # a bad model or setting is refused before any data is read
        create_model(cfg.model, **cfg.model_kwargs)
    graphs.check_device(cfg, device, world_size)
    amp_dtype = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    splits = load_dataset(cfg.data, cfg.data_dir, download=cfg.download, val_size=cfg.val_size, split_seed=0,
                          **finetune.data_options(cfg))
    train_loader, val_loader = _loaders(cfg, splits, device, rank, world_size)
    model_kwargs = _model_kwargs(cfg, splits)
    model = create_model(cfg.model, **model_kwargs).to(device)
    finetune.prepare_model(model, cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = dataclasses.replace(cfg, model_kwargs=dict(model_kwargs))
    model, train_model = _wrap(model, cfg, device, world_size)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    total = cfg.iterations if cfg.iterations is not None else cfg.epochs * steps_per_epoch
    total = short_run_total(cfg, steps_per_epoch, total)
    deep = model_depth(model) >= cfg.warmup_min_depth
    warmup_lr = cfg.warmup_lr if (cfg.warmup_lr is not None and cfg.warmup_until_error is not None and deep) else None
    return RunContext(cfg, device, amp_dtype, splits, train_loader, val_loader, model, train_model, optimizer,
                      total, warmup_lr, world_size, rank)
