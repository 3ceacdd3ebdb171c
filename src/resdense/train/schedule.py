"""Learning-rate schedules as pure functions of the step, and the training image size as a pure
function of the epoch (progressive resizing).

Resuming a run only needs the step: the rate at step ``s`` is ``schedule(s)`` whatever
happened before. The one exception, the ResNet paper's warm-up "until training error is
below 80%", is state the engine keeps (``warmup_done``) and saves in every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .config import TrainConfig

SCHEDULES = ("step", "cosine", "onecycle")


def _to_steps(value: float, total: int) -> int:
    """Values >= 1 are iterations; values in [0, 1) are fractions of the run."""
    return int(value) if value >= 1 else int(round(value * total))


@dataclass(frozen=True)
class Schedule:
    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    note: str = ""  # what adapt_short_run changed, for the run's log

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.kind!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.base_lr * self.gamma ** sum(step >= m for m in self.milestones)
        # Progress through the part of the run after warm-up, in [0, 1].
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        if self.kind == "cosine":
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.base_lr * (1.0 - t)  # onecycle: linear up (warm-up), then linear down to zero


# Short runs: a recipe's warm-up fraction and peak lr are tuned for thousands of steps (quick:
# 8 epochs of Fashion-MNIST, ~3,400 steps, 15% warm-up). On a small folder the same recipe has
# a few dozen steps: 15% of 60 is a 9-step warm-up that reaches lr 0.2 from a random init at
# once, and the run ends near chance (training loss above ln 10). Below ``short_run_steps`` the
# warm-up is at least WARMUP_FLOOR steps (or the run's first third, if shorter), and the peak lr
# is scaled by sqrt(steps / short_run_steps), which is 1 at the threshold (no jump in behaviour
# there) and never below MIN_LR_FACTOR. Runs at or above the threshold are untouched.
WARMUP_FLOOR = 100
MIN_LR_FACTOR = 0.25


def adapt_short_run(cfg: TrainConfig, total_steps: int) -> tuple[float, int, str]:
    """(peak lr, warm-up steps, a note saying what changed) for a run of ``total_steps``."""
    warmup = _to_steps(cfg.warmup, total_steps)
    if cfg.short_run_steps <= 0 or total_steps >= cfg.short_run_steps:
        return cfg.lr, warmup, ""
    floor_warmup = max(warmup, min(WARMUP_FLOOR, total_steps // 3))
    lr = cfg.lr * max(MIN_LR_FACTOR, math.sqrt(total_steps / cfg.short_run_steps))
    resize = ", full-size images throughout" if cfg.min_scale < 1 else ""
    note = (f"short run ({total_steps} steps < short_run_steps={cfg.short_run_steps}): peak lr {lr:.3g} instead "
            f"of {cfg.lr:g}, warm-up {floor_warmup} steps instead of {warmup}{resize} "
            "(--set short_run_steps=0 keeps the recipe's)")
    return lr, floor_warmup, note


def short_run_min_scale(cfg: TrainConfig, total_steps: int) -> float:
    """The progressive-resizing start scale: the recipe's, or 1 (full size throughout) for a
    short run. Resizing saves time over thousands of steps; in a few dozen it spends a third of
    the run at a size the model is never evaluated at (3,000 Fashion-MNIST PNGs, 3 epochs, two
    seeds: 72.2 / 72.0% test accuracy with it, 73.6 / 75.4% without)."""
    if cfg.short_run_steps > 0 and total_steps < cfg.short_run_steps:
        return 1.0
    return cfg.min_scale


def short_run_total(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """The run's length in steps: ``total_steps``, or whole epochs up to ``cfg.min_steps`` when the
    recipe's epoch count gives fewer (a small dataset's few steps per epoch)."""
    if cfg.min_steps <= 0 or cfg.iterations is not None or total_steps >= cfg.min_steps:
        return total_steps
    return math.ceil(cfg.min_steps / steps_per_epoch) * steps_per_epoch


def make_schedule(cfg: TrainConfig, total_steps: int) -> Schedule:
    lr, warmup, note = adapt_short_run(cfg, total_steps)
    return Schedule(
        kind=cfg.schedule,
        base_lr=lr,
        total_steps=total_steps,
        warmup_steps=warmup,
        milestones=tuple(sorted(_to_steps(m, total_steps) for m in cfg.milestones)),
        gamma=cfg.gamma,
        note=note,
    )


def train_image_size(epoch: int, total_epochs: int, full: tuple[int, int], min_scale: float = 1.0,
                     ramp: float = 0.75, step: int = 4) -> tuple[int, int]:
    """The (height, width) training images are resized to in ``epoch`` (0-based).

    Progressive resizing (as in fast.ai's and FFCV's ImageNet recipes): the scale grows linearly
    from ``min_scale`` at epoch 0 to 1 at epoch ``round(ramp * total_epochs)``, and every later
    epoch trains at full size. Sides are rounded to the nearest multiple of ``step`` pixels (so
    a few sizes recur and each costs a fraction of a full-size epoch) and never exceed ``full``.
    """
    ramp_epochs = int(round(ramp * total_epochs))
    if min_scale >= 1.0 or epoch >= ramp_epochs:
        return full
    scale = min_scale + (1.0 - min_scale) * epoch / ramp_epochs
    return tuple(min(side, max(step, int(math.floor(side * scale / step + 0.5)) * step)) for side in full)  # type: ignore[return-value]
