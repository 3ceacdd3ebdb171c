"""A whole training run: data, model, optimiser, the epoch loop, metrics, checkpoints, resume.

The test split is read once, after the last epoch, for the final summary; model selection
(``best``) uses the validation split only. SIGTERM and Ctrl-C stop at the next step boundary
with a checkpoint of that point (see ``stop.py``); a full disk stops with one line saying what
could not be written and how to resume.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .._io import atomic_write_text
from ..data import load_dataset
from ..data.loader import Augment, TensorLoader
from ..errors import CheckpointError, ConfigError, UserError, WriteError
from ..hardware import resolve_device, resolve_precision
from ..models import create_model
from ..outputs import RUN, SEEDS, check_writable, claim, clear, is_empty, kind_of, mark
from ..runlock import RunLock
from . import checkpoint as ckpt
from . import finetune
from .config import TrainConfig, apply_overrides, validate
from .engine import EpochProgress, NonFiniteLossError, StopRequested, TrainState, evaluate, train_one_epoch
from .schedule import make_schedule, short_run_min_scale, short_run_total, train_image_size
from .stop import StopFlag, StopNow, resume_hint
from .tensorboard import EventLog

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_error", "val_loss", "val_error", "images_per_s",
                 "train_size", "epoch_time", "wall_time"]


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def model_depth(model: nn.Module) -> int:
    """Weighted layers on the main path (convolutions outside shortcuts, plus linear layers):
    the depth in a model's name."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name)


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = finetune.param_groups(model, cfg)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@dataclass
class RunContext:
    """Everything a run builds once: data, loaders, model, optimiser, schedule."""

    cfg: TrainConfig
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    splits: Any
    train_loader: TensorLoader
    val_loader: Optional[TensorLoader]
    model: nn.Module
    train_model: nn.Module  # the model stepped by the optimiser (compiled and/or DDP-wrapped)
    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup_lr: Optional[float]
    world_size: int = 1
    rank: int = 0


def _model_kwargs(cfg: TrainConfig, splits: Any) -> dict[str, Any]:
    kwargs = dict(cfg.model_kwargs)
    kwargs.setdefault("num_classes", splits.num_classes)
    kwargs.setdefault("in_chans", splits.in_chans)
    drop = cfg.drop_rate if cfg.drop_rate is not None else (
        cfg.drop_rate_without_augment if not cfg.augment else None)
    if drop is not None:
        kwargs.setdefault("drop_rate", drop)
    return kwargs


def build_context(cfg: TrainConfig, rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None) -> RunContext:
    device = device or resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    splits = load_dataset(cfg.data, cfg.data_dir, download=cfg.download, val_size=cfg.val_size, split_seed=0,
                          **finetune.data_options(cfg))
    train = splits.train
    images, labels = train.images, train.labels
    if cfg.train_subset is not None:
        if cfg.train_subset > len(images):
            raise ConfigError(f"--train-subset {cfg.train_subset} is larger than the {len(images)} training images")
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train_subset]
        images, labels = images[pick], labels[pick]
    if cfg.batch_size > len(images):
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the {len(images)} training images")
    augment = Augment(cfg.pad, cfg.flip) if cfg.augment else None
    common = dict(mean=splits.mean, std=splits.std, device=device, channels_last=cfg.channels_last)
    train_loader = TensorLoader(images, labels, cfg.batch_size, shuffle=True, augment=augment, drop_last=True,
                                seed=cfg.seed, rank=rank, world_size=world_size, **common)
    val_loader = (TensorLoader(splits.val.images, splits.val.labels, cfg.eval_batch_size, **common)
                  if len(splits.val.images) else None)

    model_kwargs = _model_kwargs(cfg, splits)
    model = create_model(cfg.model, **model_kwargs).to(device)
    finetune.prepare_model(model, cfg)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg.model_kwargs = {k: v for k, v in model_kwargs.items()}
    train_model = model
    if cfg.sync_bn:
        if world_size == 1:
            raise ConfigError("--sync-bn only matters with several processes (--nproc N or torchrun)")
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); drop it")
        model = train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    total = cfg.iterations if cfg.iterations is not None else cfg.epochs * steps_per_epoch
    total = short_run_total(cfg, steps_per_epoch, total)
    deep = model_depth(model) >= cfg.warmup_min_depth
    warmup_lr = cfg.warmup_lr if (cfg.warmup_lr is not None and cfg.warmup_until_error is not None and deep) else None
    return RunContext(cfg, device, amp_dtype, splits, train_loader, val_loader, model, train_model, optimizer,
                      total, warmup_lr, world_size, rank)


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
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def _holds_a_run(run_dir: Path) -> bool:
    return kind_of(run_dir) == RUN.name and not is_empty(run_dir)


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool, lock: Optional[RunLock] = None) -> tuple[Path, RunLock]:
    """Check ``--out`` against ``--resume``/``--overwrite`` and lock it for this process (a second
    process in the same directory is refused with the first one's id). Returns the directory and
    the held lock. A folder resdense did not make is refused before anything is written in it;
    ``--overwrite`` deletes only what a run is made of (see :mod:`resdense.outputs`)."""
    if cfg.out is None:
        raise ConfigError("--out RUN_DIR is required: where the run's checkpoints and metrics go")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    run_dir = Path(cfg.out)
    check_writable(run_dir, RUN)
    if _holds_a_run(run_dir) and not resume and not overwrite:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    lock = lock or RunLock(run_dir)
    lock.acquire()
    ckpt.remove_stale_temporaries(run_dir)  # a killed writer's leftovers: ours to clean now we hold the lock
    mark(run_dir, RUN)
    if overwrite:
        clear(run_dir, RUN)
    return run_dir, lock


