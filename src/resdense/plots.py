"""Figures of the analyses, drawn from their reports (or reports read back from JSON).

Each function takes reports, writes one PNG and returns its path. Nets without shortcuts
(plain twins, VGG) are drawn dashed, nets with shortcuts (ResNets, DenseNets) solid, as in
the papers' figures.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, not
through pyplot: no display is needed, and importing this module does not switch the
backend of a caller's session (a notebook keeps its own).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from .analysis.gradients import GradientReport
    from .analysis.lesion import LesionReport
    from .analysis.responses import ResponseReport
    from .analysis.reuse import ReuseReport

PathLike = Union[str, Path]
_STYLE_NOTE = "solid: with shortcuts, dashed: without"


def _figure(ncols: int = 1, width: float = 6.4, height: float = 4.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _style(index: int, shortcuts: bool, colour: Optional[str] = None) -> dict:
    return dict(color=colour or f"C{index % 10}", linestyle="-" if shortcuts else "--")


def palette(keys: Iterable[str]) -> dict[str, str]:
    """One colour per key (a net, or a kind of net), in order, from matplotlib's default cycle.
    A study draws every figure with one such mapping, so a net has the same colour in each."""
    return {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(keys))}


def shade(colour: str, level: float) -> tuple[float, float, float]:
    """``colour`` lightened towards white for ``level`` in [0, 1) (1: the colour itself): the
    same hue, so shades of one net kind (e.g. its depths) still read as that kind."""
    r, g, b = to_rgb(colour)
    keep = 0.4 + 0.6 * level
    return (1 - (1 - r) * keep, 1 - (1 - g) * keep, 1 - (1 - b) * keep)


def _as_list(report):
    """A net's reports over seeds: one report, or a list of them (one per seed)."""
    return list(report) if isinstance(report, (list, tuple)) else [report]


def _band(ax, xs, series: list, style: dict, label: str, geometric: bool = False, **kwargs) -> np.ndarray:
    """The mean of ``series`` (one array per seed) as a line, and with several seeds their
    min-max range as a shaded band; returns the mean. ``geometric`` averages logs (for norms
    drawn on a log axis)."""
    arr = np.asarray(series, dtype=float)
    n = len(series)
    # Columns that are NaN on every seed (a block that cannot be deleted) stay NaN, silently.
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.exp(np.nanmean(np.log(arr), axis=0)) if geometric else np.nanmean(arr, axis=0)
        low, high = np.nanmin(arr, axis=0), np.nanmax(arr, axis=0)
    ax.plot(xs, mean, label=label + (f" (mean of {n} seeds, band: range)" if n > 1 else ""), **style, **kwargs)
    if n > 1:
        ax.fill_between(xs, low, high, color=style["color"], alpha=0.18, linewidth=0)
    return mean


def geometric_mean(values) -> float:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


