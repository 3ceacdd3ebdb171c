"""``resdense analyze gradients|responses|lesion|reuse``: the papers' analyses on trained models."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..outputs import OUTPUT, claim
from ._util import positive_int


def register(sub: Any) -> None:
    p = sub.add_parser("analyze", help="gradient flow, layer responses, lesions, DenseNet feature reuse")
    p.add_argument("analysis", choices=("gradients", "responses", "lesion", "reuse"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", metavar="STUDY_DIR", help="every run of a degradation study")
    src.add_argument("--checkpoint", action="append", metavar="RUN_DIR", help="a trained run (repeatable)")
    p.add_argument("--batches", type=positive_int, default=4, help="batches of real data to average over")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--data-dir")
    p.add_argument("--out", help="where to write PNG + JSON (default: STUDY_DIR/analysis or the first run's)")
    p.set_defaults(func=cmd_analyze)


def _runs(args: argparse.Namespace) -> list[Path]:
    if args.study:
        # The run folders (not their `last` links): a run's name is its folder's.
        runs = sorted(p.parent.parent for p in Path(args.study).glob("*/last/model.safetensors"))
        if not runs:
            raise ConfigError(f"{args.study} holds no trained runs; run `resdense study degradation --out {args.study}` first")
        return runs
    return [Path(c) for c in args.checkpoint]


def _batches(meta: dict[str, Any], split: str, count: int, batch_size: int, data_dir: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of real images, normalised as in training (validation split, or test for lesions)."""
    from ..data import load_dataset
    from ..data.loader import TensorLoader

    cfg = meta.get("config", {})
    splits = load_dataset(meta["data"], data_dir or cfg.get("data_dir"), val_size=cfg.get("val_size"))
    data = splits.load_test() if split == "test" else splits.val
    loader = TensorLoader(data.images[: count * batch_size], data.labels[: count * batch_size], batch_size,
                          mean=meta["mean"], std=meta["std"], channels_last=False)
    return list(loader)


def _label(meta: dict[str, Any], run: Path) -> str:
    depth = meta.get("model_kwargs", {}).get("depth")
    return f"{meta['model'].replace('cifar_', '')}{depth if depth else ''}" if depth else run.name


def _groups(loaded: list[tuple[Path, Any, dict[str, Any]]]) -> dict[str, list[tuple[Path, Any, dict[str, Any]]]]:
    """Runs by net ('plain20'): the seeds of one net are aggregated, not drawn as separate nets."""
    groups: dict[str, list[tuple[Path, Any, dict[str, Any]]]] = {}
    for run, model, meta in loaded:
        groups.setdefault(_label(meta, run), []).append((run, model, meta))
    return groups


def _spread(values: list[float], fmt: str) -> str:
    """'' for one run; ' (3 seeds: 1.2e3-2.4e3)' for several."""
    if len(values) < 2:
        return ""
    return f" ({len(values)} seeds: {format(min(values), fmt)}–{format(max(values), fmt)})"


def _to_json(group: list[tuple[Path, Any]]) -> Any:
    """One run: its report; several seeds: every run's report by folder name."""
    if len(group) == 1:
        return group[0][1].to_dict()
    return {"runs": {run.name: r.to_dict() for run, r in group}, "seeds": len(group)}


