"""The run's final evaluation: test error at the last epoch and at the best validation epoch,
written to ``summary.json``. The only read of the test set."""

from __future__ import annotations

import json
import math
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .._io import atomic_write_text
from ..data.loader import TensorLoader
from . import checkpoint as ckpt
from .context import RunContext
from .distributed import is_main_process, log
from .engine import evaluate
from .stop import StopFlag


def _training_summary(ctx: RunContext, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's fields that the metrics rows give."""
    cfg, last = ctx.cfg, history[-1] if history else None
    return {"model": cfg.model, "data": ctx.splits.name, "seed": cfg.seed, "epochs": len(history),
            "steps": last["step"] if last else 0,
            "final_train_error": last["train_error"] if last else math.nan,
            "final_val_error": last["val_error"] if last else math.nan,
            "wall_time": last["wall_time"] if last else 0.0,
            "images_per_s": statistics.fmean(r["images_per_s"] for r in history) if history else 0.0,
            "config": cfg.to_dict()}


def _loader(ctx: RunContext, images: torch.Tensor, labels: torch.Tensor) -> TensorLoader:
    """An evaluation loader (unaugmented, in order) normalised as the run's data."""
    return TensorLoader(images, labels, ctx.cfg.eval_batch_size, mean=ctx.splits.mean, std=ctx.splits.std,
                        device=ctx.device, channels_last=ctx.cfg.channels_last)


def _test_set(ctx: RunContext) -> Any:
    test = ctx.splits.load_test()
    subset = ctx.cfg.test_subset
    if subset is not None and subset < len(test.images):
        # The same seeded subset for every run, whatever the run's own seed.
        pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))[:subset]
        test = type(test)(test.images[pick], test.labels[pick])
    return test


def _models_to_test(ctx: RunContext, run_dir: Path) -> dict[str, nn.Module]:
    """The last epoch's model, and the best validation epoch's where that is another checkpoint."""
    evals = {"last": ctx.model}
    best_dir = run_dir / "best"
    if best_dir.exists() and best_dir.resolve() != (run_dir / "last").resolve():
        best_model = ckpt.build_model_from_meta(ckpt.read_meta(best_dir)).to(ctx.device)
        if ctx.cfg.channels_last:
            best_model = best_model.to(memory_format=torch.channels_last)
        ckpt.load_weights(best_model, ckpt.read_weights(best_dir), source=str(best_dir))
        evals["best"] = best_model
    return evals


def final_evaluation(ctx: RunContext, run_dir: Path, history: list[dict[str, Any]],
                     stop: Optional[StopFlag] = None, diverged: Optional[str] = None, step: int = 0) -> dict[str, Any]:
    """Test error at the last epoch and at the best validation epoch: the only read of the test set.
    A stop signal ends it between batches (:class:`StopRequested`); resuming evaluates again.
    ``diverged``: the run ended at a non-finite loss at ``step`` (``on_divergence=finish``)."""
    # Rank 0 alone evaluates here, so the check is this process's flag, not an all-reduce.
    should_stop = stop.signalled if stop is not None else None
    cfg = ctx.cfg
    summary = _training_summary(ctx, history)
    if diverged is not None:
        summary.update(diverged=diverged, steps=step)
    if not is_main_process():
        return summary
    # Size and cost of the trained model at this run's image size (studies plot error against them).
    from ..analysis.complexity import profile

    summary["input_size"] = [ctx.splits.in_chans, *ctx.splits.image_size]  # what the MACs were counted at
    summary["params"], summary["macs"], _ = profile(ctx.model, tuple(summary["input_size"]))
    # The training images the steps drew from (every rank holds all of them): a study's budget.
    summary["train_images"] = len(ctx.train_loader.images)
    if cfg.eval_train:
        # The papers' "training error": the final model in eval mode on its training images,
        # unaugmented, after the last step (the running error above averages moving weights).
        train_images = _loader(ctx, ctx.train_loader.images, ctx.train_loader.labels)
        res = evaluate(ctx.model, train_images, device=ctx.device, amp_dtype=ctx.amp_dtype, should_stop=should_stop)
        summary["train_error_eval"], summary["train_loss_eval"] = res["error"], res["loss"]
    test = _test_set(ctx)
    summary["test_images"] = len(test.images)
    loader = _loader(ctx, test.images, test.labels)
    for label, model in _models_to_test(ctx, run_dir).items():
        res = evaluate(model, loader, device=ctx.device, amp_dtype=ctx.amp_dtype, tta_flip=cfg.tta_flip,
                       should_stop=should_stop)
        summary[f"test_error_{label}"] = res["error"]
        summary[f"test_loss_{label}"] = res["loss"]
    summary.setdefault("test_error_best", summary["test_error_last"])
    best_dir = run_dir / "best"
    summary["best_epoch"] = int(ckpt.read_meta(best_dir.resolve())["epoch"]) if best_dir.exists() else len(history)
    summary["test_accuracy_last"] = 1 - summary["test_error_last"]
    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")  # the date reports show
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    log(f"test error: last epoch {summary['test_error_last']:.4f} (accuracy {summary['test_accuracy_last']:.4f}), "
        f"best-val epoch {summary['best_epoch']} {summary['test_error_best']:.4f}; wall {summary['wall_time']:.0f}s")
    return summary