def plot_gradient_norms(reports: Mapping[str, "GradientReport"], path: PathLike,
                        title: str = "Gradient norm per layer", colours: Optional[Mapping[str, str]] = None) -> Path:
    """Gradient L2 norm against layer index (log scale), one line per model (coloured by
    ``colours[label]`` where given, e.g. a study's palette).

    The line runs over the main path (convolutions, then the classifier, drawn as a square);
    projection shortcuts are crosses at the position of the block they bypass.
    """
    fig, (ax,) = _figure(width=7.5)
    for i, (label, group) in enumerate(reports.items()):
        group = _as_list(group)
        style = dict(_style(i, group[0].has_shortcuts, (colours or {}).get(label)), gid=label)
        kinds = group[0].kinds
        main = [j for j, k in enumerate(kinds) if k != "shortcut"]
        xs = list(range(1, len(main) + 1))
        ratio = geometric_mean(r.ratio_first_last for r in group)
        ys = _band(ax, xs, [[r.norms[j] for j in main] for r in group], style,
                   f"{label} (first/last conv = {ratio:.3g})", geometric=True, marker=".")
        ax.plot(xs[-1:], ys[-1:], marker="s", color=style["color"], linestyle="none")
        # A shortcut projection sits at the position of the block it bypasses.
        sx = [max(sum(1 for m in main if m < j), 1) for j, k in enumerate(kinds) if k == "shortcut"]
        if sx:
            sy = [geometric_mean(r.norms[j] for r in group) for j, k in enumerate(kinds) if k == "shortcut"]
            ax.plot(sx, sy, marker="x", color=style["color"], linestyle="none")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer index (weight layers in depth order, input → output)")
    ax.set_ylabel("‖∂loss/∂W‖₂  (loss units per weight unit, log scale)")
    ax.set_title(title)
    handles, _ = ax.get_legend_handles_labels()
    extra = [Line2D([], [], color="grey", marker="s", linestyle="none", label="classifier (last point)"),
             Line2D([], [], color="grey", marker="x", linestyle="none", label="shortcut projection")]
    ax.legend(handles=handles + extra, title=_STYLE_NOTE, fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_layer_responses(reports: Mapping[str, "ResponseReport"], path: PathLike,
                         title: str = "Std of 3x3 layer responses (He et al. 2015, Fig. 7)") -> Path:
    """Two panels: response std by layer index, and the same sorted in descending order."""
    fig, (by_layer, by_size) = _figure(ncols=2)
    for i, (label, group) in enumerate(reports.items()):
        group = _as_list(group)
        style = _style(i, group[0].has_shortcuts)
        xs = np.arange(1, len(group[0].stds) + 1)
        _band(by_layer, xs, [r.stds for r in group], style, label, marker=".")
        _band(by_size, xs, [r.sorted_stds for r in group], style, label, marker=".")
    by_layer.set_xlabel("layer index (3x3 conv layers in depth order)")
    by_layer.set_title("by depth")
    by_size.set_xlabel("rank (layers sorted by std, largest first)")
    by_size.set_title("sorted by magnitude")
    for ax in (by_layer, by_size):
        ax.set_ylabel("std of response (activation units)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    by_layer.legend(title=_STYLE_NOTE, fontsize="small")
    fig.suptitle(f"{title}\nresponse: output of the BN after each 3x3 conv (pre-activation units: the conv output)")
    return _save(fig, path)


def plot_lesion(reports: Mapping[str, "LesionReport"], path: PathLike,
                title: str = "Deleting blocks at test time (Veit et al. 2016)") -> Path:
    """Left: test error with each block deleted alone (downsampling blocks marked, blocks that
    cannot be deleted crossed at the top). Right: error against the number of blocks deleted
    at random (mean ± std over trials; 0 is the intact model)."""
    fig, (single, rand) = _figure(ncols=2)
    any_random = False
    for i, (label, group) in enumerate(reports.items()):
        group = _as_list(group)
        r = group[0]
        style = _style(i, r.has_shortcuts)
        xs = [b.index for b in r.blocks]
        per_seed = [[b.error_pct if b.error_pct is not None else math.nan for b in g.blocks] for g in group]
        errs = list(_band(single, xs, per_seed, style, f"{label} ({r.removable_count}/{len(r.blocks)} deletable)",
                          marker="."))
        single.axhline(float(np.mean([g.baseline_error_pct for g in group])), color=style["color"], linestyle=":",
                       linewidth=1)
        down = [(b.index, e) for b, e in zip(r.blocks, errs) if b.downsampling and not math.isnan(e)]
        if down:
            single.plot(*zip(*down), marker="o", markersize=9, markerfacecolor="none",
                        color=style["color"], linestyle="none")
        fixed = [b.index for b in r.blocks if not b.removable]
        if fixed:
            # Axis-fraction y: the crosses sit at the top whatever the error range.
            single.plot(fixed, [0.97] * len(fixed), marker="x", color=style["color"], linestyle="none",
                        transform=single.get_xaxis_transform())
        randoms = [g.random for g in group if g.random is not None]
        if randoms:
            any_random = True
            ks = [0, *randoms[0].k_values]
            means = np.array([[g.baseline_error_pct, *g.random.mean_error_pct] for g in group if g.random is not None])
            # one seed: the spread over random trials; several: the spread of the seeds' means
            std = ([0.0, *randoms[0].std_error_pct] if len(randoms) == 1 else means.std(axis=0, ddof=1))
            rand.errorbar(ks, means.mean(axis=0), yerr=std, marker=".", capsize=3,
                          label=label + (f" ({len(randoms)} seeds)" if len(randoms) > 1 else ""), **style)
    single.set_xlabel("index of the deleted block (depth order)")
    single.set_ylabel("test error (%)")
    single.set_title("one block deleted")
    handles, _ = single.get_legend_handles_labels()
    extra = [Line2D([], [], color="grey", linestyle=":", label="intact model"),
             Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle="none",
                    label="downsampling block"),
             Line2D([], [], color="grey", marker="x", linestyle="none",
                    label="not deletable (shape changes, no shortcut)")]
    single.legend(handles=handles + extra, title=_STYLE_NOTE, fontsize="small")
    rand.set_xlabel("number of blocks deleted at random")
    rand.set_ylabel("test error (%), mean ± std over trials")
    rand.set_title("k random blocks deleted")
    if any_random:
        rand.legend(title=_STYLE_NOTE, fontsize="small")
    else:
        rand.text(0.5, 0.5, "not measured", transform=rand.transAxes, ha="center", va="center")
    for ax in (single, rand):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _save(fig, path)


def plot_reuse(report: "ReuseReport", path: PathLike, title: str = "") -> Path:
    """One heatmap per dense block as in Huang et al. 2017, Fig. 5: x the target layer (the
    last column is the transition or the classifier), y the source layer (0 the block input),
    colour the mean |weight| from source to target divided by the target's largest one."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="white")
    n = len(report.blocks)
    fig, axes = _figure(ncols=n, width=4.6, height=4.4)
    image = None
    for ax, block in zip(axes, report.blocks):
        # (target, source) -> (source, target): sources down the y axis, targets along x.
        grid = np.ma.masked_invalid(np.array(block.normalised(), dtype=float).T)
        image = ax.imshow(grid, cmap=cmap, vmin=0.0, vmax=1.0, origin="upper", aspect="auto")
        last = "T" if block.last_target == "transition" else "C"
        n_layers = block.num_layers
        step = max(1, math.ceil((n_layers + 1) / 12))  # at most ~12 labels per axis
        ticks = sorted(set(range(0, n_layers + 1, step)) | {n_layers})
        # Column t is target layer t + 1; the last column is the transition or classifier.
        ax.set_xticks(ticks, [str(t + 1) if t < n_layers else last for t in ticks])
        ax.set_yticks(ticks, [str(s) for s in ticks])
        ax.set_xlabel(f"target layer ℓ ({last} = {block.last_target})")
        ax.set_ylabel("source layer s (0 = block input)")
        ax.set_title(block.name.rsplit(".", 1)[-1])
    if image is not None:
        fig.colorbar(image, ax=axes, label="mean |w| from s to ℓ  ÷  largest into ℓ")
    fig.suptitle((title or f"Feature reuse in {report.model_name or 'a DenseNet'} (Huang et al. 2017, Fig. 5)")
                 + "\nwhite: no connection (a layer cannot read later layers)")
    return _save(fig, path)


__all__ = ["palette", "shade", "plot_gradient_norms", "plot_layer_responses", "plot_lesion", "plot_reuse"]


# --- training ------------------------------------------------------------------------------

def plot_confusion(confusion, classes: list[str], path: PathLike, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), with counts."""
    counts = np.asarray(confusion, dtype=np.int64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(classes) + 2.5)
    fig, (ax,) = _figure(width=size, height=size)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(list(ticks), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(list(ticks), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(classes) <= 20:
        for r in ticks:
            for c in ticks:
                ax.text(c, r, str(counts[r, c]), ha="center", va="center", fontsize=7,
                        color="white" if rates[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
