"""The machine's peak: the FLOP/s of a large matrix multiplication in fp32 and bf16.

A large square matmul is the best case for any arithmetic unit (all data reused from cache,
vendor-tuned kernels), so its rate is the practical ceiling a convolution net can approach. The
training and inference benchmarks divide their achieved FLOP/s (from the model's MACs) by it, so
a reader sees how close to the limit each path runs.

FLOPs are counted as 2 per multiply-add. A training step is taken as 3 forward passes' worth
(forward, and a backward that computes gradients for inputs and weights): the usual convention,
exact for convolutions and linear layers, which are nearly all of these nets' arithmetic.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..hardware import bf16_supported, precision_name, resolve_device
from ._common import BenchOptions, Row, format_table, say, sync, with_threads, write_rows

TRAIN_FLOPS_PER_MAC = 6.0   # forward (2) + backward for inputs (2) + for weights (2)
INFER_FLOPS_PER_MAC = 2.0


def matmul_peak(device: torch.device, dtype: torch.dtype, n: Optional[int] = None, seconds: float = 1.0) -> Row:
    """FLOP/s of ``n x n @ n x n`` in ``dtype`` on ``device``: the best of repeated timed calls."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    sync(device)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
        calls += 1
    return {"dtype": precision_name(None if dtype == torch.float32 else dtype), "n": n, "calls": calls,
            "best_s": best, "tflops": 2.0 * n ** 3 / best / 1e12,
            "native": dtype == torch.float32 or bf16_supported(device)}


def peaks(device: torch.device, quick: bool = False) -> dict[str, float]:
    """{'fp32': FLOP/s, 'bfloat16': FLOP/s} of this machine (quick: a small, short measurement)."""
    n = 256 if quick else None
    secs = 0.1 if quick else 1.0
    return {r["dtype"]: r["tflops"] * 1e12 for r in (matmul_peak(device, dt, n, secs) for dt in (torch.float32, torch.bfloat16))}


def add_share_of_peak(rows: list[Row], peak: dict[str, float], flops_per_image: dict[str, float],
                      rate_key: str, case_key: str) -> None:
    """Give every row with a rate its achieved FLOP/s and that as a fraction of the peak of the
    precision it ran in. ``flops_per_image`` maps a row's ``case_key`` value to FLOPs per image."""
    for r in rows:
        rate = r.get(rate_key)
        flops = flops_per_image.get(r.get(case_key))
        if rate is None or flops is None:
            continue
        prec = r.get("precision", "fp32")
        r["achieved_gflops"] = rate * flops / 1e9
        if prec in peak:
            r["peak_gflops"] = peak[prec] / 1e9
            r["share_of_peak"] = rate * flops / peak[prec]


COLUMNS = [("dtype", "dtype", "s"), ("native", "native", "s"), ("n", "n", "d"), ("calls", "calls", "d"),
           ("best_s", "best s", ".4f"), ("tflops", "TFLOP/s", ".3f")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure the fp32 and bf16 matmul peaks, print them, write ``peak.json``."""
    device = resolve_device(opts.device)
    say(opts, f"== peak: large matmul FLOP/s, {device.type}, {torch.get_num_threads()} threads")
    n = 256 if opts.quick else None
    rows = [matmul_peak(device, dt, n, 0.1 if opts.quick else 2.0) for dt in (torch.float32, torch.bfloat16)]
    say(opts, format_table(rows, COLUMNS))
    write_rows("peak", rows, opts, device)
    return rows
