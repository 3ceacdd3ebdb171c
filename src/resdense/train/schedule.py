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


def make_schedule(cfg: TrainConfig, total_steps: int) -> Schedule:
    return Schedule(
        kind=cfg.schedule,
        base_lr=cfg.lr,
        total_steps=total_steps,
        warmup_steps=_to_steps(cfg.warmup, total_steps),
        milestones=tuple(sorted(_to_steps(m, total_steps) for m in cfg.milestones)),
        gamma=cfg.gamma,
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