def _same_setting(saved: Any, given: Any) -> bool:
    # The saved model_kwargs also hold what the run filled in (num_classes, in_chans ...): the
    # same -a flags as the first time agree with them when every key given matches.
    if isinstance(saved, dict) and isinstance(given, dict):
        return all(k in saved and saved[k] == v for k, v in given.items())
    return saved == given


def resolve_resume_config(cfg: TrainConfig, run_dir: Path, flag_overrides: dict[str, Any]) -> TrainConfig:
    """On resume the run's saved config wins; flags may extend the run (epochs, iterations) or
    change how it runs (progress, threads), not what is trained."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return cfg
    saved_cfg = apply_overrides(TrainConfig(), json.loads(saved.read_text()), str(saved))
    mutable = {"epochs", "iterations", "progress", "threads", "out", "device", "eval_batch_size", "compile",
               "checkpoint_every"}
    changed = {k: v for k, v in flag_overrides.items() if k not in mutable and not _same_setting(getattr(saved_cfg, k), v)}
    for key in ("model", "data"):
        if key in changed:
            raise ConfigError(f"{run_dir} was trained with {key}={getattr(saved_cfg, key)!r}, not {changed[key]!r}; "
                              "use another --out or drop --resume")
    if changed:
        raise ConfigError(f"--resume keeps the run's settings; these differ from {saved}: {', '.join(sorted(changed))}")
    return apply_overrides(saved_cfg, {k: v for k, v in flag_overrides.items() if k in mutable}, "flags")


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          flag_overrides: Optional[dict[str, Any]] = None, rank: int = 0, world_size: int = 1,
          device: Optional[torch.device] = None,
          epoch_callback: Optional[Callable[[RunContext, dict[str, Any]], None]] = None,
          lock: Optional[RunLock] = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns its summary row (also written to summary.json).

    The run directory is locked for the whole run (``lock``: one the caller already holds, as a
    study does; else taken here and released at the end)."""
    if not resume:
        validate(cfg)  # before anything is created on disk: a bad flag leaves no folder behind
    # Rank 0 alone checks, locks and prepares the run directory; the others wait for it (a rank
    # that looked after rank 0 created it would take it for an existing run).
    own_lock = lock is None or not lock.held
    if is_main_process():
        run_dir, lock = prepare_run_dir(cfg, resume, overwrite, lock)
    else:
        run_dir = Path(cfg.out)
    try:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        with StopFlag() as stop:
            return _train_locked(cfg, run_dir, resume, flag_overrides, rank, world_size, device, epoch_callback, stop)
    # The one line the user sees: what failed, what is safe on disk, how to go on.
    except WriteError as e:
        raise WriteError(f"{e}; {resume_hint(run_dir)}", e.errno, e.filename) from None
    except StopNow as e:
        raise StopNow(f"{e}; {resume_hint(run_dir)}", e.signum) from None
    finally:
        if own_lock and lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, run_dir: Path, resume: bool, flag_overrides: Optional[dict[str, Any]],
                  rank: int, world_size: int, device: Optional[torch.device],
                  epoch_callback: Optional[Callable[[RunContext, dict[str, Any]], None]],
                  stop: Optional[StopFlag] = None) -> dict[str, Any]:
    if resume:
        cfg = resolve_resume_config(cfg, run_dir, flag_overrides or {})
        validate(cfg)
    ctx = build_context(cfg, rank, world_size, device)
    cfg = ctx.cfg
    state = TrainState(warmup_done=ctx.warmup_lr is None)
    history: list[dict[str, Any]] = []
    curve: list[dict[str, float]] = []
    best_val = math.inf
    wall_start = time.perf_counter()
    wall_offset = 0.0
    position: Optional[dict[str, Any]] = None  # where inside an epoch a mid-epoch checkpoint stopped
    point = ckpt.find_resume_point(run_dir) if resume else None
    if point is not None:
        saved = _restore(ctx, point, run_dir)
        state = TrainState(step=saved["step"], epoch=saved["epoch"], warmup_done=saved["warmup_done"])
        history = list(saved["metrics"])
        curve = list(saved["curve"])
        best_val = saved["best_val_error"]
        wall_offset = history[-1]["wall_time"] if history else 0.0
        position = saved.get("position")
        if position is not None:
            wall_offset = position["wall_time"]
        # Epochs numbered as the stop line numbers them: a mid-epoch point is inside epoch N+1.
        log(f"resuming {run_dir} at step {state.step} "
            + (f"(epoch {state.epoch + 1}, batch {position['batch']})" if position else f"(after epoch {state.epoch})"))
    elif resume:
        log(f"nothing to resume in {run_dir}; starting a new run")
    if point is None and cfg.init_from is not None:  # a resumed fine-tune continues from its own weights
        log(finetune.initialise(ctx.model, cfg, ctx.splits.classes))
    if is_main_process():
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    events = EventLog.open(run_dir, cfg.tensorboard, is_main_process())
    if events is not None:
        events.skip_curve(len(curve))

    schedule = make_schedule(cfg, ctx.total_steps)
    if schedule.note:
        log(schedule.note)
    steps_per_epoch = len(ctx.train_loader)
    total_epochs = math.ceil(ctx.total_steps / steps_per_epoch)
    meta = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "data": ctx.splits.name,
            "classes": list(ctx.splits.classes), "mean": list(ctx.splits.mean), "std": list(ctx.splits.std),
            "input_size": [ctx.splits.in_chans, *ctx.splits.image_size], "config": cfg.to_dict()}
    log(f"training {cfg.model} on {ctx.splits.name}: {ctx.train_loader.num_samples} images, "
        f"{total_epochs} epochs ({ctx.total_steps} steps of {cfg.batch_size}), {ctx.device}, "
        f"{'bf16' if ctx.amp_dtype else 'fp32'}, out {run_dir}")
    progress_ctx = _progress(cfg, steps_per_epoch)
    if cfg.record_gradients and state.epoch == 0 and is_main_process():
        record_gradients(ctx, run_dir, 0, events=events)

    def save_inside_epoch(progress: EpochProgress, epoch_time: float) -> Path:
        """A checkpoint of this exact step: the loader position and the epoch's running sums too."""
        where = {"epoch": state.epoch, "batch": progress.batch, "epoch_seed": ctx.train_loader.epoch_seed,
                 "progress": progress.to_dict(), "epoch_time": epoch_time,
                 "wall_time": wall_offset + time.perf_counter() - wall_start}
        return _save(ctx, run_dir, state, meta, history, curve, best_val, is_best=False, val_error=math.nan,
                     position=where, name=f"step-{state.step:07d}")

    should_stop = _stop_check(stop, state, cfg.checkpoint_every)
    diverged: Optional[str] = None
    while state.step < ctx.total_steps or position is not None:
        size = train_image_size(state.epoch, total_epochs, tuple(ctx.splits.image_size),
                                short_run_min_scale(cfg, ctx.total_steps), cfg.resize_ramp, cfg.resize_step)
        progress = EpochProgress.from_dict(position["progress"]) if position else EpochProgress()
        epoch_start = time.perf_counter() - (position["epoch_time"] if position else 0.0)
        position = None
        with progress_ctx(state.epoch, total_epochs) as bar:
            while True:  # the epoch, in pieces when it stops for a checkpoint inside it
                ctx.train_loader.set_epoch(state.epoch, size, start_batch=progress.batch)
                try:
                    stats = train_one_epoch(
                        ctx.train_model, ctx.train_loader, ctx.optimizer, schedule, state, device=ctx.device,
                        amp_dtype=ctx.amp_dtype, label_smoothing=cfg.label_smoothing, max_steps=ctx.total_steps,
                        warmup_lr=ctx.warmup_lr, warmup_until_error=cfg.warmup_until_error, progress=bar,
                        curve=curve, curve_every=cfg.curve_every, grad_clip=cfg.grad_clip, start=progress,
                        should_stop=should_stop)
                except NonFiniteLossError as e:
                    if cfg.on_divergence != "finish":
                        raise
                    # The loss is checked before its backward pass: the weights are the last finite ones.
                    diverged = e.what
                    log(f"{diverged}; on_divergence=finish: the run ends here and its weights are evaluated as they are")
                    break
                progress = stats["progress"]
                if not stats["stopped"] or progress.batch >= steps_per_epoch or state.step >= ctx.total_steps:
                    break
                point = save_inside_epoch(progress, time.perf_counter() - epoch_start)
                if stop is not None and stop.stopping:
                    raise stop.stopped(run_dir, f"at step {state.step} (epoch {state.epoch + 1}, batch "
                                       f"{progress.batch} of {steps_per_epoch})", point)
        if diverged is not None:
            break
        try:
            val = (evaluate(ctx.model, ctx.val_loader, device=ctx.device, amp_dtype=ctx.amp_dtype,
                            should_stop=stop.requested if stop else None) if ctx.val_loader else {})
        except StopRequested:  # the epoch is trained, its validation not done: resume validates it
            point = save_inside_epoch(progress, time.perf_counter() - epoch_start)
            raise stop.stopped(run_dir, f"while validating epoch {state.epoch + 1}", point) from None  # type: ignore[union-attr]
        state.epoch += 1
        row = {"epoch": state.epoch, "step": state.step, "lr": ctx.optimizer.param_groups[0]["lr"],
               "train_loss": stats["train_loss"], "train_error": stats["train_error"],
               "val_loss": val.get("loss", math.nan), "val_error": val.get("error", math.nan),
               "images_per_s": stats["images_per_s"], "train_size": "x".join(map(str, size)),
               "epoch_time": time.perf_counter() - epoch_start,
               "wall_time": wall_offset + time.perf_counter() - wall_start}
        history.append(row)
        val_error = row["val_error"] if not math.isnan(row["val_error"]) else row["train_error"]
        is_best = val_error < best_val
        best_val = min(best_val, val_error)
        point = _save(ctx, run_dir, state, meta, history, curve, best_val, is_best=is_best, val_error=row["val_error"])
        if is_main_process():
            _write_metrics(run_dir, history)
            atomic_write_text(run_dir / "curve.jsonl", "".join(json.dumps(r) + "\n" for r in curve))
            if events is not None:
                events.epoch(row, curve)
            if cfg.record_gradients:
                # Drawn at the first and last epoch only: a figure costs more than the norms.
                record_gradients(ctx, run_dir, state.epoch, events=events, step=state.step,
                                 draw=state.epoch >= total_epochs)
        if epoch_callback is not None:  # after the checkpoint: a crash here is a crash between epochs
            epoch_callback(ctx, row)
        log(f"epoch {state.epoch}/{total_epochs}  train loss {row['train_loss']:.4f} err {row['train_error']:.4f}  "
            f"val loss {row['val_loss']:.4f} err {row['val_error']:.4f}  {row['images_per_s']:.0f} img/s  "
            f"{row['epoch_time']:.0f}s" + (f"  (trained at {row['train_size']})" if cfg.min_scale < 1 else ""))
        if stop is not None and stop.requested():
            if events is not None:
                events.close()
            raise stop.stopped(run_dir, f"after epoch {state.epoch}", point)
    if events is not None:
        events.close()
    try:
        return final_evaluation(ctx, run_dir, history, stop, diverged=diverged, step=state.step)
    except StopRequested:
        raise stop.stopped(run_dir, "during the final evaluation", None) from None  # type: ignore[union-attr]


