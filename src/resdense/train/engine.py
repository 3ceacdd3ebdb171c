"""One epoch of training and one pass of evaluation.

:func:`train_one_epoch` steps a model over a loader with fixed :class:`EpochSettings` and returns
:class:`EpochStats`; how far an epoch has got is an :class:`EpochProgress`, saved inside a
mid-epoch checkpoint. :func:`evaluate` returns loss and error as a dict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint.
    ``what`` says where (loss, step, lr) without the advice, for a run that finishes anyway."""

    def __init__(self, loss: float, step: int, lr: float) -> None:
        self.what = f"the loss became {loss} at step {step} (lr {lr:g})"
        super().__init__(f"{self.what}; the run stopped and its last good checkpoint is kept: lower --lr or use "
                         "--precision fp32, then --resume")


class StopRequested(Exception):
    """Evaluation was asked to stop (``should_stop()`` returned True between two batches)."""


@dataclass
class CurveInterval:
    """The training curve's running sums since its last point."""

    loss_sum: float = 0.0  # sum over images of the training loss
    wrong: int = 0
    seen: int = 0

    def add(self, loss: float, wrong: int, n: int) -> None:
        self.loss_sum += loss * n
        self.wrong += wrong
        self.seen += n


@dataclass
class EpochProgress:
    """How far an epoch has got: its batches trained so far and the running sums of its metrics
    row. Saved in a checkpoint taken inside an epoch, so the resumed epoch's row is the one the
    uninterrupted run writes."""

    batch: int = 0          # batches of the epoch trained (the loader's start_batch on resume)
    loss_sum: float = 0.0   # sum over images of the training loss
    wrong: int = 0
    seen: int = 0
    train_time: float = 0.0
    interval: CurveInterval = field(default_factory=CurveInterval)

    def to_dict(self) -> dict[str, Any]:
        """The saved shape (``state.pt`` since 0.2): ``interval`` as [loss sum, wrong, seen]."""
        d = dataclasses.asdict(self)
        d["interval"] = [self.interval.loss_sum, self.interval.wrong, self.interval.seen]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochProgress":
        """Read :meth:`to_dict`'s shape."""
        return cls(**{**d, "interval": CurveInterval(*d["interval"])})


@dataclass
class TrainState:
    """What the engine carries from step to step (and what a checkpoint must restore)."""

    step: int = 0
    epoch: int = 0
    warmup_done: bool = True  # False while the error-triggered warm-up holds the lr


