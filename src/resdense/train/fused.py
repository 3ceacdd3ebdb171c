"""Fused multi-seed training: the runs of one net that differ only in their seed train as one
model (:mod:`.stacked`) and are written out as K ordinary run directories.

Each copy is its separate run: its own context (built by :func:`build_context` with its seed:
its initialisation, training subset, data order and augmentation), its own :class:`Trainer`
(its :class:`RunState`, schedule, warm-up, metrics, curve, checkpoints, final evaluation) and
its own run lock. Only the training steps are shared: every step stacks the copies' batches
(K, N, C, H, W), runs the stacked net once, sums the copies' mean losses (so each copy's gradient
is its separate run's), clips each copy's gradient by its own global norm and steps the stacked
SGD, each copy at its own learning rate. Between steps nothing else differs, so a copy's
weights, batch-norm statistics and metrics are its separate run's up to floating-point order
(the tests hold them to fp32 tolerance). A copy is copied back into its ordinary model and
optimiser before it is validated or checkpointed, and the global RNG is set to the copy's own
state around it, so its checkpoints are those of its separate run and ``eval``, ``analyze``,
``report`` and ``--resume`` (fused or not) see nothing new.

What differs from separate runs:

* a copy whose loss becomes non-finite leaves the stack at that step (its weights are those
  before the step, as its separate run keeps them) and ends as ``on_divergence`` says, while the
  others go on; with ``on_divergence=stop`` its error is raised once the others have finished;
* ``images_per_s`` of each copy is its own images over the fused steps' time;
* a signal is acted on at a step boundary or between epochs; validation and the final
  evaluation, done one copy after the other, finish first;
* nets with dropout are not fused (:func:`fuse_refusal`): a separate run draws its masks from
  the global RNG stream its seed starts, which a batched step cannot reproduce per copy; such
  runs train one after the other as before. So are torch.compile'd and multi-process runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, WriteError
from ..runlock import RunLock
from .config import TrainConfig, validate
from .context import build_context, drop_rate
from .distributed import log
from .engine import EpochProgress, EpochStats, NonFiniteLossError, _extend_curve, _Tally, autocast
from .rundir import check_run_dir, resolve_resume_config, take_run_dir
from .runner import EpochResult, Trainer
from .stacked import StackedNet, StackedSGD, clip_copies, copy_norms, per_copy_losses
from .stop import StopFlag, StopNow, TrainingStopped, signal_name

# Said where fusing is asked for on a CPU (issue 21's micro-benchmark of three fused ResNets on a
# 2-core CPU: 0.72-1.16x the separate runs' speed).
CPU_NOTE = ("--fuse-seeds on a CPU: the runs train fused, with the results of separate runs, but a CPU gains "
            "little from it (0.72-1.16x in a micro-benchmark); it pays on a GPU")

# Settings that may differ between the runs of one fused group: each copy's own.
PER_COPY = ("seed", "out")


def fuse_key(cfg: TrainConfig) -> str:
    """Runs with the same key differ only in their seed (and folder): they can train fused."""
    return json.dumps({k: v for k, v in cfg.to_dict().items() if k not in PER_COPY}, sort_keys=True, default=str)


def fuse_refusal(cfg: TrainConfig) -> Optional[str]:
    """Why the runs of ``cfg`` cannot train fused, in words; None where they can."""
    from ..models import create_model

    if cfg.compile:
        return "torch.compile'd runs (--compile) are not fused"
    kwargs = dict(cfg.model_kwargs)
    if drop_rate(cfg) is not None:
        kwargs.setdefault("drop_rate", drop_rate(cfg))
    with torch.device("meta"):
        model = create_model(cfg.model, **kwargs)
    if any(isinstance(m, nn.Dropout) or getattr(m, "drop_rate", 0) > 0 for m in model.modules()):
        return f"{cfg.model} uses dropout, whose masks a fused step cannot draw as each separate run does"
    if getattr(model, "memory_efficient", False):
        return "memory-efficient DenseNets (recomputed layers) are not fused"
    return None


def global_rng() -> dict[str, Any]:
    """The process's global random states (torch, CUDA, NumPy, Python), to set back exactly."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class FusedTrainer:
    """K :class:`Trainer` of runs that differ only in their seed, stepped together. ``rng``: each
    copy's global RNG state as its separate run would have it (after its context was built)."""

    def __init__(self, trainers: Sequence[Trainer], rng: list[dict[str, Any]], stop: Optional[StopFlag] = None) -> None:
        self.trainers, self.rng, self.stop = list(trainers), rng, stop
        self.live: list[int] = []              # the copies in the stack, in stack order
        self.last_lr = [math.nan] * len(self.trainers)
        self.errors: dict[int, NonFiniteLossError] = {}  # copies stopped by a non-finite loss (on_divergence=stop)
        self.net: Optional[StackedNet] = None
        self.opt: Optional[StackedSGD] = None

    @contextlib.contextmanager
    def as_copy(self, k: int) -> Iterator[None]:
        """The global RNG as copy ``k``'s separate run has it (what its checkpoints save)."""
        fused = global_rng()
        set_global_rng(self.rng[k])
        try:
            yield
        finally:
            self.rng[k] = global_rng()
            set_global_rng(fused)

    def restore(self, resume: bool) -> None:
        """Each copy restored as its separate run (see :meth:`Trainer.restore`); the copies still
        to train must stand at one step."""
        for k, t in enumerate(self.trainers):
            with self.as_copy(k):
                t.restore(resume)
        self.live = [k for k, t in enumerate(self.trainers) if t.training]
        # The lr each optimiser holds (the last step's, or the saved one): until the copy steps again.
        self.last_lr = [t.ctx.optimizer.param_groups[0]["lr"] / t.ctx.optimizer.param_groups[0].get("lr_scale", 1.0)
                        for t in self.trainers]
        at = {self._point(k) for k in self.live}
        if len(at) > 1:
            where = "; ".join(f"{self.trainers[k].run_dir} at step {self._point(k)[0]}" for k in self.live)
            raise ConfigError(f"fused runs must resume from one step ({where}); resume them one by one "
                              "(without --fuse-seeds)")
        if self.live:
            models = [self.trainers[k].ctx.model for k in self.live]
            self.net = StackedNet(models, cuda_graphs=self.trainers[self.live[0]].cfg.cuda_graphs)
            self.opt = StackedSGD.gather(self.net, [self.trainers[k].ctx.optimizer for k in self.live], models)
            t = self.trainers[self.live[0]]
            log(f"fused: {len(self.live)} runs of {t.cfg.model} train as one model "
                f"({', '.join(str(self.trainers[k].run_dir) for k in self.live)})")

    def _point(self, k: int) -> tuple[int, Optional[int]]:
        state = self.trainers[k].state
        return state.step, state.position.batch if state.position else None

    def run(self) -> list[Optional[dict[str, Any]]]:
        """Train the copies to the end; returns each copy's summary (None for a copy stopped by
        a non-finite loss, whose error is raised once the others are finished)."""
        while self.live and self.trainers[self.live[0]].training:
            self._epoch()
        summaries: list[Optional[dict[str, Any]]] = []
        for k, t in enumerate(self.trainers):
            with self.as_copy(k):
                summaries.append(None if k in self.errors else t.finish())
        if self.errors:
            raise next(iter(self.errors.values()))
        return summaries

    def _epoch(self) -> None:
        """One epoch of every copy in the stack: trained fused, then validated and recorded one by one."""
        lead = self.trainers[self.live[0]]
        started = {k: self.trainers[k].start_epoch() for k in self.live}
        with lead._bar() as bar:
            stats = self._train(started, bar)
        for k, (result, _) in started.items():
            if k not in stats:  # diverged or stopped by its loss this epoch
                continue
            t, result.stats = self.trainers[k], stats[k]
            result.val = t._validate(stats[k], result.started)
            with self.as_copy(k):
                t.end_epoch(result)
        if self.stop is not None and self.stop.requested():
            raise self._stopped(f"after epoch {lead.state.epoch}", [])

    def _train(self, started: dict[int, tuple[EpochResult, EpochProgress]], bar: Any) -> dict[int, EpochStats]:
        """Train the epoch fused from where it starts; returns the stats of the copies that
        finished it (every copy in the stack, now written back to its own model)."""
        lead = self.trainers[self.live[0]]
        settings, ctx = lead.settings, lead.ctx
        order = list(self.live)  # the loaders' order; the stack may lose copies on the way
        for k in order:
            result, progress = started[k]
            self.trainers[k].ctx.train_loader.set_epoch(self.trainers[k].state.epoch, result.size, progress.batch)
        tallies = {k: _Tally(started[k][1], settings.device) for k in order}
        for batches in zip(*(self.trainers[k].ctx.train_loader for k in order)):
            if settings.max_steps is not None and lead.state.step >= settings.max_steps:
                break
            x = torch.stack([batches[order.index(k)][0] for k in self.live])
            y = torch.stack([batches[order.index(k)][1] for k in self.live])
            self._step(x, y, tallies)
            if not self.live:
                return {}
            lead = self.trainers[self.live[0]]
            if bar is not None:
                bar.update(1)
            tally = tallies[self.live[0]]
            inside = tally.begun.batch + tally.steps < lead.steps_per_epoch and lead.state.step < ctx.total_steps
            if self._should_stop(lead) and inside:  # at the epoch's end, its own checkpoint follows
                self._save_inside_epoch(started, tallies)
        self._write_back()
        return {k: tallies[k].stats(stopped=False) for k in self.live}

    def _step(self, x: torch.Tensor, y: torch.Tensor, tallies: dict[int, _Tally]) -> None:
        """One fused step of the copies in the stack; a copy whose loss is not finite leaves the
        stack before the optimiser steps (its weights are its last finite ones, as its separate run keeps them)."""
        assert self.net is not None and self.opt is not None
        lead = self.trainers[self.live[0]]
        settings = lead.settings
        states = [self.trainers[k].state for k in self.live]
        step = states[0].step
        lrs = [settings.warmup_lr if (not s.warmup_done and settings.warmup_lr is not None) else lead.schedule(step)
               for s in states]
        with autocast(settings.device, settings.amp_dtype):
            logits = self.net(x)
            losses = per_copy_losses(logits, y, settings.label_smoothing)
        finite = torch.isfinite(losses.detach()).tolist()
        left = [i for i, good in enumerate(finite) if not good]
        for i in left:
            self._leave(i, losses[i].item(), step, lrs[i])
        norms = self._backward(losses, [i for i, good in enumerate(finite) if good], (step + 1) % settings.curve_every == 0)
        self.opt.step(lrs)
        wrong = (logits.detach().argmax(-1) != y).sum(1)
        for i, k in enumerate(self.live):
            if i in left:
                continue
            state, tally, n = states[i], tallies[k], y.shape[1]
            tally.add(losses[i], wrong[i], n)
            state.step += 1
            self.last_lr[k] = lrs[i]
            _extend_curve(state.curve, tally.interval, settings.curve_every, state.step, lrs[i], losses[i],
                          wrong[i], n, norms[i] if norms is not None else None)
            if not state.warmup_done and settings.warmup_until_error is not None and tally.error() < settings.warmup_until_error:
                state.warmup_done = True
        if left:
            keep = [i for i in range(len(self.live)) if i not in left]
            self.net.keep(keep)
            self.opt.keep(keep)
            self.live = [self.live[i] for i in keep]

    def _backward(self, losses: torch.Tensor, ok: list[int], measure: bool) -> Optional[torch.Tensor]:
        """The gradients of the copies ``ok`` (each its own loss's: the sum's), clipped per copy;
        returns each copy's gradient norm before clipping where clipped or ``measure``d."""
        assert self.net is not None
        for p in self.net.params.values():
            p.grad = None
        if not ok:
            return None
        (losses.sum() if len(ok) == len(losses) else losses[ok].sum()).backward()
        grads = [p.grad for p in self.net.trained().values() if p.grad is not None]
        clip = self.trainers[self.live[0]].settings.grad_clip
        if clip is not None:
            return clip_copies(grads, clip)
        return copy_norms(grads) if measure else None

    def _leave(self, i: int, loss: float, step: int, lr: float) -> None:
        """Copy ``i`` of the stack ended at a non-finite loss: write it back and end it as its
        separate run would (``on_divergence``)."""
        k = self.live[i]
        t = self.trainers[k]
        self.net.write(i, t.ctx.model)  # type: ignore[union-attr]
        e = NonFiniteLossError(loss, step, lr)
        if t.cfg.on_divergence == "finish":
            t.state.diverged = e.what
            log(f"{t.run_dir}: {e.what}; on_divergence=finish: the run ends here and its weights are evaluated as they are")
            return
        e.args = (f"{t.run_dir}: {e}",)
        self.errors[k] = e
        log(f"{t.run_dir}: {e.what}; it stops here (its last good checkpoint is kept), the other runs go on")

    def _write_back(self) -> None:
        """Every copy in the stack into its own model and optimiser (weights, BN statistics,
        momentum, lr): before it is validated or checkpointed."""
        for i, k in enumerate(self.live):
            t = self.trainers[k]
            self.net.write(i, t.ctx.model)  # type: ignore[union-attr]
            self.opt.write(i, t.ctx.optimizer, t.ctx.model, self.last_lr[k])  # type: ignore[union-attr]

    def _should_stop(self, lead: Trainer) -> bool:
        signalled = self.stop.requested() if self.stop is not None else False
        every = lead.cfg.checkpoint_every
        return signalled or bool(every and lead.state.step % every == 0)

    def _save_inside_epoch(self, started: dict[int, tuple[EpochResult, EpochProgress]],
                           tallies: dict[int, _Tally]) -> None:
        """A checkpoint of this step in every copy's folder (a signal: then stop)."""
        self._write_back()
        points = []
        for k in self.live:
            with self.as_copy(k):
                progress = tallies[k].stats(stopped=True).progress
                points.append(self.trainers[k]._save_inside_epoch(progress, started[k][0].started))
        if self.stop is not None and self.stop.stopping:
            lead = self.trainers[self.live[0]]
            raise self._stopped(f"at step {lead.state.step} (epoch {lead.state.epoch + 1})", points)

    def _stopped(self, where: str, points: list[Optional[Path]]) -> TrainingStopped:
        signum = (self.stop.stopping or self.stop.signum) if self.stop is not None else None
        signum = signum or signal.SIGINT
        saved = "a checkpoint of this step written" if points else "each one's last checkpoint up to date"
        runs = ", ".join(str(self.trainers[k].run_dir) for k in self.live)
        return TrainingStopped(f"stopped by {signal_name(signum)} {where}; {len(self.live)} fused runs ({runs}), "
                               f"{saved}; continue with the same command plus --resume", signum)


