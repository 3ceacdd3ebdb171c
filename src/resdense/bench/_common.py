"""What every benchmark shares: options, timing, a fresh process per measured case, tables and
JSON rows. Benchmarks report; nothing here (or in any test) asserts a timing."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..hardware import bf16_supported, isa_cap

Row = dict[str, Any]


@dataclass(frozen=True)
class BenchOptions:
    """Options every benchmark takes.

    ``quick`` shrinks models, batches and repetitions to a CI smoke test (seconds, numbers
    meaningless). ``out_dir`` receives ``<name>.json`` (and any figure); ``None`` writes nothing.
    ``device`` is ``"auto"`` (CUDA if present), ``"cpu"`` or ``"cuda"``. ``compile`` adds
    ``torch.compile`` variants where a benchmark has them. ``threads`` sets torch's (and
    onnxruntime's, and each spawned case's) intra-op threads for the run; on a CPU shared with
    other jobs, fewer threads than cores avoids OpenMP threads waiting on descheduled peers.
    """

    quick: bool = False
    out_dir: Optional[Path] = None
    device: str = "auto"
    compile: bool = False
    threads: Optional[int] = None
    verbose: bool = True
    precision: str = "auto"


def with_threads(run: Callable[[BenchOptions], list[Row]]) -> Callable[[BenchOptions], list[Row]]:
    """Decorator: run a benchmark with ``opts.threads`` torch threads, restoring the count after."""

    @functools.wraps(run)
    def wrapped(opts: BenchOptions) -> list[Row]:
        before = torch.get_num_threads()
        if opts.threads:
            torch.set_num_threads(opts.threads)
        try:
            return run(opts)
        finally:
            torch.set_num_threads(before)

    return wrapped


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def perturb_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine weights (mild, so the
    output stays O(1)): a freshly initialised BN is the identity, which would make BN folding
    and export differences look better than they are on a trained model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features

                def jitter(width: float) -> torch.Tensor:
                    return ((torch.rand(n, generator=g) * 2 - 1) * width).to(m.running_mean.device)

                m.running_mean.copy_(jitter(0.1))
                m.running_var.copy_(1 + jitter(0.2))
                if m.weight is not None:
                    m.weight.copy_(1 + jitter(0.2))
                    m.bias.copy_(jitter(0.1))
    return model


def env_info(device: torch.device) -> dict[str, Any]:
    """Enough about the machine to read a number later (and to see that the CPU was shared)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # What the kernels may use: a capped process (isa_cap) stands in for an older CPU.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa_cap": isa_cap(),
        "bf16_native": bf16_supported(device),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_case_in_subprocess(module: str, case: dict[str, Any], timeout: float = 900) -> Row:
    """Run ``module.main(["--case", JSON])`` in a fresh interpreter and return the JSON object
    it prints last. A fresh process per case is what makes peak-RSS numbers comparable: each one
    starts with its own high-water mark and an empty allocator cache."""
    src = str(Path(__file__).resolve().parents[2])  # .../src, so this works without installing
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # `-c` rather than `-m`: the package imports the module first, and runpy would run it twice.
    code = f"import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "--case", json.dumps(case)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark case {case} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def format_table(rows: Sequence[Row], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width table; ``columns`` are ``(key, header, format spec)``. Missing or
    ``None`` values print as '-'."""
    def cell(row: Row, key: str, spec: str) -> str:
        v = row.get(key)
        if v is None:
            return "-"
        try:
            return format(v, spec)
        except (TypeError, ValueError):
            return str(v)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths)))]
    for c in cells:
        lines.append("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def write_rows(name: str, rows: Sequence[Row], opts: BenchOptions, device: torch.device,
               extra: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """Write ``{"benchmark", "quick", "env", "rows", ...extra}`` to ``out_dir/<name>.json``
    atomically; returns the path (None when ``out_dir`` is None)."""
    if opts.out_dir is None:
        return None
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "quick": opts.quick, "env": env_info(device), "rows": list(rows), **(extra or {})}
    path = out_dir / f"{name}.json"
    tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def say(opts: BenchOptions, text: str) -> None:
    if opts.verbose:
        print(text, flush=True)
