"""Training throughput: images/s of full training steps, the usual way vs the resdense way.

A step is everything a training loop does per batch: take the next augmented batch, forward,
cross-entropy, backward, SGD update (momentum 0.9, weight decay 1e-4, lr 0.1). Every column runs
the same step code (:func:`resdense.train.engine.train_one_epoch` over a slice of batches); they
differ only in what surrounds it:

* ``usual``: fp32, NCHW, eager; batches from the per-sample :class:`~.pipeline.UsualDataset`
  through a ``DataLoader`` with ``num_workers=0``, moved to the device; ``torch.optim.SGD`` over
  ``model.parameters()``;
* ``resdense``: what ``resdense train`` does: :class:`resdense.data.TensorLoader` (batched
  augmentation on the device), model and batches channels-last, the precision
  ``resolve_precision("auto", device)`` gives (fp32 on CPUs without native bf16), the optimizer
  of :func:`resdense.train.context.build_optimizer`;
* ``resdense+compile``: the same with ``torch.compile(model)``. The first step (which compiles
  forward and backward) is reported as ``compile_s`` and is not part of the rate.

Rates are ``batch * steps`` over the median of several timed windows of consecutive steps, after
warm-up steps. The images are random uint8 of the model's input shape: a training step's cost
does not depend on pixel values. Also "where the time goes": a ``torch.profiler`` profile of one
resdense step of the profiled case (resnet56), top ops by self CPU time, in ``training.json``.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from ..data import TensorLoader, channel_stats
from ..hardware import precision_name, resolve_device, resolve_precision
from ..analysis.complexity import model_info
from ..models import create_model
from ..train.config import TrainConfig
from ..train.context import build_optimizer
from ..train.engine import TrainState, train_one_epoch
from ..train.schedule import Schedule
from ._common import BenchOptions, Row, format_table, median, say, sync, with_threads, write_rows
from .peak import TRAIN_FLOPS_PER_MAC, add_share_of_peak, peaks
from .pipeline import PAPER_AUGMENT, endless, random_images, usual_loader

COLUMNS_RUN = ("usual", "resdense", "resdense+compile")
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 1e-4
PROFILE_TOP = 12


@dataclass(frozen=True)
class TrainCase:
    """One model measured in every column.

    ``warmup`` untimed steps (at least one is run), then ``windows`` timed windows of ``per_window`` steps each.
    ``compile_by_default``: whether the full run includes the compile column without
    ``--compile`` (compiling a deep net's backward on a small CPU takes minutes).
    ``profile``: profile one resdense step of this case."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 32, 32)
    batch: int = 128
    warmup: int = 2
    windows: int = 3
    per_window: int = 1
    compile_by_default: bool = False
    profile: bool = False

    @property
    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.model}({args})" if args else self.model

    @property
    def steps(self) -> int:
        return self.warmup + self.windows * self.per_window


def _cases(quick: bool, device_type: str = "cpu") -> list[TrainCase]:
    if quick:
        return [TrainCase("cifar_resnet", {"depth": 8}, (3, 32, 32), batch=16, warmup=1, windows=1, per_window=1,
                          profile=True)]
    if device_type == "cuda":
        # A step takes milliseconds on a GPU: windows of 20 steps (a 1-step window would time one
        # launch queue), and 10 warm-up steps for the allocator, cuDNN and the compiled graphs.
        return [TrainCase("resnet56", batch=128, warmup=10, windows=5, per_window=20, compile_by_default=True,
                          profile=True),
                TrainCase("densenet_bc100_k12", batch=64, warmup=10, windows=5, per_window=20),
                TrainCase("resnet50", input_size=(3, 224, 224), batch=32, warmup=10, windows=5, per_window=20)]
    # Step counts chosen so the whole benchmark fits in about five minutes on two CPU cores:
    # resnet50 at 224 takes seconds per step, so it gets the fewest.
    return [TrainCase("resnet56", batch=128, warmup=2, windows=3, per_window=2, compile_by_default=True,
                      profile=True),
            TrainCase("densenet_bc100_k12", batch=64, warmup=2, windows=3, per_window=1),
            TrainCase("resnet50", input_size=(3, 224, 224), batch=32, warmup=2, windows=3, per_window=1)]


