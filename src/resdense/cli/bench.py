"""``resdense bench``: speed and memory benchmarks (tables on stdout, JSON and figures on disk)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..outputs import OUTPUT, claim


def register(sub: Any) -> None:
    from ..bench import BENCHMARKS

    p = sub.add_parser("bench", help="speed and memory benchmarks (nothing is asserted: numbers to read)")
    p.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                   help="benchmark to run (default: all but time-to-accuracy, which runs by name)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds, numbers meaningless")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), metavar="DIR",
                   help="where the JSON rows and figures go (default: runs/bench)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch/onnxruntime threads (default: torch's, one per core); fewer helps on a busy CPU")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants where a benchmark has them")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the resdense columns' arithmetic (default auto: bf16 where the hardware runs it natively)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from ..bench import ALL, BenchOptions, run_benchmarks

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be a positive integer; got {args.threads}")
    names = list(ALL) if args.which == "all" else [args.which]
    claim(args.out, OUTPUT)  # JSON rows and figures go only into a folder resdense made
    opts = BenchOptions(quick=args.quick, out_dir=args.out, device=args.device, compile=args.compile,
                        threads=args.threads, precision=args.precision)
    start = time.perf_counter()
    run_benchmarks(names, opts)
    print(f"bench: {', '.join(names)} done in {time.perf_counter() - start:.0f} s; "
          f"results in {args.out}/ (timings on a shared machine are noisy)")
    return 0