def train_fused(cfgs: Sequence[TrainConfig], *, resume: bool = False, overwrite: bool = False,
                flag_overrides: Optional[dict[str, Any]] = None, locks: Optional[Sequence[Optional[RunLock]]] = None,
                device: Optional[torch.device] = None) -> list[Optional[dict[str, Any]]]:
    """Train (or resume) the runs ``cfgs``, which differ only in their seed and folder, fused;
    returns their summary rows (each also in its folder's summary.json), as :func:`train` would
    one by one. ``locks``: the runs' locks the caller already holds (a study), else taken here."""
    cfgs = [validate(c) for c in cfgs] if not resume else list(cfgs)
    locks = list(locks) if locks is not None else [None] * len(cfgs)
    run_dirs = [check_run_dir(c, resume, overwrite, lock) for c, lock in zip(cfgs, locks)]
    if resume:
        cfgs = [validate(resolve_resume_config(c, d, flag_overrides or {})) for c, d in zip(cfgs, run_dirs)]
    if len({fuse_key(c) for c in cfgs}) > 1:
        raise ConfigError("fused runs must differ only in their seed and folder; train them one by one")
    refusal = fuse_refusal(cfgs[0])
    if refusal:
        raise ConfigError(f"cannot fuse these runs: {refusal}; train them without --fuse-seeds")
    contexts, rng = [], []
    for c in cfgs:  # each seeded as its separate run: its initialisation, subset and data order
        contexts.append(build_context(c, device=device))
        rng.append(global_rng())
    held: list[RunLock] = []
    try:
        for d, lock in zip(run_dirs, locks):
            own = lock is None or not lock.held
            taken = take_run_dir(d, overwrite, lock)
            if own:
                held.append(taken)
        with StopFlag() as stop:
            trainers = [Trainer(ctx, d) for ctx, d in zip(contexts, run_dirs)]
            fused = FusedTrainer(trainers, rng, stop)
            fused.restore(resume)
            return fused.run()
    except WriteError as e:
        raise WriteError(f"{e}; the fused runs keep their last checkpoints: continue with the same command plus "
                         "--resume", e.errno, e.filename) from None
    except StopNow as e:
        raise StopNow(f"{e}; the fused runs keep their last checkpoints: continue with the same command plus "
                      "--resume", e.signum) from None
    finally:
        for lock in held:
            lock.release()

