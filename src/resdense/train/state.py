"""A run's state: what it has done and where it stands (:class:`RunState`), and its checkpoints
(:func:`save_run`, :func:`load_checkpoint`).

The state is one run's own; the model, optimiser and loaders it steps are its
:class:`~resdense.train.context.RunContext`. A checkpoint's ``state.pt`` holds the state's
fields (``metrics`` for :attr:`RunState.history`, ``best_val_error`` for
:attr:`RunState.best_val`), the optimiser, the RNG states and the config; a checkpoint taken
inside an epoch adds its ``position`` (:class:`EpochPosition`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError
from . import checkpoint as ckpt
from . import finetune
from .context import RunContext
from .distributed import is_main_process
from .engine import EpochProgress, TrainState


@dataclass
class EpochPosition:
    """Where inside an epoch a checkpoint was taken: the loader's position (epoch, batch, the
    epoch's permutation seed), the epoch's progress and the clocks, so the resumed run sees
    exactly the batches, and writes exactly the row, of the uninterrupted one."""

    epoch: int
    batch: int
    epoch_seed: int
    progress: EpochProgress
    epoch_time: float   # seconds of the epoch so far
    wall_time: float    # seconds of the run so far

    def to_dict(self) -> dict[str, Any]:
        """The saved shape (``state.pt``'s ``position``)."""
        return {"epoch": self.epoch, "batch": self.batch, "epoch_seed": self.epoch_seed,
                "progress": self.progress.to_dict(), "epoch_time": self.epoch_time, "wall_time": self.wall_time}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochPosition":
        return cls(d["epoch"], d["batch"], d["epoch_seed"], EpochProgress.from_dict(d["progress"]),
                   d["epoch_time"], d["wall_time"])


@dataclass
class RunState(TrainState):
    """One run's state: the engine's step, epoch and warm-up (:class:`TrainState`), what the run
    has recorded, where a resumed epoch starts, and the run's clock."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch
    curve: list[dict[str, Any]] = field(default_factory=list)    # a point every curve_every steps
    best_val: float = math.inf               # the lowest validation error so far (training error without one)
    position: Optional[EpochPosition] = None  # a resume inside an epoch: where it continues, until it does
    diverged: Optional[str] = None            # where the loss became non-finite (on_divergence=finish)
    wall_offset: float = 0.0                  # seconds the run trained before this process
    wall_start: float = field(default_factory=time.perf_counter)  # when this process began the run

    def wall_time(self) -> float:
        """Seconds of the run so far, earlier processes included."""
        return self.wall_offset + time.perf_counter() - self.wall_start

    @classmethod
    def from_saved(cls, saved: dict[str, Any], wall_start: float) -> "RunState":
        """The state a checked ``state.pt`` holds (the run continues on this process's clock from
        ``wall_start``)."""
        history = list(saved["metrics"])
        position = saved.get("position")
        state = cls(step=saved["step"], epoch=saved["epoch"], warmup_done=saved["warmup_done"], history=history,
                    curve=list(saved["curve"]), best_val=saved["best_val_error"], wall_start=wall_start)
        state.wall_offset = history[-1]["wall_time"] if history else 0.0
        if position is not None:
            state.position = EpochPosition.from_dict(position)
            state.wall_offset = position["wall_time"]
        return state


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()),
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_meta(ctx: RunContext) -> dict[str, Any]:
    """What every checkpoint's meta.json says about the run (the model, its data, its config)."""
    cfg, splits = ctx.cfg, ctx.splits
    return {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "data": splits.name,
            "classes": list(splits.classes), "mean": list(splits.mean), "std": list(splits.std),
            "input_size": [splits.in_chans, *splits.image_size], "config": cfg.to_dict()}


def save_run(ctx: RunContext, run_dir: Path, state: RunState, meta: dict[str, Any], *, is_best: bool,
             val_error: float, position: Optional[EpochPosition] = None, name: Optional[str] = None) -> Optional[Path]:
    """Checkpoint the run at ``state`` (inside an epoch: at ``position``, as ``name``). Rank 0
    writes it and returns its path (the others return None); with a position every rank waits for it."""
    point = None
    if is_main_process():
        saved_state = {"optimizer": ctx.optimizer.state_dict(), "step": state.step, "epoch": state.epoch,
                       "warmup_done": state.warmup_done, "best_val_error": state.best_val, "rng": _rng_state(),
                       "metrics": state.history, "curve": state.curve, "config": ctx.cfg.to_dict()}
        if position is not None:
            saved_state["position"] = position.to_dict()
        point = ckpt.save_checkpoint(run_dir, state.epoch, ctx.model, saved_state, {**meta, "epoch": state.epoch,
                                     "step": state.step, "val_error": val_error}, is_best=is_best, name=name)
    if position is not None and torch.distributed.is_initialized():
        torch.distributed.barrier()  # a stop: no rank leaves before the checkpoint is on disk
    return point


def load_checkpoint(ctx: RunContext, point: Path, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Load checkpoint ``point`` (of ``run_dir``, by default its run's) into the run (weights,
    optimiser, RNG); returns its training state, checked: a state file that loads but does not fit
    this run is a CheckpointError, not a crash."""
    source = point / ckpt.STATE_FILE
    raw = ckpt.read_state(point)
    finetune.check_resumable(raw, point, run_dir or point.parent.parent)  # `resdense import` output: weights, not a run
    saved = ckpt.check_state(raw, source)
    ckpt.load_weights(ctx.model, ckpt.read_weights(point), source=str(point))
    try:
        ctx.optimizer.load_state_dict(saved["optimizer"])
        for group in ctx.optimizer.param_groups:
            for p in group["params"]:
                buf = ctx.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                    raise ValueError("a momentum buffer has the wrong shape")
        _set_rng_state(saved["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{source} does not fit this run ({str(e).strip()[:120] or type(e).__name__}); "
                              "resume from another checkpoint or start again with --overwrite") from None
    position = saved.get("position")
    if position is not None:
        ctx.train_loader.set_epoch(position["epoch"])
        if position["epoch_seed"] != ctx.train_loader.epoch_seed or position["batch"] > len(ctx.train_loader):
            raise CheckpointError(f"{source}: its loader position (epoch {position['epoch']}, batch "
                                  f"{position['batch']}) does not fit this run's data; start again with --overwrite")
    return saved
