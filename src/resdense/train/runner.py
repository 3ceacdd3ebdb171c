"""A whole training run: :func:`train` locks the run directory and drives a :class:`Trainer`, which
reads top to bottom::

    trainer.restore(resume)
    while trainer.training:
        epoch = trainer.run_epoch()
        if epoch.diverged:
            break
        trainer.end_epoch(epoch)
    return trainer.finish()

The test split is read once, after the last epoch, for the final summary; model selection
(``best``) uses the validation split only. SIGTERM and Ctrl-C stop at the next step boundary
with a checkpoint of that point (see ``stop.py``); a full disk stops with one line saying what
could not be written and how to resume.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .._io import atomic_write_text
from ..errors import ConfigError, WriteError
from ..outputs import SEEDS, claim
from ..runlock import RunLock
from . import checkpoint as ckpt
from . import finetune, graphs
from .config import TrainConfig, apply_overrides, validate
from .context import RunContext, build_context, build_optimizer, model_depth, seed_everything
from .distributed import is_main_process, log
from .engine import EpochProgress, EpochSettings, EpochStats, NonFiniteLossError, StopRequested, evaluate, train_one_epoch
from .final import final_evaluation
from .rundir import check_run_dir, prepare_run_dir, resolve_resume_config, resume_hint, take_run_dir
from .schedule import make_schedule, short_run_min_scale, train_image_size
from .state import EpochPosition, RunState, checkpoint_meta, load_checkpoint, save_run
from .stop import StopFlag, StopNow
from .tensorboard import EventLog

# The run's own names, and those callers imported from here before the run's pieces had modules
# of their own (context, rundir, state, final): they still can.
__all__ = ["METRIC_FIELDS", "EpochResult", "RunContext", "Trainer", "build_context", "build_optimizer",
           "final_evaluation", "is_main_process", "log", "model_depth", "prepare_run_dir", "record_gradients",
           "resolve_resume_config", "seed_everything", "train", "train_seeds"]
_restore = load_checkpoint  # the name it had here

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_error", "val_loss", "val_error", "images_per_s",
                 "train_size", "epoch_time", "wall_time"]
EpochCallback = Callable[[RunContext, dict[str, Any]], None]


@dataclass
class EpochResult:
    """One epoch, trained and validated (or cut short where the loss diverged)."""

    started: float                                 # perf_counter at the epoch's start (resumed: its first part's)
    size: tuple[int, ...]                          # the training image size this epoch
    stats: Optional[EpochStats] = None             # the training half; None where it diverged
    val: dict[str, Any] = field(default_factory=dict)  # evaluate()'s loss and error; empty without a validation split
    diverged: Optional[str] = None                 # where the loss became non-finite (on_divergence=finish)


def record_gradients(ctx: RunContext, run_dir: Path, epoch: int, batches: int = 2,
                     events: Optional[EventLog] = None, step: int = 0, draw: bool = True) -> None:
    """Per-layer gradient norms on a few validation batches: RUN/gradients/epoch-NNNN.json, and
    with ``draw`` its figure epoch-NNNN.png (epoch 0 is the initialisation)."""
    from .. import plots
    from ..analysis.gradients import gradient_norms

    if ctx.val_loader is None:
        raise ConfigError("--record-gradients needs a validation split (--val-size > 0)")
    report = gradient_norms(ctx.model, ctx.val_loader, max_batches=batches, autocast_dtype=ctx.amp_dtype)
    out = run_dir / "gradients"
    out.mkdir(exist_ok=True)
    atomic_write_text(out / f"epoch-{epoch:04d}.json", json.dumps(report.to_dict(), indent=2))
    if draw:
        plots.plot_gradient_norms({f"{ctx.cfg.model} epoch {epoch}": report}, out / f"epoch-{epoch:04d}.png",
                                  title=f"Gradient norm per layer, {ctx.cfg.model}, epoch {epoch}")
    if events is not None:
        events.gradients(step, report)


def _write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


class Trainer:
    """One training run: a :class:`RunContext` (data, model, optimiser: built once) stepped
    epoch by epoch, its progress kept in a :class:`RunState` (what every checkpoint saves).
    ``stop``: the run's signal flag; ``epoch_callback(ctx, row)`` is called after each epoch's
    checkpoint."""

    def __init__(self, ctx: RunContext, run_dir: Path, stop: Optional[StopFlag] = None,
                 epoch_callback: Optional[EpochCallback] = None) -> None:
        cfg = ctx.cfg
        self.ctx, self.cfg, self.run_dir, self.stop, self.epoch_callback = ctx, cfg, run_dir, stop, epoch_callback
        self.state = RunState(warmup_done=ctx.warmup_lr is None)
        self.schedule = make_schedule(cfg, ctx.total_steps)
        self.settings = EpochSettings(ctx.device, ctx.amp_dtype, cfg.label_smoothing, ctx.total_steps, ctx.warmup_lr,
                                      cfg.warmup_until_error, cfg.curve_every, cfg.grad_clip)
        self.steps_per_epoch = len(ctx.train_loader)
        self.total_epochs = math.ceil(ctx.total_steps / self.steps_per_epoch)
        self.meta = checkpoint_meta(ctx)
        self.events: Optional[EventLog] = None

    @property
    def training(self) -> bool:
        """Whether steps are left (or an epoch resumed inside it still has to be validated)."""
        return self.state.step < self.ctx.total_steps or self.state.position is not None

    def restore(self, resume: bool) -> None:
        """With ``resume``, continue from the run's last checkpoint (if it has one); else start
        from ``init_from`` or a fresh model. Then write config.json and say what is trained."""
        run_dir, cfg = self.run_dir, self.cfg
        point = ckpt.find_resume_point(run_dir) if resume else None
        if point is not None:
            self.state = RunState.from_saved(load_checkpoint(self.ctx, point, run_dir), self.state.wall_start)
            at = self.state.position
            # Epochs numbered as the stop line numbers them: a mid-epoch point is inside epoch N+1.
            log(f"resuming {run_dir} at step {self.state.step} "
                + (f"(epoch {self.state.epoch + 1}, batch {at.batch})" if at else f"(after epoch {self.state.epoch})"))
        elif resume:
            log(f"nothing to resume in {run_dir}; starting a new run")
        if point is None and cfg.init_from is not None:  # a resumed fine-tune continues from its own weights
            log(finetune.initialise(self.ctx.model, cfg, self.ctx.splits.classes))
            if cfg.recalibrate_bn:
                seen = finetune.recalibrate_bn(self.ctx.model, finetune.recalibration_batches(self.ctx))
                log(f"batch-norm statistics re-estimated on {seen} training images")
        self._begin()

    def start_epoch(self) -> tuple[EpochResult, EpochProgress]:
        """The next epoch's result to fill (its clock and image size) and where its training starts
        (a resumed epoch: where its checkpoint was taken)."""
        state, ctx, cfg = self.state, self.ctx, self.cfg
        size = train_image_size(state.epoch, self.total_epochs, tuple(ctx.splits.image_size),
                                short_run_min_scale(cfg, ctx.total_steps), cfg.resize_ramp, cfg.resize_step)
        resumed, state.position = state.position, None
        result = EpochResult(time.perf_counter() - (resumed.epoch_time if resumed else 0.0), size)
        return result, resumed.progress if resumed else EpochProgress()

    def run_epoch(self) -> EpochResult:
        """Train the next epoch (a resumed one from where its checkpoint was taken) and validate it."""
        state = self.state
        result, progress = self.start_epoch()
        with self._bar() as bar:
            result.stats = self._train(result, progress, bar)
        if result.stats is None:
            result.diverged = state.diverged
            return result
        result.val = self._validate(result.stats, result.started)
        return result

    def end_epoch(self, epoch: EpochResult) -> None:
        """Record a finished epoch: its metrics row, its checkpoint (``best`` by validation error),
        the metrics files, events and gradients; then stop here if a signal asked to."""
        state, ctx = self.state, self.ctx
        state.epoch += 1
        row = self._row(epoch)
        state.history.append(row)
        val_error = row["val_error"] if not math.isnan(row["val_error"]) else row["train_error"]
        is_best = val_error < state.best_val
        state.best_val = min(state.best_val, val_error)
        point = save_run(ctx, self.run_dir, state, self.meta, is_best=is_best, val_error=row["val_error"])
        if is_main_process():
            self._write_records(row)
        if self.epoch_callback is not None:  # after the checkpoint: a crash here is a crash between epochs
            self.epoch_callback(ctx, row)
        log(f"epoch {state.epoch}/{self.total_epochs}  train loss {row['train_loss']:.4f} err {row['train_error']:.4f}  "
            f"val loss {row['val_loss']:.4f} err {row['val_error']:.4f}  {row['images_per_s']:.0f} img/s  "
            f"{row['epoch_time']:.0f}s" + (f"  (trained at {row['train_size']})" if self.cfg.min_scale < 1 else ""))
        if self.stop is not None and self.stop.requested():
            self._close_events()
            raise self.stop.stopped(self.run_dir, f"after epoch {state.epoch}", point)

    def finish(self) -> dict[str, Any]:
        """The final evaluation (test error, summary.json); returns the summary row."""
        self._close_events()
        try:
            return final_evaluation(self.ctx, self.run_dir, self.state.history, self.stop,
                                    diverged=self.state.diverged, step=self.state.step)
        except StopRequested:
            raise self.stop.stopped(self.run_dir, "during the final evaluation", None) from None  # type: ignore[union-attr]

    def _begin(self) -> None:
        """Write config.json, open the event log, say what is trained (and record the gradients
        at initialisation)."""
        ctx, cfg, run_dir = self.ctx, self.cfg, self.run_dir
        if is_main_process():
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        self.events = EventLog.open(run_dir, cfg.tensorboard, is_main_process())
        if self.events is not None:
            self.events.skip_curve(len(self.state.curve))
        if self.schedule.note:
            log(self.schedule.note)
        if cfg.cuda_graphs:
            log(graphs.describe(graphs.static_shapes(cfg, ctx.splits.image_size, ctx.splits.in_chans, self.total_epochs,
                                                     short_run_min_scale(cfg, ctx.total_steps), ctx.world_size)))
        log(f"training {cfg.model} on {ctx.splits.name}: {ctx.train_loader.num_samples} images, "
            f"{self.total_epochs} epochs ({ctx.total_steps} steps of {cfg.batch_size}), {ctx.device}, "
            f"{'bf16' if ctx.amp_dtype else 'fp32'}, out {run_dir}")
        if cfg.record_gradients and self.state.epoch == 0 and is_main_process():
            record_gradients(ctx, run_dir, 0, events=self.events)

    def _train(self, epoch: EpochResult, progress: EpochProgress, bar: Any) -> Optional[EpochStats]:
        """Train the epoch from ``progress``, in pieces where it stops inside for a checkpoint (a
        signal, ``checkpoint_every``); None where the loss diverged and the run is to finish there."""
        state, ctx = self.state, self.ctx
        should_stop = self._should_stop if (self.stop is not None or self.cfg.checkpoint_every) else None
        while True:
            ctx.train_loader.set_epoch(state.epoch, epoch.size, start_batch=progress.batch)
            try:
                stats = train_one_epoch(ctx.train_model, ctx.train_loader, ctx.optimizer, self.schedule, state,
                                        self.settings, curve=state.curve, progress=progress, bar=bar,
                                        should_stop=should_stop)
            except NonFiniteLossError as e:
                if self.cfg.on_divergence != "finish":
                    raise
                # The loss is checked before its backward pass: the weights are the last finite ones.
                state.diverged = e.what
                log(f"{e.what}; on_divergence=finish: the run ends here and its weights are evaluated as they are")
                return None
            progress = stats.progress
            if not stats.stopped or progress.batch >= self.steps_per_epoch or state.step >= ctx.total_steps:
                return stats
            point = self._save_inside_epoch(progress, epoch.started)
            if self.stop is not None and self.stop.stopping:
                raise self.stop.stopped(self.run_dir, f"at step {state.step} (epoch {state.epoch + 1}, batch "
                                        f"{progress.batch} of {self.steps_per_epoch})", point)

    def _validate(self, stats: EpochStats, started: float) -> dict[str, Any]:
        """Validation loss and error (empty without a validation split); a signal during it
        checkpoints the trained epoch, and the resumed run validates it."""
        ctx, stop = self.ctx, self.stop
        if not ctx.val_loader:
            return {}
        try:
            return evaluate(ctx.model, ctx.val_loader, device=ctx.device, amp_dtype=ctx.amp_dtype,
                            should_stop=stop.requested if stop else None)
        except StopRequested:  # asked only with a stop flag
            point = self._save_inside_epoch(stats.progress, started)
            where = f"while validating epoch {self.state.epoch + 1}"
            raise stop.stopped(self.run_dir, where, point) from None  # type: ignore[union-attr]

    def _should_stop(self) -> bool:
        """What the engine asks after each step: a stop signal, or a checkpoint due (``checkpoint_every``)."""
        # requested() first and always: under DDP every rank must join its all-reduce at every step.
        signalled = self.stop.requested() if self.stop is not None else False
        every = self.cfg.checkpoint_every
        return signalled or bool(every and self.state.step % every == 0)

    def _save_inside_epoch(self, progress: EpochProgress, started: float) -> Optional[Path]:
        """A checkpoint of this exact step: the loader position and the epoch's running sums too."""
        state = self.state
        position = EpochPosition(state.epoch, progress.batch, self.ctx.train_loader.epoch_seed, progress,
                                 time.perf_counter() - started, state.wall_time())
        return save_run(self.ctx, self.run_dir, state, self.meta, is_best=False, val_error=math.nan,
                        position=position, name=f"step-{state.step:07d}")

    def _bar(self) -> Any:
        """A tqdm bar for the epoch on a terminal; nothing (one log line per epoch) elsewhere."""
        if not (self.cfg.progress and sys.stderr.isatty() and is_main_process()):
            return nullcontext(None)
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, desc=f"epoch {self.state.epoch + 1}/{self.total_epochs}",
                    leave=False, dynamic_ncols=True)

    def _row(self, epoch: EpochResult) -> dict[str, Any]:
        """The epoch's metrics row (metrics.jsonl / metrics.csv)."""
        stats = epoch.stats
        assert stats is not None  # end_epoch is for trained epochs
        return {"epoch": self.state.epoch, "step": self.state.step, "lr": self.ctx.optimizer.param_groups[0]["lr"],
                "train_loss": stats.train_loss, "train_error": stats.train_error,
                "val_loss": epoch.val.get("loss", math.nan), "val_error": epoch.val.get("error", math.nan),
                "images_per_s": stats.images_per_s, "train_size": "x".join(map(str, epoch.size)),
                "epoch_time": time.perf_counter() - epoch.started, "wall_time": self.state.wall_time()}

    def _write_records(self, row: dict[str, Any]) -> None:
        """Metrics, the training curve, event files and (with record_gradients) gradient norms."""
        state = self.state
        _write_metrics(self.run_dir, state.history)
        atomic_write_text(self.run_dir / "curve.jsonl", "".join(json.dumps(r) + "\n" for r in state.curve))
        if self.events is not None:
            self.events.epoch(row, state.curve)
        if self.cfg.record_gradients:
            # Drawn at the first and last epoch only: a figure costs more than the norms.
            record_gradients(self.ctx, self.run_dir, state.epoch, events=self.events, step=state.step,
                             draw=state.epoch >= self.total_epochs)

    def _close_events(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          flag_overrides: Optional[dict[str, Any]] = None, rank: int = 0, world_size: int = 1,
          device: Optional[torch.device] = None, epoch_callback: Optional[EpochCallback] = None,
          lock: Optional[RunLock] = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns its summary row (also written to summary.json).

    The run directory is locked for the whole run (``lock``: one the caller already holds, as a
    study does; else taken here and released at the end)."""
    if not resume:
        validate(cfg)  # before anything is created on disk: a bad flag leaves no folder behind
    # Rank 0 alone checks and later locks the run directory; the others wait for it (a rank that
    # looked after rank 0 created it would take it for an existing run).
    own_lock = lock is None or not lock.held
    run_dir = check_run_dir(cfg, resume, overwrite, lock) if is_main_process() else Path(cfg.out)
    if resume:
        cfg = validate(resolve_resume_config(cfg, run_dir, flag_overrides or {}))
    # Data and model before the folder: a wrong dataset, batch or model setting leaves nothing behind.
    ctx = build_context(cfg, rank, world_size, device)
    if is_main_process():
        lock = take_run_dir(run_dir, overwrite, lock)
    try:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        with StopFlag() as stop:
            return _train_locked(ctx, run_dir, resume, epoch_callback, stop)
    # The one line the user sees: what failed, what is safe on disk, how to go on.
    except WriteError as e:
        raise WriteError(f"{e}; {resume_hint(run_dir)}", e.errno, e.filename) from None
    except StopNow as e:
        raise StopNow(f"{e}; {resume_hint(run_dir)}", e.signum) from None
    finally:
        if own_lock and lock is not None:
            lock.release()


def _train_locked(ctx: RunContext, run_dir: Path, resume: bool, epoch_callback: Optional[EpochCallback],
                  stop: Optional[StopFlag] = None) -> dict[str, Any]:
    trainer = Trainer(ctx, run_dir, stop, epoch_callback)
    trainer.restore(resume)
    while trainer.training:
        epoch = trainer.run_epoch()
        if epoch.diverged:  # on_divergence=finish: the weights are evaluated as they are
            break
        trainer.end_epoch(epoch)
    return trainer.finish()


def train_seeds(cfg: TrainConfig, seeds: list[int], fuse: bool = False, **kwargs: Any) -> dict[str, Any]:
    """One run per seed in ``OUT/seed<N>`` (with ``fuse``: trained as one model, see
    :mod:`.fused`); returns mean ± std of the test errors."""
    if cfg.out is None:
        raise ConfigError("--out RUN_DIR is required")
    cfgs = [apply_overrides(cfg, {"seed": seed, "out": str(Path(cfg.out) / f"seed{seed}")}, "--seeds") for seed in seeds]
    if fuse:
        from .fused import CPU_NOTE, fuse_refusal, train_fused
        from ..hardware import resolve_device

        refusal = fuse_refusal(cfg)
        if refusal:  # before anything is written
            raise ConfigError(f"cannot fuse these runs: {refusal}; drop --fuse-seeds")
        if resolve_device(cfg.device).type != "cuda":
            log(CPU_NOTE)
    if is_main_process():
        claim(cfg.out, SEEDS)
    rows = train_fused(cfgs, **kwargs) if fuse else [train(run_cfg, **kwargs) for run_cfg in cfgs]
    summary: dict[str, Any] = {"seeds": seeds, "runs": [str(Path(cfg.out) / f"seed{s}") for s in seeds]}
    for key in ("test_error_last", "test_error_best", "final_train_error", "final_val_error", "wall_time"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "values": values}
    if is_main_process():
        atomic_write_text(Path(cfg.out) / "summary.json", json.dumps(summary, indent=2))
        e = summary["test_error_last"]
        log(f"{len(seeds)} seeds: test error {100 * e['mean']:.2f} ± {100 * e['std']:.2f} % (last epoch)")
    return summary
