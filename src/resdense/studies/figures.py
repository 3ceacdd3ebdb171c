"""Figures of the studies, drawn from their group tables and result rows; which nets a figure
shows and how it names them come from the study's arms."""

from __future__ import annotations

import math
from operator import itemgetter
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter

from ..plots import PathLike, _band, _figure, _save, _style, palette, shade
from .report import count_text
from .spec import Arm

# One per arm of the efficiency figure, in the arms' order.
_ARM_STYLES = (dict(color="tab:green", marker="o"), dict(color="tab:blue", marker="s"),
               dict(color="tab:purple", marker="^"), dict(color="tab:orange", marker="D"))


def _pct(t: dict[str, Any], key: str = "test_error") -> tuple[float, float]:
    return 100 * t[key], 100 * t.get(key + "_std", 0.0)


def plot_efficiency(table: list[dict[str, Any]], path: PathLike, arms: Sequence[Arm], input_size: str = "") -> Path:
    """Test error against parameters, MACs per image (of ``input_size``, e.g. "1×28×28") and wall
    time per run, one line per arm (over its depths), named by the arm's group."""
    fig, axes = _figure(3, width=4.6, height=4.0)
    macs = "multiply-adds per image" + (f" ({input_size})" if input_size else "")
    for ax, key, label in zip(axes, ("params", "macs", "wall_time"),
                              ("parameters", macs, "wall time per run (s), this machine")):
        for i, arm in enumerate(arms):
            pts = sorted((t for t in _of_arm(table, arm) if t.get(key) and t.get("test_error") is not None),
                         key=itemgetter(key))
            if not pts:
                continue
            xs = [t[key] for t in pts]
            ys, es = zip(*(_pct(t) for t in pts))
            ax.errorbar(xs, ys, yerr=es, label=arm.group, capsize=3, linewidth=1.5, gid=arm.group,
                        **_ARM_STYLES[i % len(_ARM_STYLES)])
            for x, y, t in zip(xs, ys, pts):
                ax.annotate(str(t["depth"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor tick labels of a short log axis overlap
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.set_ylim(bottom=0)  # errors from 0: a difference of two points looks like one
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Error against size, cost and time (mean ± std over seeds)")
    return _save(fig, path)


def plot_bars(table: list[dict[str, Any]], path: PathLike, metrics: Sequence[tuple[str, str]], title: str,
              label_key: str = "group", colours: Optional[Mapping[str, str]] = None) -> Path:
    """One bar per group, one panel per metric stacked vertically (mean, the seeds' standard
    deviation as the error bar); each group's parameter count under its name. With ``colours``
    (group -> colour, the study's palette) each group has its own colour and nets without
    shortcuts are hatched; without, nets with shortcuts are blue and the others grey."""
    fig = Figure(figsize=(min(12.0, 1.3 * len(table) + 2.0), 3.4 * len(metrics)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    names = [f"{t[label_key]}\n{_params_text(t.get('params'))}" for t in table]
    xs = np.arange(len(table))
    for ax, (key, label) in zip(axes, metrics):
        means = [100 * t[key] if t.get(key) is not None else math.nan for t in table]
        stds = [100 * t.get(key + "_std", 0.0) for t in table]
        bars = ax.bar(xs, means, yerr=stds, capsize=3, color=[_bar_color(t, colours) for t in table])
        for bar, t in zip(bars, table):
            bar.set_gid(t["group"])
            if colours and _plain(t):
                bar.set_hatch("//")
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_ylim(0, 1.12 * max([m + e for m, e in zip(means, stds) if not math.isnan(m)] or [1.0]))  # room for labels
        ax.set_xticks(xs, names, fontsize=8)
        ax.set_ylabel(f"{label} (%)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _params_text(n: Any) -> str:
    return f"{count_text(n)} params" if n else ""


def _plain(t: dict[str, Any]) -> bool:
    return str(t.get("shortcut", t.get("net", ""))).startswith(("none", "plain"))


def _bar_color(t: dict[str, Any], colours: Optional[Mapping[str, str]] = None) -> str:
    if colours:
        return colours[t["group"]]
    # Nets without shortcuts grey, as the papers draw plain nets dashed.
    return "tab:gray" if _plain(t) else "tab:blue"


def plot_grad_norm_curves(rows: list[dict[str, Any]], order: Sequence[str], path: PathLike, title: str,
                          colours: Optional[Mapping[str, str]] = None) -> Path:
    """Left: the global gradient norm over training (each group's seeds: geometric mean and range);
    right: the running training error; both against training images seen. From each run's curve
    (every ``curve_every`` steps). Groups are coloured by ``colours`` (default: in ``order``)."""
    fig, (ax_g, ax_e) = _figure(2, width=6.0, height=4.4)
    colours = colours or palette(order)
    for group in order:
        runs = [r for r in rows if r["group"] == group and r.get("curve")]
        if not runs:
            continue
        style = dict(color=colours[group], linestyle="--" if group.startswith("plain") else "-", gid=group)
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
    ax_e.set_ylim(bottom=0)
    for ax in (ax_g, ax_e):
        ax.set_xlabel("training images seen (steps × batch)")
        ax.grid(True, alpha=0.3)
    ax_e.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _of_arm(rows: list[dict[str, Any]], arm: Arm) -> list[dict[str, Any]]:
    """The rows (or table entries) whose labels are the arm's (at any depth, if the arm has none)."""
    return [r for r in rows if all(r.get(k) == v for k, v in arm.labels.items())]


def plot_degradation_curves(rows: list[dict[str, Any]], path: PathLike, arms: Sequence[Arm],
                            title: str = "Plain vs residual networks: training and validation error") -> Path:
    """He et al. 2015, Fig. 6: error vs iterations, one panel per arm (titled by its ``about``),
    in the arm's colour (as in every figure of the study), the deepest net darkest and shallower
    ones lighter; training error thin and dashed, validation error bold. Rows are the study's
    results (``curve`` points of running training error, ``epochs`` with validation error)."""
    depths = sorted({r["depth"] for r in rows})
    colours = palette(arm.group for arm in arms)
    fig, axes = _figure(ncols=len(arms), width=6.0, height=4.4)
    top = 0.0
    handles = []
    for ax, arm in zip(axes, arms):
        for i, depth in enumerate(depths):
            group = [r for r in _of_arm(rows, arm) if r["depth"] == depth]
            colour = shade(colours[arm.group], (i + 1) / len(depths))
            handles.append(Line2D([], [], color=colour, linewidth=2.5, label=f"{arm.group}-{depth}"))
            if group:
                top = max(top, _draw_degradation_group(ax, group, colour, arm.group))
        ax.set_title(arm.about)
        ax.set_xlabel("iterations (optimiser steps)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("error (%)")
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.set_ylim(0, min(100.0, top * 1.05) if top else 100.0)
    seeds = max(len({r["seed"] for r in _of_arm(rows, arm) if r["depth"] == d}) for arm in arms
                for d in depths) if rows else 1
    handles += [Line2D([], [], color="grey", linestyle="--", linewidth=0.8, label="training error (running)"),
                Line2D([], [], color="grey", linewidth=2.5, label="validation error")]
    if seeds > 1:
        handles.append(Patch(color="grey", alpha=0.25, label=f"range over {seeds} seeds (line: mean)"))
    # Below the panels: inside, it would cover the curves' ends, where the comparison is read.
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=9, frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


def _draw_degradation_group(ax: Any, group: list[dict[str, Any]], colour: Any, gid: str) -> float:
    """One net's seeds on one panel: running training error and validation error; returns the
    highest error drawn (the y range must not clip any seed)."""
    top = 0.0
    # Seeds share the step grid (same recipe); a run cut short by a resume keeps its points.
    n_curve = min(len(r["curve"]) for r in group)
    if n_curve:
        steps = [p["step"] for p in group[0]["curve"][:n_curve]]
        errs = [[100 * p["train_error"] for p in r["curve"][:n_curve]] for r in group]
        _band(ax, steps, errs, dict(color=colour, linestyle="--", gid=gid), "", linewidth=0.8, alpha=0.8)
        top = max(max(e) for e in errs)
    vals = [[(e["step"], 100 * e["val_error"]) for e in r["epochs"] if e.get("val_error") == e.get("val_error")]
            for r in group]
    n_val = min(len(v) for v in vals)
    if n_val:
        _band(ax, [s for s, _ in vals[0][:n_val]], [[v for _, v in run[:n_val]] for run in vals],
              dict(color=colour, linestyle="-", gid=gid), "", linewidth=2.5, marker="o", markersize=4)
        top = max(top, max(v for run in vals for _, v in run))
    return top


def plot_error_vs_depth(table: list[dict[str, Any]], path: PathLike, arms: Sequence[Arm],
                        title: str = "Final error vs depth") -> Path:
    """Final training and test error against depth, one line per arm in its colour (as in every
    figure of the study; nets without shortcuts dashed), with error bars of one standard deviation
    over seeds; errors from 0."""
    fig, axes = _figure(ncols=2, width=5.5, height=4.2)
    depths = sorted({t["depth"] for t in table})
    colours = palette(arm.group for arm in arms)
    for ax, (key, label) in zip(axes, (("train_error", "training error"), ("test_error", "test error"))):
        for i, arm in enumerate(arms):
            pts = sorted((t["depth"], 100 * t[key], 100 * t[key + "_std"]) for t in _of_arm(table, arm))
            if pts:
                d, m, s = zip(*pts)
                ax.errorbar(d, m, yerr=s, label=arm.about, capsize=3, marker="o", gid=arm.group,
                            **_style(i, arm.shortcuts, colours[arm.group]))
        ax.set_xticks(depths)  # ticks at the depths trained, not at depths that do not exist
        ax.set_xlabel("depth (weighted layers)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_title(label.capitalize())
        ax.set_ylim(bottom=0)  # from 0: two lines 10 points apart at 20% error must not look 3x apart
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)
