"""Time to accuracy: ResNet-20 on Fashion-MNIST trained the usual way and the resdense way, side
by side, and the wall time each needs to first reach a target test accuracy.

* ``usual``: fp32, NCHW, eager; a per-sample :class:`~.pipeline.UsualDataset` (PIL pad-4 crop,
  flip, normalise) in a ``DataLoader``; ``torch.optim.SGD`` (momentum 0.9, weight decay 1e-4,
  batch 128) with the ResNet paper's step schedule scaled to the run: lr 0.1, divided by 10 at
  50% and 75% of the epochs;
* ``resdense``: ``resdense train`` with the ``quick`` recipe: the tensor-resident loader,
  channels-last, the machine's best precision, progressive resizing, flip test-time augmentation.

Both models are the same paper-exact ResNet-20 (``in_chans=1``). After every epoch the test
accuracy is measured, outside the timed wall clock (a benchmark's yardstick, never used by
either run to choose anything). A target's time is the training wall time at the end of the
first epoch whose test accuracy reaches it.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..data import load_dataset
from ..data.loader import TensorLoader
from ..hardware import precision_name, resolve_device, resolve_precision
from ..models import create_model
from ..train.config import TrainConfig, apply_overrides
from ..train.engine import evaluate
from ..train.recipes import recipe
from ._common import BenchOptions, Row, format_table, say, sync, with_threads, write_rows
from .pipeline import usual_loader

TARGETS = (0.92, 0.93)
USUAL_EPOCHS = 30  # the paper's 64k iterations are ~160 CIFAR epochs; 30 Fashion-MNIST epochs reach a plateau


def _test_accuracy(model: torch.nn.Module, loader: TensorLoader, device: torch.device,
                   amp: Optional[torch.dtype] = None, tta_flip: bool = False) -> float:
    return 1.0 - evaluate(model, loader, device=device, amp_dtype=amp, tta_flip=tta_flip)["error"]


def _times(curve: list[dict[str, float]], targets: tuple[float, ...]) -> dict[str, Optional[float]]:
    """Wall seconds at the first epoch reaching each target accuracy (None: never reached)."""
    return {f"{t:.2f}": next((p["wall_s"] for p in curve if p["test_accuracy"] >= t), None) for t in targets}


def _usual(splits: Any, test: TensorLoader, epochs: int, subset: Optional[int], device: torch.device,
           opts: BenchOptions) -> list[dict[str, float]]:
    torch.manual_seed(0)
    images, labels = splits.train.images, splits.train.labels
    if subset:
        images, labels = images[:subset], labels[:subset]
    model = create_model("resnet20", in_chans=splits.in_chans, num_classes=splits.num_classes).to(device)
    loader = usual_loader(images, labels, splits.mean, splits.std, batch_size=128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    milestones = [int(0.5 * epochs), int(0.75 * epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    curve, wall = [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        sync(device)
        wall += time.perf_counter() - start
        curve.append({"epoch": epoch + 1, "wall_s": wall, "test_accuracy": _test_accuracy(model, test, device)})
        say(opts, f"   usual epoch {epoch + 1}/{epochs}: test accuracy {curve[-1]['test_accuracy']:.4f}, {wall:.0f} s")
    return curve


def _resdense(data: str, test: TensorLoader, epochs: Optional[int], subset: Optional[int], precision: str,
              out: Path) -> tuple[list[dict[str, float]], str]:
    from ..train.runner import train

    cfg = apply_overrides(TrainConfig(), {**recipe("quick"), "recipe": "quick", "model": "resnet20", "data": data,
                                          "out": str(out), "progress": False, "precision": precision,
                                          **({"epochs": epochs} if epochs else {}),
                                          **({"train_subset": subset} if subset else {})}, "time-to-accuracy")
    curve: list[dict[str, float]] = []
    measuring = [0.0]  # seconds spent in the test evaluations, taken out of the run's wall clock

    def after_epoch(ctx: Any, row: dict[str, Any]) -> None:
        start = time.perf_counter()
        acc = _test_accuracy(ctx.model, test, ctx.device, ctx.amp_dtype, ctx.cfg.tta_flip)
        curve.append({"epoch": row["epoch"], "wall_s": row["wall_time"] - measuring[0], "test_accuracy": acc})
        measuring[0] += time.perf_counter() - start

    train(cfg, epoch_callback=after_epoch)
    return curve, precision_name(resolve_precision(precision, resolve_device("auto")))


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Train both ways, print each one's time to every target and the speedup, write ``tta.json``."""
    device = resolve_device(opts.device)
    data = "fashion-mnist"
    splits = load_dataset(data)
    test_set = splits.load_test()
    subset = 1024 if opts.quick else None
    test_n = 500 if opts.quick else len(test_set.images)
    test = TensorLoader(test_set.images[:test_n], test_set.labels[:test_n], 500, mean=splits.mean, std=splits.std,
                        device=device, channels_last=False)
    targets = (0.5, 0.6) if opts.quick else TARGETS
    say(opts, f"== time to accuracy: ResNet-20 on Fashion-MNIST, usual vs resdense, {device.type}, "
              f"{torch.get_num_threads()} threads{' (quick: 1,024 images, 1 epoch)' if opts.quick else ''}")
    usual_curve = _usual(splits, test, 1 if opts.quick else USUAL_EPOCHS, subset, device, opts)
    with tempfile.TemporaryDirectory(prefix="resdense-tta-") as tmp:
        fast_curve, fast_precision = _resdense(data, test, 1 if opts.quick else None, subset, opts.precision,
                                               Path(tmp) / "run")
    rows: list[Row] = []
    for way, curve, prec in (("usual", usual_curve, "fp32"), ("resdense", fast_curve, fast_precision)):
        times = _times(curve, targets)
        rows.append({"way": way, "precision": prec, "epochs": len(curve), "final_accuracy": curve[-1]["test_accuracy"],
                     "wall_s": curve[-1]["wall_s"], "curve": curve,
                     **{f"time_to_{k}": v for k, v in times.items()}})
    for key in (f"time_to_{t:.2f}" for t in targets):
        usual_t, fast_t = rows[0][key], rows[1][key]
        rows[1][key.replace("time_to", "speedup_to")] = (usual_t / fast_t if usual_t and fast_t else
                                                         (math.inf if fast_t and not usual_t else None))
    columns = [("way", "way", "s"), ("precision", "prec", "s"), ("epochs", "epochs", "d"),
               ("final_accuracy", "final acc", ".4f"), ("wall_s", "wall s", ".0f")]
    for t in targets:
        columns += [(f"time_to_{t:.2f}", f"s to {100 * t:g}%", ".0f"), (f"speedup_to_{t:.2f}", "x usual", ".2f")]
    say(opts, format_table(rows, columns))
    say(opts, "times are training wall seconds at the end of the first epoch whose test accuracy reaches the "
              "target ('-': never reached; inf: only resdense reached it); test evaluations are not timed")
    write_rows("tta", rows, opts, device, {"targets": list(targets)})
    return rows