@dataclass(frozen=True)
class EpochSettings:
    """How every step of a run is taken: fixed for the run."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    label_smoothing: float = 0.0
    max_steps: Optional[int] = None              # stop when ``state.step`` reaches it
    warmup_lr: Optional[float] = None            # the lr while ``state.warmup_done`` is False ...
    warmup_until_error: Optional[float] = None   # ... until the running training error is below this
    curve_every: int = 50                        # steps between points of the training curve
    grad_clip: Optional[float] = None            # clip the gradient's global L2 norm to this


@dataclass
class EpochStats:
    """What one call of :func:`train_one_epoch` measured (the epoch so far, when resumed inside)."""

    train_loss: float
    train_error: float
    images_per_s: float
    steps: int                # steps of this call
    train_time: float         # seconds of the epoch's training so far
    stopped: bool             # ``should_stop`` ended the call before the loader's end
    progress: EpochProgress   # where to resume the epoch from


class _Tally:
    """An epoch's running sums, kept on the device (no synchronisation per step)."""

    def __init__(self, begun: EpochProgress, device: torch.device) -> None:
        self.begun = begun
        self.loss_sum = torch.tensor(begun.loss_sum, device=device, dtype=torch.float64)
        self.wrong = torch.tensor(begun.wrong, device=device, dtype=torch.int64)
        self.seen, self.steps = begun.seen, 0
        self.interval = dataclasses.replace(begun.interval)
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, batch_wrong: torch.Tensor, n: int) -> None:
        self.loss_sum += loss.detach().double() * n
        self.wrong += batch_wrong
        self.seen += n
        self.steps += 1

    def error(self) -> float:
        return self.wrong.item() / self.seen

    def stats(self, stopped: bool) -> EpochStats:
        elapsed = self.begun.train_time + time.perf_counter() - self.started
        reached = EpochProgress(self.begun.batch + self.steps, self.loss_sum.item(), int(self.wrong.item()),
                                self.seen, elapsed, self.interval)
        seen = max(self.seen, 1)
        return EpochStats(reached.loss_sum / seen, reached.wrong / seen,
                          self.seen / elapsed if elapsed > 0 else math.nan, self.steps, elapsed, stopped, reached)


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times the group's ``lr_scale`` (a fine-tune's backbone factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_one_epoch(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, schedule: Callable[[int], float], state: TrainState,
                    settings: Optional[EpochSettings] = None, *, curve: Optional[list[dict[str, Any]]] = None,
                    progress: Optional[EpochProgress] = None, should_stop: Optional[Callable[[], bool]] = None,
                    bar: Optional[Any] = None, **options: Any) -> EpochStats:
    """Train over ``loader`` once (or until ``state.step`` reaches ``settings.max_steps``).

    ``settings`` (or its fields as keywords, ``options``) say how each step is taken. The
    learning rate of step ``s`` is ``schedule(s)``, or ``settings.warmup_lr`` while
    ``state.warmup_done`` is False; the warm-up ends after the first step whose running training
    error is below ``settings.warmup_until_error``. With ``curve``, appends the training loss and
    error of every ``curve_every`` steps (the fine-grained curves of the papers' figures) and the
    global L2 norm of that step's gradient (before clipping).

    ``progress``: the progress of an epoch resumed inside it (the loader already skips its trained
    batches). ``should_stop`` is asked after every step; when it says so the epoch ends there.
    ``bar``: a tqdm bar to advance, or None.
    """
    if settings is None:
        settings = EpochSettings(**options)
    elif options:
        raise TypeError(f"give settings or their fields, not both ({', '.join(options)})")
    model.train()
    tally = _Tally(progress or EpochProgress(), settings.device)
    for x, y in loader:
        if settings.max_steps is not None and state.step >= settings.max_steps:
            break
        lr = settings.warmup_lr if (not state.warmup_done and settings.warmup_lr is not None) else schedule(state.step)
        at_curve_point = curve is not None and (state.step + 1) % settings.curve_every == 0
        loss, logits, grad_norm = _step(model, optimizer, x, y, lr, state.step, settings, at_curve_point)
        batch_wrong = (logits.detach().argmax(1) != y).sum()
        tally.add(loss, batch_wrong, y.shape[0])
        state.step += 1
        if curve is not None:
            _extend_curve(curve, tally.interval, settings.curve_every, state.step, lr, loss, batch_wrong,
                          y.shape[0], grad_norm)
        if not state.warmup_done and settings.warmup_until_error is not None and tally.error() < settings.warmup_until_error:
            state.warmup_done = True
        if bar is not None:
            bar.update(1)
            if tally.steps % 10 == 0:
                bar.set_postfix(loss=f"{tally.loss_sum.item() / tally.seen:.3f}", acc=f"{1 - tally.error():.3f}",
                                lr=f"{lr:.3g}")
        if should_stop is not None and should_stop():
            return tally.stats(stopped=True)
    return tally.stats(stopped=False)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
          step: int, settings: EpochSettings, measure_norm: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One optimiser step of ``model`` on the batch ``(x, y)`` at ``lr``; returns the loss, the
    logits and the gradient's global norm before clipping (None where neither clipped nor measured).
    The loss is checked before its backward pass, so a non-finite one leaves the weights as they were."""
    set_lr(optimizer, lr)
    with autocast(settings.device, settings.amp_dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(loss.item(), step, lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if settings.grad_clip is not None:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    elif measure_norm:
        # One norm every curve_every steps: cheap next to the step, and what the remedies
        # study draws (vanishing or exploding gradients over training).
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    optimizer.step()
    return loss, logits, grad_norm


def _extend_curve(curve: list[dict[str, Any]], interval: CurveInterval, every: int, step: int, lr: float,
                  loss: torch.Tensor, batch_wrong: torch.Tensor, n: int, grad_norm: Any) -> None:
    """Add the step to the curve's running sums; at every ``every``-th step, append a point and
    start the sums again."""
    interval.add(loss.item(), int(batch_wrong), n)
    if step % every == 0:
        curve.append({"step": step, "train_loss": interval.loss_sum / interval.seen,
                      "train_error": interval.wrong / interval.seen, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None})
        interval.loss_sum, interval.wrong, interval.seen = 0.0, 0, 0


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None, tta_flip: bool = False) -> torch.Tensor:
    """Log-probabilities of the batch ``x``; with ``tta_flip`` the softmax is averaged over each
    image and its mirror before the log."""
    with autocast(device, amp_dtype):
        probs = model(x).float().softmax(1)
        if tta_flip:
            probs = 0.5 * (probs + model(x.flip(3)).float().softmax(1))
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, tta_flip: bool = False,
             num_classes: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Loss and error over ``loader`` in eval mode; with ``num_classes``, also the confusion
    matrix (rows: true class, columns: predicted). ``should_stop`` is asked between batches;
    when it says so, :class:`StopRequested` is raised (a partial result would mislead)."""
    was_training = model.training
    model.eval()
    loss_sum, wrong, seen = 0.0, 0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64) if num_classes else None
    try:
        for x, y in loader:
            if should_stop is not None and should_stop():
                raise StopRequested
            logp = predict_logits(model, x, device=device, amp_dtype=amp_dtype, tta_flip=tta_flip)
            loss_sum += F.nll_loss(logp, y, reduction="sum").item()
            pred = logp.argmax(1)
            wrong += (pred != y).sum().item()
            seen += y.shape[0]
            if confusion is not None:
                idx = (y * num_classes + pred).cpu()
                confusion += torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"loss": loss_sum / max(seen, 1), "error": wrong / max(seen, 1), "n": seen}
    if confusion is not None:
        out["confusion"] = confusion.tolist()
    return out