def cmd_analyze(args: argparse.Namespace) -> int:
    from .. import plots
    from ..analysis.gradients import gradient_norms
    from ..analysis.lesion import lesion_study
    from ..analysis.responses import layer_responses
    from ..analysis.reuse import feature_reuse
    from ..models import DenseNet
    from ..train.checkpoint import build_model_from_meta, load_for_inference
    from ..train.context import model_depth

    runs = _runs(args)
    loaded = [(run, *load_for_inference(run, prefer="last")) for run in runs]
    groups = _groups(loaded)
    dense = [(name, members) for name, members in groups.items() if isinstance(members[0][1], DenseNet)]
    if args.analysis == "reuse" and not dense:
        raise ConfigError("reuse needs a trained DenseNet, e.g. `resdense train --model densenet_bc100_k12 ...`")
    # Only now, after the runs are known to load: a mistyped run folder must not be created.
    out = Path(args.out) if args.out else (Path(args.study) / "analysis" if args.study else runs[0] / "analysis")
    claim(out, OUTPUT)
    results: dict[str, list[tuple[Path, Any]]] = {}  # report key -> (run, report) per seed
    depths: dict[str, int] = {}  # report key -> depth of its net: plain and residual twins share a figure
    if args.analysis == "reuse":
        for name, members in dense:
            for run, model, meta in members:
                key = name if len(members) == 1 else f"{name} {run.name}"
                report = feature_reuse(model)
                png = plots.plot_reuse(report, out / f"reuse_{key.replace(' ', '_')}.png",
                                       title=f"Feature reuse in {key} (DenseNet Fig. 5)")
                results[key] = [(run, report)]
                print(f"{key}: {len(report.blocks)} dense blocks; heatmap {png}")
    else:
        for name, members in groups.items():
            depth = members[0][2].get("model_kwargs", {}).get("depth") or model_depth(members[0][1])
            for run, model, meta in members:
                if args.analysis == "gradients":
                    batches = _batches(meta, "val", args.batches, args.batch_size, args.data_dir)
                    torch.manual_seed(meta.get("config", {}).get("seed", 0))
                    fresh = build_model_from_meta(meta)  # the same net at initialisation
                    for stage, net in (("init", fresh), ("trained", model)):
                        results.setdefault(f"{name} ({stage})", []).append(
                            (run, gradient_norms(net, batches, max_batches=args.batches)))
                        depths[f"{name} ({stage})"] = depth
                elif args.analysis == "responses":
                    results.setdefault(name, []).append((run, layer_responses(
                        model, _batches(meta, "val", args.batches, args.batch_size, args.data_dir), max_batches=args.batches)))
                    depths[name] = depth
                else:
                    results.setdefault(name, []).append(
                        (run, lesion_study(model, _batches(meta, "test", args.batches, args.batch_size, args.data_dir))))
                    depths[name] = depth
        for key, group in results.items():
            rs = [r for _, r in group]
            if args.analysis == "gradients":
                name, stage = key.rsplit(" (", 1)
                ratios = [r.ratio_first_last for r in rs]
                print(f"{name:>12} {stage[:-1]:>7}: first/last conv gradient-norm ratio "
                      f"{plots.geometric_mean(ratios):.3g}{_spread(ratios, '.3g')}")
            elif args.analysis == "responses":
                means = [sum(r.stds) / len(r.stds) for r in rs]
                print(f"{key:>12}: {len(rs[0].stds)} layers, response std mean {sum(means) / len(means):.3f}"
                      f"{_spread(means, '.3f')}, max {max(max(r.stds) for r in rs):.3f}")
            else:
                base = [r.baseline_error_pct for r in rs]
                worst = [max((b.error_pct for b in r.blocks if b.error_pct is not None), default=math.nan) for r in rs]
                print(f"{key:>12}: baseline {sum(base) / len(base):.2f}% error{_spread(base, '.2f')}; "
                      f"{rs[0].removable_count}/{len(rs[0].blocks)} blocks removable; worst single lesion "
                      f"{sum(worst) / len(worst):.2f}%{_spread(worst, '.2f')}")
        figure = {"gradients": plots.plot_gradient_norms, "responses": plots.plot_layer_responses,
                  "lesion": plots.plot_lesion}[args.analysis]
        reports = {key: [r for _, r in group] for key, group in results.items()}
        for suffix, members in _by_depth(reports, depths).items():
            png = figure(members, out / f"{args.analysis}{suffix}.png")
            print(f"figure: {png}")
    (out / f"{args.analysis}.json").write_text(json.dumps({k: _to_json(g) for k, g in results.items()}, indent=2,
                                                          default=str))
    print(f"results: {out / (args.analysis + '.json')}")
    return 0


def _by_depth(reports: dict[str, Any], depths: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Group plain and residual nets of the same depth into one figure ('' when there is one group)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, r in reports.items():
        groups.setdefault(f"_depth{depths[name]}", {})[name] = r
    return groups if len(groups) > 1 else {"": reports}