def _stop_check(stop: Optional[StopFlag], state: TrainState, every: Optional[int]) -> Optional[Callable[[], bool]]:
    """What the engine asks after each step: a stop signal, or a checkpoint due (``checkpoint_every``)."""
    if stop is None and not every:
        return None

    def check() -> bool:
        # requested() first and always: under DDP every rank must join its all-reduce at every step.
        signalled = stop.requested() if stop is not None else False
        return signalled or bool(every and state.step % every == 0)

    return check


def _save(ctx: RunContext, run_dir: Path, state: TrainState, meta: dict[str, Any], history: list[dict[str, Any]],
          curve: list[dict[str, float]], best_val: float, *, is_best: bool, val_error: float,
          position: Optional[dict[str, Any]] = None, name: Optional[str] = None) -> Optional[Path]:
    """Rank 0 writes the checkpoint (the others return None); every rank waits for it."""
    point = None
    if is_main_process():
        saved_state = {"optimizer": ctx.optimizer.state_dict(), "step": state.step, "epoch": state.epoch,
                       "warmup_done": state.warmup_done, "best_val_error": best_val, "rng": _rng_state(),
                       "metrics": history, "curve": curve, "config": ctx.cfg.to_dict()}
        if position is not None:
            saved_state["position"] = position
        point = ckpt.save_checkpoint(run_dir, state.epoch, ctx.model, saved_state, {**meta, "epoch": state.epoch,
                                     "step": state.step, "val_error": val_error}, is_best=is_best, name=name)
    if position is not None and torch.distributed.is_initialized():
        torch.distributed.barrier()  # a stop: no rank leaves before the checkpoint is on disk
    return point