def _on_device(batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The usual loop's ``x.to(device), y.to(device)`` (a no-op on the CPU)."""
    for x, y in batches:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class _Column:
    """A model ready to train and the endless batches it trains on."""

    model: nn.Module  # the module the optimizer updates
    train_model: nn.Module  # the module called (compiled, for the compile column)
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    amp_dtype: Optional[torch.dtype]
    memory_format: str
    data: str


def _build(case: TrainCase, column: str, device: torch.device, precision: str = "auto") -> _Column:
    torch.manual_seed(0)  # every column starts from the same weights
    model = create_model(case.model, **case.kwargs).to(device).train()
    num_classes = int(getattr(model, "num_classes", 10))
    images, labels = random_images(case.batch * case.steps, case.input_size, num_classes, seed=1)
    mean, std = channel_stats(images)
    if column == "usual":
        loader = usual_loader(images, labels, mean, std, batch_size=case.batch, num_workers=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        return _Column(model, model, optimizer, _on_device(endless(loader), device), None, "nchw",
                       "per-sample Dataset + DataLoader(num_workers=0)")
    model = model.to(memory_format=torch.channels_last)
    loader = TensorLoader(images, labels, case.batch, shuffle=True, augment=PAPER_AUGMENT, mean=mean, std=std,
                          device=device, channels_last=True, drop_last=True)
    cfg = TrainConfig(model=case.model, batch_size=case.batch, lr=LR, momentum=MOMENTUM,
                      weight_decay=WEIGHT_DECAY)
    train_model = torch.compile(model) if column == "resdense+compile" else model
    return _Column(model, train_model, build_optimizer(model, cfg), endless(loader),
                   resolve_precision(precision, device), "channels_last", "TensorLoader")


def _run_steps(col: _Column, state: TrainState, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` full training steps (the data included)."""
    schedule = Schedule("step", LR, total_steps=10**9)  # constant lr: no milestones
    start = time.perf_counter()
    train_one_epoch(col.train_model, itertools.islice(col.batches, steps), col.optimizer, schedule, state,
                    device=device, amp_dtype=col.amp_dtype)
    sync(device)
    return time.perf_counter() - start


def profile_step(col: _Column, device: torch.device, top: int = PROFILE_TOP) -> list[Row]:
    """Profile one training step; the ``top`` ops by self CPU time (ms, share of all self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _run_steps(col, TrainState(), 1, device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    events.sort(key=_self_cpu, reverse=True)
    return [{"op": e.key, "calls": int(e.count), "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_cpu_pct": 100.0 * e.self_cpu_time_total / total_us, "cpu_total_ms": e.cpu_time_total / 1e3}
            for e in events[:top]]


def _self_cpu(event: Any) -> float:
    return float(event.self_cpu_time_total)


def measure(case: TrainCase, column: str, device: torch.device,
            want_profile: bool = False, precision: str = "auto") -> tuple[Row, Optional[list[Row]]]:
    """One row: ``case`` trained in ``column``; and the profile of one step if asked for."""
    col = _build(case, column, device, precision)
    state = TrainState()
    first = _run_steps(col, state, 1, device)  # compiles, for the compile column
    warmup_s = first + (_run_steps(col, state, case.warmup - 1, device) if case.warmup > 1 else 0.0)
    times = [_run_steps(col, state, case.per_window, device) / case.per_window for _ in range(case.windows)]
    step_s = median(times)
    row: Row = {"case": case.label, "model": case.model, "input": "x".join(map(str, case.input_size)),
                "batch": case.batch, "column": column, "precision": precision_name(col.amp_dtype),
                "memory_format": col.memory_format, "data": col.data, "warmup_steps": case.warmup,
                "timed_steps": case.windows * case.per_window, "step_s": step_s,
                "images_per_s": case.batch / step_s, "step_times_s": times, "first_step_s": first,
                "warmup_s": warmup_s}
    if column == "resdense+compile":
        # Whatever the warm-up took beyond ordinary steps: the compilation, and any recompilation.
        row["compile_s"] = max(warmup_s - max(case.warmup, 1) * step_s, 0.0)
    prof = profile_step(col, device) if want_profile else None
    return row, prof


def _measure_case(case: TrainCase, opts: BenchOptions, device: torch.device) -> tuple[list[Row], Optional[list[Row]]]:
    rows: list[Row] = []
    prof = None
    with_compile = opts.compile or (case.compile_by_default and not opts.quick)
    say(opts, f"   {case.label} {'x'.join(map(str, case.input_size))} batch {case.batch}: {case.warmup} warm-up + "
              f"{case.windows}x{case.per_window} timed steps per column")
    for column in COLUMNS_RUN:
        base = {"case": case.label, "model": case.model, "input": "x".join(map(str, case.input_size)),
                "batch": case.batch, "column": column}
        if column == "resdense+compile" and not with_compile:
            rows.append({**base, "skipped": "pass --compile"})
            continue
        try:
            row, p = measure(case, column, device, want_profile=case.profile and column == "resdense",
                             precision=opts.precision)
        except Exception as e:  # only the compile column may fail (no C++ compiler ...)
            if column != "resdense+compile":
                raise
            row, p = {**base, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}, None
        prof = prof or p
        rows.append(row)
        gc.collect()
        say(opts, f"      {column}: " + (row.get("error") or f"{row['images_per_s']:.1f} img/s"
                                        + (f" (compile {row['compile_s']:.0f} s)" if "compile_s" in row else "")))
    usual = rows[0]
    for r in rows:
        if "images_per_s" in r:
            r["speedup_vs_usual"] = r["images_per_s"] / usual["images_per_s"]
    return rows, prof


COLUMNS = [("case", "model", "s"), ("input", "input", "s"), ("batch", "batch", "d"), ("column", "column", "s"),
           ("precision", "prec", "s"), ("timed_steps", "steps", "d"), ("images_per_s", "img/s", ".1f"),
           ("speedup_vs_usual", "x usual", ".2f"), ("achieved_gflops", "GFLOP/s", ".1f"),
           ("share_of_peak", "of peak", ".1%"), ("compile_s", "compile s", ".0f"), ("skipped", "note", "s"),
           ("error", "error", "s")]
PROFILE_COLUMNS = [("op", "op", "s"), ("calls", "calls", "d"), ("self_cpu_ms", "self CPU ms", ".1f"),
                   ("self_cpu_pct", "self %", ".1f"), ("cpu_total_ms", "total CPU ms", ".1f")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure every case in every column, print the tables, write ``training.json``."""
    device = resolve_device(opts.device)
    say(opts, f"== training: images/s of full training steps, usual vs resdense, {device.type}, "
              f"{torch.get_num_threads()} threads")
    rows: list[Row] = []
    profile: Optional[dict[str, Any]] = None
    flops: dict[str, float] = {}
    for case in _cases(opts.quick, device.type):
        case_rows, prof = _measure_case(case, opts, device)
        rows += case_rows
        flops[case.label] = TRAIN_FLOPS_PER_MAC * model_info(case.model, input_size=case.input_size, **case.kwargs).macs
        if prof is not None and profile is None:
            profile = {"case": case.label, "batch": case.batch, "column": "resdense", "top": prof}
    peak = peaks(device, opts.quick)
    add_share_of_peak(rows, peak, flops, "images_per_s", "case")
    say(opts, format_table(rows, COLUMNS))
    say(opts, "rates: batch / median step time over the timed windows, after the warm-up steps; the data pipeline "
              "is part of every step; compile s = warm-up time minus as many timed steps, not in img/s")
    if profile is not None:
        say(opts, f"where the time goes: one resdense training step of {profile['case']} (batch {profile['batch']}), "
                  f"top {len(profile['top'])} ops by self CPU time")
        say(opts, format_table(profile["top"], PROFILE_COLUMNS))
    say(opts, f"share of peak: achieved FLOP/s (6 x MACs per image x img/s) over this machine's matmul peak in the "
              f"row's precision (fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s)")
    write_rows("training", rows, opts, device, {"profile": profile, "peak_flops": peak})
    return rows
