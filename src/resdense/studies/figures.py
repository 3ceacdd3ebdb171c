"""Figures of the efficiency, shortcuts and remedies studies, drawn from their group tables and
result rows (the degradation study's live in :mod:`resdense.plots` with the analyses')."""

from __future__ import annotations

import math
from operator import itemgetter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ..plots import PathLike, _band, _figure, _save
from .report import count_text

_FAMILY_STYLE = {"densenet-bc": dict(color="tab:green", marker="o"), "resnet": dict(color="tab:blue", marker="s"),
                 "resnet-bottleneck": dict(color="tab:purple", marker="^")}


def _pct(t: dict[str, Any], key: str = "test_error") -> tuple[float, float]:
    return 100 * t[key], 100 * t.get(key + "_std", 0.0)


def plot_efficiency(table: list[dict[str, Any]], path: PathLike) -> Path:
    """Test error against parameters, MACs per image and wall time per run, one line per family."""
    fig, axes = _figure(3, width=4.6, height=4.0)
    for ax, key, label in zip(axes, ("params", "macs", "wall_time"),
                              ("parameters", "multiply-adds per image", "wall time per run (s), this machine")):
        for family, style in _FAMILY_STYLE.items():
            pts = sorted((t for t in table if t["family"] == family and t.get(key) and t.get("test_error") is not None),
                         key=itemgetter(key))
            if not pts:
                continue
            xs = [t[key] for t in pts]
            ys, es = zip(*(_pct(t) for t in pts))
            ax.errorbar(xs, ys, yerr=es, label=family, capsize=3, linewidth=1.5, **style)
            for x, y, t in zip(xs, ys, pts):
                ax.annotate(str(t["depth"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels of a short log axis overlap
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Error against size, cost and time (mean ± std over seeds)")
    return _save(fig, path)


def plot_bars(table: list[dict[str, Any]], path: PathLike, metrics: Sequence[tuple[str, str]], title: str,
              label_key: str = "group") -> Path:
    """One bar per group, one panel per metric stacked vertically (mean, the seeds' standard
    deviation as the error bar); each group's parameter count under its name."""
    fig = Figure(figsize=(min(12.0, 1.3 * len(table) + 2.0), 3.4 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    names = [f"{t[label_key]}\n{_params_text(t.get('params'))}" for t in table]
    xs = np.arange(len(table))
    for ax, (key, label) in zip(axes, metrics):
        means = [100 * t[key] if t.get(key) is not None else math.nan for t in table]
        stds = [100 * t.get(key + "_std", 0.0) for t in table]
        bars = ax.bar(xs, means, yerr=stds, capsize=3, color=[_bar_color(t) for t in table])
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_ylim(0, 1.12 * max([m + e for m, e in zip(means, stds) if not math.isnan(m)] or [1.0]))  # room for labels
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel(f"{label} (%)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _params_text(n: Any) -> str:
    return f"{count_text(n)} params" if n else ""


def _bar_color(t: dict[str, Any]) -> str:
    # Nets without shortcuts grey, as the papers draw plain nets dashed.
    return "tab:gray" if str(t.get("shortcut", t.get("net", ""))).startswith(("none", "plain")) else "tab:blue"


def plot_grad_norm_curves(rows: list[dict[str, Any]], order: Sequence[str], path: PathLike, title: str) -> Path:
    """Left: the global gradient norm over training (each group's seeds: geometric mean and range);
    right: the running training error; both against training images seen. From each run's curve
    (every ``curve_every`` steps)."""
    fig, (ax_g, ax_e) = _figure(2, width=6.0, height=4.4)
    for i, group in enumerate(order):
        runs = [r for r in rows if r["group"] == group and r.get("curve")]
        if not runs:
            continue
        style = dict(color=f"C{i % 10}", linestyle="--" if group.startswith("plain") else "-")
        # Against images seen, not steps: a smaller batch takes more steps per epoch.
        batch = runs[0]["config"].get("batch_size") or 1
        steps = [p["step"] * batch for p in runs[0]["curve"]]
        n = min(len(r["curve"]) for r in runs)
        norms = [[p.get("grad_norm") or math.nan for p in r["curve"][:n]] for r in runs]
        if not all(math.isnan(v) for s in norms for v in s):
            _band(ax_g, steps[:n], norms, style, group, geometric=True)
        errs = [[100 * p["train_error"] for p in r["curve"][:n]] for r in runs]
        _band(ax_e, steps[:n], errs, style, group)
    ax_g.set_yscale("log")
    ax_g.set_ylabel("gradient norm (global L2, before clipping)")
    ax_e.set_ylabel("running training error (%)")
    for ax in (ax_g, ax_e):
        ax.set_xlabel("training images seen (steps × batch)")
        ax.grid(True, alpha=0.3)
    ax_e.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