def _restore(ctx: RunContext, point: Path, run_dir: Optional[Path] = None) -> dict[str, Any]:
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


def final_evaluation(ctx: RunContext, run_dir: Path, history: list[dict[str, Any]],
                     stop: Optional[StopFlag] = None, diverged: Optional[str] = None, step: int = 0) -> dict[str, Any]:
    """Test error at the last epoch and at the best validation epoch: the only read of the test set.
    A stop signal ends it between batches (:class:`StopRequested`); resuming evaluates again.
    ``diverged``: the run ended at a non-finite loss at ``step`` (``on_divergence=finish``)."""
    # Rank 0 alone evaluates here, so the check is this process's flag, not an all-reduce.
    should_stop = (lambda: stop.signum is not None) if stop is not None else None
    cfg = ctx.cfg
    summary: dict[str, Any] = {"model": cfg.model, "data": ctx.splits.name, "seed": cfg.seed,
                               "epochs": len(history), "steps": history[-1]["step"] if history else 0,
                               "final_train_error": history[-1]["train_error"] if history else math.nan,
                               "final_val_error": history[-1]["val_error"] if history else math.nan,
                               "wall_time": history[-1]["wall_time"] if history else 0.0,
                               "images_per_s": statistics.fmean(r["images_per_s"] for r in history) if history else 0.0,
                               "config": cfg.to_dict()}
    if diverged is not None:
        summary.update(diverged=diverged, steps=step)
    if is_main_process():
        # Size and cost of the trained model at this run's image size (studies plot error against them).
        from ..analysis.complexity import profile

        summary["params"], summary["macs"], _ = profile(ctx.model, (ctx.splits.in_chans, *ctx.splits.image_size))
        # The training images the steps drew from (every rank holds all of them): a study's budget.
        summary["train_images"] = len(ctx.train_loader.images)
        if cfg.eval_train:
            # The papers' "training error": the final model in eval mode on its training images,
            # unaugmented, after the last step (the running error above averages moving weights).
            train_images = TensorLoader(ctx.train_loader.images, ctx.train_loader.labels, cfg.eval_batch_size,
                                        mean=ctx.splits.mean, std=ctx.splits.std, device=ctx.device,
                                        channels_last=cfg.channels_last)
            res = evaluate(ctx.model, train_images, device=ctx.device, amp_dtype=ctx.amp_dtype, should_stop=should_stop)
            summary["train_error_eval"], summary["train_loss_eval"] = res["error"], res["loss"]
        test = ctx.splits.load_test()
        if cfg.test_subset is not None and cfg.test_subset < len(test.images):
            # The same seeded subset for every run, whatever the run's own seed.
            pick = torch.randperm(len(test.images), generator=torch.Generator().manual_seed(0))[:cfg.test_subset]
            test = type(test)(test.images[pick], test.labels[pick])
        summary["test_images"] = len(test.images)
        loader = TensorLoader(test.images, test.labels, cfg.eval_batch_size, mean=ctx.splits.mean,
                              std=ctx.splits.std, device=ctx.device, channels_last=cfg.channels_last)
        evals = {"last": ctx.model}
        best_dir = run_dir / "best"
        if best_dir.exists() and best_dir.resolve() != (run_dir / "last").resolve():
            best_model = ckpt.build_model_from_meta(ckpt.read_meta(best_dir)).to(ctx.device)
            if cfg.channels_last:
                best_model = best_model.to(memory_format=torch.channels_last)
            ckpt.load_weights(best_model, ckpt.read_weights(best_dir), source=str(best_dir))
            evals["best"] = best_model
        for label, model in evals.items():
            res = evaluate(model, loader, device=ctx.device, amp_dtype=ctx.amp_dtype, tta_flip=cfg.tta_flip,
                           should_stop=should_stop)
            summary[f"test_error_{label}"] = res["error"]
            summary[f"test_loss_{label}"] = res["loss"]
        summary.setdefault("test_error_best", summary["test_error_last"])
        summary["best_epoch"] = int(ckpt.read_meta((run_dir / "best").resolve())["epoch"]) if best_dir.exists() else len(history)
        summary["test_accuracy_last"] = 1 - summary["test_error_last"]
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        log(f"test error: last epoch {summary['test_error_last']:.4f} (accuracy {summary['test_accuracy_last']:.4f}), "
            f"best-val epoch {summary['best_epoch']} {summary['test_error_best']:.4f}; wall {summary['wall_time']:.0f}s")
    return summary


def _progress(cfg: TrainConfig, steps_per_epoch: int):
    """A tqdm bar per epoch on a terminal; nothing (one log line per epoch) elsewhere."""
    use_bar = cfg.progress and sys.stderr.isatty() and is_main_process()

    def make(epoch: int, total_epochs: int):
        if not use_bar:
            return nullcontext(None)
        from tqdm import tqdm

        return tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{total_epochs}", leave=False, dynamic_ncols=True)

    return make


def train_seeds(cfg: TrainConfig, seeds: list[int], **kwargs: Any) -> dict[str, Any]:
    """One run per seed in ``OUT/seed<N>``; returns mean ± std of the test errors."""
    if cfg.out is None:
        raise ConfigError("--out RUN_DIR is required")
    if is_main_process():
        claim(cfg.out, SEEDS)
    rows = []
    for seed in seeds:
        run_cfg = apply_overrides(cfg, {"seed": seed, "out": str(Path(cfg.out) / f"seed{seed}")}, "--seeds")
        rows.append(train(run_cfg, **kwargs))
    summary = {"seeds": seeds, "runs": [str(Path(cfg.out) / f"seed{s}") for s in seeds]}
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
