"""TensorBoard event files for a training run, in ``RUN/tensorboard/``.

Written when the ``tensorboard`` package is installed and ``TrainConfig.tensorboard`` is on
(the default: "when available"); without the package a run says nothing about it, because the
metrics are in ``metrics.jsonl`` / ``metrics.csv`` / ``curve.jsonl`` either way. A user who
asks for it explicitly (``--tensorboard``) without the package is told before training starts.

Tags: ``train/loss``, ``train/error``, ``val/loss``, ``val/error``, ``lr``, ``images_per_s``,
``train_image_size`` (pixels, height) per epoch at its last step; ``train/loss_curve`` and
``train/error_curve`` every ``curve_every`` steps; with ``--record-gradients``,
``gradients/first_layer``, ``gradients/last_layer``, ``gradients/ratio_first_last`` and a
histogram ``gradients/norms`` of every layer's gradient norm.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

EVENTS_DIR = "tensorboard"
_EPOCH_TAGS = (("train/loss", "train_loss"), ("train/error", "train_error"), ("val/loss", "val_loss"),
               ("val/error", "val_error"), ("lr", "lr"), ("images_per_s", "images_per_s"))


def available() -> bool:
    """Whether the ``tensorboard`` package (which torch's SummaryWriter needs) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def require() -> None:
    """For an explicit request: a one-line error when the package is missing."""
    if not available():
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'resdense[tensorboard]' "
                          "(or drop the flag; the metrics are in metrics.csv either way)")


class EventLog:
    """One run's event writer; :meth:`open` gives None where no events are to be written."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / EVENTS_DIR))
        self._curve_done = 0

    @classmethod
    def open(cls, run_dir: Path, enabled: bool, main_process: bool = True) -> Optional["EventLog"]:
        if not (enabled and main_process and available()):
            return None
        return cls(run_dir)

    def skip_curve(self, points: int) -> None:
        """A resumed run: the first ``points`` curve points are already in earlier event files."""
        self._curve_done = points

    def epoch(self, row: dict[str, Any], curve: list[dict[str, float]]) -> None:
        """The epoch's row (at its last step) and the curve points added since the last call."""
        step = int(row["step"])
        for tag, key in _EPOCH_TAGS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(tag, value, step)
        size = str(row.get("train_size", ""))
        if size.split("x")[0].isdigit():
            self.writer.add_scalar("train_image_size", int(size.split("x")[0]), step)
        for point in curve[self._curve_done:]:
            self.writer.add_scalar("train/loss_curve", point["train_loss"], int(point["step"]))
            self.writer.add_scalar("train/error_curve", point["train_error"], int(point["step"]))
        self._curve_done = len(curve)
        self.writer.flush()

    def gradients(self, step: int, report: Any) -> None:
        """Per-layer gradient norms of a :class:`~resdense.analysis.gradients.GradientReport`."""
        import torch

        norms = list(report.norms)
        if not norms:
            return
        self.writer.add_scalar("gradients/first_layer", norms[0], step)
        self.writer.add_scalar("gradients/last_layer", norms[-1], step)
        if math.isfinite(report.ratio_first_last):
            self.writer.add_scalar("gradients/ratio_first_last", report.ratio_first_last, step)
        self.writer.add_histogram("gradients/norms", torch.tensor(norms), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
