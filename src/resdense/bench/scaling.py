"""How the cost of one training step grows with depth.

* ResNet vs its plain twin at depths 20, 56, 110 (CIFAR, 32x32): time and memory per step.
  The twins have the same convolutions, so the shortcut's cost is the difference.
* DenseNet-BC (k=12) at depths 40, 70, 100, 130, with and without the memory-efficient layer:
  the plain implementation's memory grows quadratically with depth (every layer stores its
  concatenated input), the memory-efficient one's linearly.

Every case runs in a fresh process (see :mod:`resdense.bench.memory` for how memory is
measured). Writes ``scaling.json`` and ``scaling.png`` (memory and time vs depth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..hardware import resolve_device
from ._common import BenchOptions, Row, format_table, say, with_threads, write_rows
from .memory import TrainStepCase, train_step_row


def _cases(quick: bool, device: str) -> list[tuple[str, int, TrainStepCase]]:
    """(series, depth, case) triples."""
    threads = torch.get_num_threads()
    if quick:
        res_depths, dense_depths, batch, steps = (8,), (10,), 4, 1
    else:
        res_depths, dense_depths, batch, steps = (20, 56, 110), (40, 70, 100, 130), 32, 2
    out = []
    for series, name in (("resnet", "cifar_resnet"), ("plain", "cifar_plain")):
        for d in res_depths:
            out.append((series, d, TrainStepCase(name, {"depth": d}, (3, 32, 32), batch, steps, device, threads,
                                                 label=f"{series}{d}")))
    for eff in (False, True):
        series = "densenet-bc mem-eff" if eff else "densenet-bc"
        for d in dense_depths:
            kwargs = {"depth": d, "growth_rate": 12, "bc": True, "memory_efficient": eff}
            out.append((series, d, TrainStepCase("cifar_densenet", kwargs, (3, 32, 32), batch, steps, device,
                                                 threads, label=f"{series} L={d}")))
    return out


def plot(rows: list[Row], path: Path) -> Path:
    """Memory and time per step against depth, one line per series; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for series in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((r["depth"], r["step_mb"], r["step_s"]) for r in rows if r["series"] == series)
        depths = [p[0] for p in pts]
        axes[0].plot(depths, [p[1] for p in pts], marker="o", label=series)
        axes[1].plot(depths, [p[2] for p in pts], marker="o", label=series)
    batch = rows[0]["batch"] if rows else 0
    axes[0].set(xlabel="depth (layers)", ylabel="memory of one step (MB)", title=f"Training-step memory, batch {batch}")
    axes[1].set(xlabel="depth (layers)", ylabel="seconds per step", title=f"Training-step time, batch {batch}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


COLUMNS = [("label", "case", "s"), ("depth", "depth", "d"), ("params", "params", ",d"), ("step_mb", "step MB", ".0f"),
           ("peak_mb", "peak MB", ".0f"), ("step_s", "step s", ".3f"), ("ms_per_image", "ms/img", ".2f")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure every case (one fresh process each), print the table, write JSON and the plot."""
    device = resolve_device(opts.device)
    say(opts, f"== scaling: training-step time and memory vs depth, {device.type}")
    rows: list[Row] = []
    for series, depth, case in _cases(opts.quick, device.type):
        say(opts, f"   {case.label} batch {case.batch} ...")
        row = {"series": series, "depth": depth, **train_step_row(case)}
        row["ms_per_image"] = 1e3 * row["step_s"] / row["batch"]
        rows.append(row)
    say(opts, format_table(rows, COLUMNS))
    figure: Optional[Path] = None
    if opts.out_dir is not None:
        figure = plot(rows, Path(opts.out_dir) / "scaling.png")
        say(opts, f"plot: {figure}")
    write_rows("scaling", rows, opts, device, {"figure": str(figure) if figure else None})
    return rows
