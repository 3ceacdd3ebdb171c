"""Peak memory of one training step, DenseNet with and without the memory-efficient layer.

The goal (Pleiss et al. 2017, and the "speed and scale" issue): the memory-efficient DenseNet
should need at most 0.5x the memory of the plain implementation at most 1.35x the time.

How memory is measured:

* CUDA: ``torch.cuda.max_memory_allocated`` after a ``reset_peak_memory_stats``, minus what
  was allocated just before the step: exactly the tensors the step itself allocated.
* CPU: each case runs in a fresh interpreter and reports the kernel's exact RSS high-water
  mark (``VmHWM`` in ``/proc/self/status``) minus the RSS just before the step. The mark is
  reset to the current RSS right before the step (``echo 5 > /proc/self/clear_refs``), so it
  holds the step's peak alone. A kernel-kept mark never misses a short spike, which a sampling
  thread would (and the thread would compete for the GIL and the cores). ``ru_maxrss`` is not
  used: it cannot be reset and a spawned child inherits its parent's value across exec. A step
  at batch 2 runs first, so gradients, optimizer state and kernel caches already exist; where
  the mark cannot be reset the row says ``peak_valid: false`` if the step did not raise it.
  RSS also counts allocator slack, so CPU numbers are upper bounds of the tensor memory,
  comparable between cases of one run; the process's fresh allocator is why every case gets
  its own process.

Run directly: ``python -m resdense.bench.memory`` (all cases) or ``--case JSON`` (one case,
prints one JSON line; this is what the benchmark spawns).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..models import create_model
from ..hardware import resolve_device
from ._common import (BenchOptions, Row, format_table, median, run_case_in_subprocess, say,
                      with_threads, write_rows)

MEMORY_GOAL = 0.5  # memory-efficient / plain, at most
TIME_GOAL = 1.35  # memory-efficient / plain, at most
MB = 1024 * 1024


@dataclass
class TrainStepCase:
    """One measured training step: model, its builder arguments, input and batch."""

    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 32, 32)
    batch: int = 32
    steps: int = 3  # timed steps after the measured one
    device: str = "cpu"
    threads: Optional[int] = None
    label: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainStepCase":
        d = dict(d)
        d["input_size"] = tuple(d.get("input_size", (3, 32, 32)))
        return cls(**d)


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return _proc_status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    """The RSS high-water mark of this process (since exec or the last reset), in bytes."""
    return _proc_status_kib("VmHWM") * 1024


def _reset_peak_rss() -> bool:
    """Set the RSS high-water mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_train_step(case: TrainStepCase) -> Row:
    """Build the model and measure one SGD training step (forward, backward, update): extra
    memory the step needs, and the median time of ``case.steps`` further steps. Meant to run in
    a fresh process on CPU (see the module docstring)."""
    device = torch.device(case.device)
    if case.threads:
        torch.set_num_threads(case.threads)
    torch.manual_seed(0)
    model = create_model(case.model, **case.kwargs).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    num_classes = int(getattr(model, "num_classes", 10))

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, *case.input_size, device=device),
                torch.randint(0, num_classes, (n,), device=device))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(*batch(2))  # allocate grads and momentum, initialise kernels, at a small peak
    x, y = batch(case.batch)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline, maxrss_before = torch.cuda.memory_allocated(device), 0
    else:
        reset = _reset_peak_rss()
        baseline, maxrss_before = _current_rss(), _peak_rss()

    start = time.perf_counter()
    step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        peak, method, valid = torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated", True
    else:
        peak = _peak_rss()
        method = "VmHWM (reset before the step) - VmRSS before" if reset else "VmHWM - VmRSS before"
        valid = reset or peak > maxrss_before

    times = []
    for _ in range(case.steps):
        start = time.perf_counter()
        step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        **asdict(case), "input_size": list(case.input_size),
        "params": sum(p.numel() for p in model.parameters()),
        "baseline_mb": baseline / MB, "peak_mb": peak / MB, "step_mb": (peak - baseline) / MB,
        "peak_valid": valid, "method": method,
        "first_step_s": first, "step_s": median(times) if times else first, "step_times_s": times,
    }


def train_step_row(case: TrainStepCase) -> Row:
    """:func:`measure_train_step` in a fresh interpreter (needed for CPU peak memory)."""
    return run_case_in_subprocess("resdense.bench.memory", asdict(case))


def _cases(quick: bool, device: str) -> list[tuple[str, TrainStepCase]]:
    """(pair label, case) for both settings of ``memory_efficient``."""
    if quick:
        specs = [("cifar_densenet L=16 k=12 BC", "cifar_densenet", dict(depth=16, growth_rate=12, bc=True),
                  (3, 32, 32), 4, 1)]
    else:
        # Few timed steps: the whole `resdense bench` has to fit in ten minutes on two CPU cores.
        specs = [("densenet_bc100_k12", "densenet_bc100_k12", {}, (3, 32, 32), 64, 3),
                 ("densenet121", "densenet121", {}, (3, 224, 224), 16, 2)]
    out = []
    for label, name, kwargs, size, bs, steps in specs:
        for eff in (False, True):
            out.append((label, TrainStepCase(name, {**kwargs, "memory_efficient": eff}, size, bs, steps, device,
                                             torch.get_num_threads(), label=f"{label}{' mem-eff' if eff else ''}")))
    return out


def add_ratios(rows: list[Row], pairs: list[str]) -> None:
    """Give each memory-efficient row its memory and time ratio to the plain row of its pair."""
    for label in pairs:
        plain = next(r for r in rows if r["pair"] == label and not r["kwargs"].get("memory_efficient"))
        eff = next(r for r in rows if r["pair"] == label and r["kwargs"].get("memory_efficient"))
        eff["mem_ratio"] = eff["step_mb"] / plain["step_mb"] if plain["step_mb"] > 0 else None
        eff["time_ratio"] = eff["step_s"] / plain["step_s"] if plain["step_s"] > 0 else None
        eff["goal_met"] = (eff["mem_ratio"] is not None and eff["mem_ratio"] <= MEMORY_GOAL
                           and eff["time_ratio"] is not None and eff["time_ratio"] <= TIME_GOAL)


COLUMNS = [("label", "case", "s"), ("batch", "batch", "d"), ("step_mb", "step MB", ".0f"),
           ("peak_mb", "peak MB", ".0f"), ("step_s", "step s", ".3f"), ("mem_ratio", "mem x", ".2f"),
           ("time_ratio", "time x", ".2f"), ("goal_met", "goal", "")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure every case (one fresh process each), print the table, write ``memory.json``."""
    device = resolve_device(opts.device)
    cases = _cases(opts.quick, device.type)
    say(opts, f"== memory: one training step (SGD), DenseNet plain vs memory-efficient, {device.type}")
    rows = []
    for label, case in cases:
        say(opts, f"   {case.label} batch {case.batch} ...")
        rows.append({"pair": label, **train_step_row(case)})
    add_ratios(rows, list(dict.fromkeys(label for label, _ in cases)))
    say(opts, format_table(rows, COLUMNS))
    say(opts, f"goal: memory-efficient <= {MEMORY_GOAL}x the memory at <= {TIME_GOAL}x the time "
              "(step MB = peak minus memory held before the step)")
    write_rows("memory", rows, opts, device, {"goal": {"mem_ratio": MEMORY_GOAL, "time_ratio": TIME_GOAL}})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resdense.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="JSON of one TrainStepCase: measure it and print one JSON line")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure_train_step(TrainStepCase.from_dict(json.loads(args.case)))), flush=True)
        return 0
    run(BenchOptions(quick=args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
