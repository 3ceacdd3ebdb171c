"""One epoch of training and one pass of evaluation, as plain functions returning dicts."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
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
class EpochProgress:
    """How far an epoch has got: its batches trained so far and the running sums of its metrics
    row. Saved in a checkpoint taken inside an epoch, so the resumed epoch's row is the one the
    uninterrupted run writes."""

    batch: int = 0          # batches of the epoch trained (the loader's start_batch on resume)
    loss_sum: float = 0.0   # sum over images of the training loss
    wrong: int = 0
    seen: int = 0
    train_time: float = 0.0
    interval: list = field(default_factory=lambda: [0.0, 0, 0])  # loss sum, wrong, seen since the last curve point

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochProgress":
        return cls(**d)


@dataclass
class TrainState:
    """What the engine carries from step to step (and what a checkpoint must restore)."""

    step: int = 0
    epoch: int = 0
    warmup_done: bool = True  # False while the error-triggered warm-up holds the lr


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr: ``lr`` times the group's ``lr_scale`` (a fine-tune's backbone factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: Callable[[int], float],
    state: TrainState,
    *,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    label_smoothing: float = 0.0,
    max_steps: Optional[int] = None,
    warmup_lr: Optional[float] = None,
    warmup_until_error: Optional[float] = None,
    progress: Optional[Any] = None,
    grad_hook: Optional[Callable[[nn.Module, int], None]] = None,
    curve: Optional[list[dict[str, float]]] = None,
    curve_every: int = 50,
    grad_clip: Optional[float] = None,
    start: Optional[EpochProgress] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict[str, Any]:
    """Train over ``loader`` once (or until ``state.step`` reaches ``max_steps``).

    The learning rate of step ``s`` is ``schedule(s)``, or ``warmup_lr`` while
    ``state.warmup_done`` is False; the warm-up ends after the first step whose running
    training error is below ``warmup_until_error``. With ``curve``, appends the training loss
    and error of every ``curve_every`` steps (the fine-grained curves of the papers' figures) and
    the global L2 norm of that step's gradient (before clipping). ``grad_clip`` clips that norm.

    ``start``: the progress of an epoch resumed inside it (the loader already skips its trained
    batches). ``should_stop`` is asked after every step; when it says so the epoch ends there.
    Returns loss, error, images/s, steps (of this call), time, ``stopped`` and ``progress``
    (an :class:`EpochProgress` to resume from).
    """
    model.train()
    begun = start or EpochProgress()
    loss_sum = torch.tensor(begun.loss_sum, device=device, dtype=torch.float64)
    wrong = torch.tensor(begun.wrong, device=device, dtype=torch.int64)
    seen, steps, stopped = begun.seen, 0, False
    interval = list(begun.interval)
    start_time = time.perf_counter()
    for x, y in loader:
        if max_steps is not None and state.step >= max_steps:
            break
        lr = warmup_lr if (not state.warmup_done and warmup_lr is not None) else schedule(state.step)
        set_lr(optimizer, lr)
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(loss.item(), state.step, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook(model, state.step)
        at_curve_point = curve is not None and (state.step + 1) % curve_every == 0
        grad_norm = None
        if grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        elif at_curve_point:
            # One norm every curve_every steps: cheap next to the step, and what the remedies
            # study draws (vanishing or exploding gradients over training).
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        optimizer.step()
        n = y.shape[0]
        batch_wrong = (logits.detach().argmax(1) != y).sum()
        loss_sum += loss.detach().double() * n
        wrong += batch_wrong
        seen += n
        steps += 1
        state.step += 1
        if curve is not None:
            interval[0] += loss.item() * n
            interval[1] += int(batch_wrong)
            interval[2] += n
            if state.step % curve_every == 0:
                curve.append({"step": state.step, "train_loss": interval[0] / interval[2],
                              "train_error": interval[1] / interval[2], "lr": lr,
                              "grad_norm": float(grad_norm) if grad_norm is not None else None})
                interval = [0.0, 0, 0]
        if not state.warmup_done and warmup_until_error is not None and wrong.item() / seen < warmup_until_error:
            state.warmup_done = True
        if progress is not None:
            progress.update(1)
            if steps % 10 == 0:
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{1 - wrong.item() / seen:.3f}", lr=f"{lr:.3g}")
        if should_stop is not None and should_stop():
            stopped = True
            break
    elapsed = begun.train_time + time.perf_counter() - start_time
    reached = EpochProgress(begun.batch + steps, loss_sum.item(), int(wrong.item()), seen, elapsed, interval)
    return {
        "train_loss": reached.loss_sum / max(seen, 1),
        "train_error": reached.wrong / max(seen, 1),
        "images_per_s": seen / elapsed if elapsed > 0 else math.nan,
        "steps": steps,
        "train_time": elapsed,
        "stopped": stopped,
        "progress": reached,
    }


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
