"""Speed and memory benchmarks. Each benchmark is a function ``run(opts) -> list[row dict]``
that prints a table and writes ``<name>.json`` (and any figure) to ``opts.out_dir``.

``BENCHMARKS`` maps a name to its run function; ``resdense bench NAME`` runs one, ``all`` runs
them in this order. To add one (training throughput, the data pipeline), write a module with a
``run(opts: BenchOptions) -> list[dict]`` and add it to ``BENCHMARKS``.
"""

from __future__ import annotations

from typing import Callable

from . import inference, memory, peak, pipeline, scaling, training, tta
from ._common import BenchOptions, Row

BenchFn = Callable[[BenchOptions], list[Row]]

BENCHMARKS: dict[str, BenchFn] = {
    "peak": peak.run,
    "memory": memory.run,
    "inference": inference.run,
    "scaling": scaling.run,
    "pipeline": pipeline.run,
    "training": training.run,
    "time-to-accuracy": tta.run,
}
# `resdense bench all`: every benchmark but time-to-accuracy, which trains to 93% twice (the usual
# way for 30 epochs: most of an hour on two CPU cores) and is run by name.
ALL = tuple(name for name in BENCHMARKS if name != "time-to-accuracy")


def run_benchmarks(names: list[str], opts: BenchOptions) -> dict[str, list[Row]]:
    """Run the named benchmarks in order; returns their rows by name."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return {name: BENCHMARKS[name](opts) for name in names}


__all__ = ["ALL", "BENCHMARKS", "BenchFn", "BenchOptions", "Row", "run_benchmarks"]
