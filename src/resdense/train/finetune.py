"""Starting a run from weights trained elsewhere: ``train --init-from RUN_DIR|FILE``.

The model is built for the new data (its classes, its channels), so its classifier is new
whenever the number of classes differs, exactly what ``reset_classifier`` gives; every other
weight comes from the init source and must fit strictly. A first convolution trained on RGB
is adapted to greyscale data by summing its input channels (the response to a grey image
repeated on three channels), and the other way round by spreading it.

The new data is normalised with its own statistics, as any resdense run; the batch-norm
statistics follow it during fine-tuning. The init weights are read once, at the start of a
new run: a resumed fine-tune continues from its own checkpoint and never reads them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..data.loader import TensorLoader
from ..errors import CheckpointError, ConfigError
from ..models.importers import (LAYOUTS, detect_layout, find_state_dict, mismatch_report, read_checkpoint,
                                rename_keys)
from . import checkpoint as ckpt
from .config import TrainConfig


@dataclass
class InitSource:
    """Weights to start from, with what is known about them."""

    path: str
    state: dict[str, torch.Tensor]
    model: Optional[str] = None               # known for resdense runs (and imports)
    model_kwargs: Optional[dict[str, Any]] = None
    classes: Optional[list[str]] = None
    input_size: Optional[list[int]] = None


def read_init(path: str | Path) -> InitSource:
    """A run or checkpoint directory (resdense's own, e.g. from ``resdense import``), or a weights
    file in any layout ``resdense import`` reads."""
    path = Path(path)
    if path.is_dir():
        point = ckpt.resolve_checkpoint(path)
        meta = ckpt.read_meta(point)
        return InitSource(str(point), ckpt.clean_state_dict(ckpt.read_weights(point)), meta.get("model"),
                          dict(meta.get("model_kwargs", {})), meta.get("classes"), meta.get("input_size"))
    state, _ = find_state_dict(read_checkpoint(path), str(path))
    return InitSource(str(path), rename_keys(state, detect_layout(state)))


def init_model_settings(cfg: TrainConfig, model_given: bool) -> dict[str, Any]:
    """The model and builder arguments a fine-tune from ``cfg.init_from`` takes from it when the
    command line names no model (its num_classes and in_chans come from the new data); a model
    named on the command line must be the one the weights are for."""
    if cfg.init_from is None:
        return {}
    source = read_init(cfg.init_from)
    if model_given:
        if source.model is not None and source.model != cfg.model:
            raise ConfigError(f"--init-from {cfg.init_from} holds {source.model} weights, not {cfg.model}; "
                              f"drop --model or pass --model {source.model}")
        return {}
    if source.model is None:
        raise ConfigError(f"--init-from {cfg.init_from} holds weights only; say which model they are for with --model "
                          "NAME (or import them first: resdense import FILE --model NAME --out RUN_DIR)")
    kwargs = {k: v for k, v in (source.model_kwargs or {}).items() if k not in ("num_classes", "in_chans")}
    return {"model": source.model, "model_kwargs": {**kwargs, **cfg.model_kwargs}}


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-layer weight (out, c, k, k) for ``in_chans`` inputs: summed over channels for one
    input, else the channels repeated cyclically and rescaled to keep the response's size."""
    have = weight.shape[1]
    if have == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // have)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (have / in_chans)


def initialise(model: nn.Module, cfg: TrainConfig, classes: Optional[list[str]] = None) -> str:
    """Load ``cfg.init_from`` into ``model`` (built for the new data, whose class names are
    ``classes``) in place; returns a line saying what was loaded and what was made new.

    The classifier is kept only when the new data has the init's classes in the same order
    (known for resdense runs and imports); otherwise it is the new model's fresh one."""
    from ..models.importers import first_conv_key

    source = read_init(cfg.init_from)
    if source.model is not None and source.model != cfg.model:
        raise ConfigError(f"--init-from {cfg.init_from} holds {source.model} weights, not {cfg.model}; "
                          f"drop --model or pass --model {source.model}")
    own = model.state_dict()
    state = dict(source.state)
    notes = []
    conv = first_conv_key(model)
    if conv in state and state[conv].ndim == 4 and state[conv].shape[1] != own[conv].shape[1]:
        notes.append(f"first convolution adapted from {state[conv].shape[1]} to {own[conv].shape[1]} input channels")
        state[conv] = adapt_input_conv(state[conv], own[conv].shape[1])
    head = model.head_name
    head_keys = [k for k in own if k.startswith(f"{head}.")]
    other_classes = classes is not None and source.classes is not None and list(source.classes) != list(classes)
    if other_classes or any(k in state and state[k].shape != own[k].shape for k in head_keys):
        before = state[f"{head}.weight"].shape[0] if f"{head}.weight" in state else "?"
        notes.append(f"new classifier for the data's {getattr(model, 'num_classes', '?')} classes "
                     f"(the weights' was for {before}{' other' if other_classes else ''} classes)")
        for k in head_keys:
            state.pop(k, None)
        own = {k: v for k, v in own.items() if k not in head_keys}
    problem = mismatch_report(own, state)
    if problem:
        raise CheckpointError(f"--init-from {cfg.init_from} does not fit {cfg.model} ({problem}); "
                              "was it saved for another model?")
    model.load_state_dict(state, strict=False)  # strict above, less the head left new on purpose
    return f"initialised from {source.path}" + (f": {'; '.join(notes)}" if notes else "")


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Re-estimate every batch norm's running mean and variance on ``batches`` (the new data),
    in place: the statistics are reset, then averaged over all the batches with equal weight
    (momentum None) in training-mode forward passes. Nothing else changes: no parameter, no
    other buffer, no gradient; the model's mode and the norms' momenta are restored. Returns the
    number of images seen.

    Weights trained elsewhere carry the statistics of their own data; until a fine-tune's
    running averages (momentum 0.1) forget them, every evaluation normalises the new data by
    the old data's statistics."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for images, _ in batches:
            model(images)
            seen += len(images)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return seen


def recalibration_batches(ctx: Any) -> TensorLoader:
    """The run's training images (of this run's subset), unaugmented and in order, normalised as
    in training, in training-size batches: the statistics BN would gather in its first epoch."""
    loader = ctx.train_loader
    return TensorLoader(loader.images, loader.labels, ctx.cfg.batch_size, mean=ctx.splits.mean, std=ctx.splits.std,
                        device=ctx.device, channels_last=ctx.cfg.channels_last)


def is_head(model: nn.Module, name: str) -> bool:
    head = getattr(model, "head_name", None)
    return head is not None and (name == head or name.startswith(f"{head}."))


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """With ``freeze_backbone``: everything but the classifier stops learning (its batch-norm
    statistics still follow the new data)."""
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(is_head(model, name))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: decayed, then not decayed parameters (empty ones left out); with a
    ``backbone_lr_factor`` other than 1, each split into backbone and classifier, the backbone's
    carrying ``lr_scale`` (the factor on the scheduled lr). Without one, the groups are the ones
    resdense always made, so older checkpoints' optimizer states still load."""
    split = cfg.backbone_lr_factor != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = not (cfg.decay_norm_and_bias or p.ndim > 1)
            groups.setdefault((no_decay, split and is_head(model, name)), []).append(p)
    out = []
    for no_decay, head in sorted(groups):
        group: dict[str, Any] = {"params": groups[no_decay, head], "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        if split and not head:
            group["lr_scale"] = cfg.backbone_lr_factor
        out.append(group)
    return out


def check_resumable(state: dict[str, Any], point: Path, run_dir: Path) -> None:
    """A checkpoint written by ``resdense import`` holds weights, not a training run to resume."""
    if isinstance(state, dict) and "imported" in state and "optimizer" not in state:
        raise CheckpointError(f"{point} holds imported weights, not a training run; fine-tune from it with "
                              f"`resdense train --init-from {run_dir} --out NEW_RUN_DIR`")


def data_options(cfg: TrainConfig) -> dict[str, Any]:
    """load_dataset's image-folder arguments from the config (image_size only when set: named
    datasets refuse it)."""
    return {"bad_images": cfg.bad_images, **({"image_size": cfg.image_size} if cfg.image_size else {})}


__all__ = ["InitSource", "LAYOUTS", "adapt_input_conv", "check_resumable", "data_options", "init_model_settings",
           "initialise", "param_groups", "prepare_model", "read_init", "recalibrate_bn",
           "recalibration_batches"]
