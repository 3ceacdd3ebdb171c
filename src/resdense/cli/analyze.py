"""``resdense analyze gradients|responses|lesion|reuse``: the papers' analyses on trained models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def register(sub: Any) -> None:
    p = sub.add_parser("analyze", help="gradient flow, layer responses, lesions, DenseNet feature reuse")
    p.add_argument("analysis", choices=("gradients", "responses", "lesion", "reuse"))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", metavar="STUDY_DIR", help="every run of a degradation study")
    src.add_argument("--checkpoint", action="append", metavar="RUN_DIR", help="a trained run (repeatable)")
    p.add_argument("--batches", type=int, default=4, help="batches of real data to average over")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-dir")
    p.add_argument("--out", help="where to write PNG + JSON (default: STUDY_DIR/analysis or the first run's)")
    p.set_defaults(func=cmd_analyze)


def _runs(args: argparse.Namespace) -> list[Path]:
    if args.study:
        runs = sorted(p.parent for p in Path(args.study).glob("*/last/model.safetensors"))
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


def _labels(loaded: list[tuple[Path, Any, dict[str, Any]]]) -> list[str]:
    """A name per run ('plain20'); the run folders' names where two runs would share one (seeds)."""
    names = [_label(meta, run) for run, _, meta in loaded]
    return names if len(set(names)) == len(names) else [run.name for run, _, _ in loaded]


def cmd_analyze(args: argparse.Namespace) -> int:
    from .. import plots
    from ..analysis.gradients import gradient_norms
    from ..analysis.lesion import lesion_study
    from ..analysis.responses import layer_responses
    from ..analysis.reuse import feature_reuse
    from ..models import DenseNet
    from ..train.checkpoint import build_model_from_meta, load_for_inference
    from ..train.runner import model_depth

    runs = _runs(args)
    loaded = [(run, *load_for_inference(run, prefer="last")) for run in runs]
    names = _labels(loaded)
    dense = [(r, m, meta, n) for (r, m, meta), n in zip(loaded, names) if isinstance(m, DenseNet)]
    if args.analysis == "reuse" and not dense:
        raise ConfigError("reuse needs a trained DenseNet, e.g. `resdense train --model densenet_bc100_k12 ...`")
    # Only now, after the runs are known to load: a mistyped run folder must not be created.
    out = Path(args.out) if args.out else (Path(args.study) / "analysis" if args.study else runs[0] / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, Any] = {}
    depths: dict[str, int] = {}  # report key -> depth of its net: plain and residual twins share a figure
    if args.analysis == "reuse":
        for run, model, meta, name in dense:
            report = feature_reuse(model)
            png = plots.plot_reuse(report, out / f"reuse_{name}.png", title=f"Feature reuse in {name} (DenseNet Fig. 5)")
            reports[name] = report.to_dict()
            print(f"{name}: {len(report.blocks)} dense blocks; heatmap {png}")
    else:
        for (run, model, meta), name in zip(loaded, names):
            depth = meta.get("model_kwargs", {}).get("depth") or model_depth(model)
            if args.analysis == "gradients":
                batches = _batches(meta, "val", args.batches, args.batch_size, args.data_dir)
                torch.manual_seed(meta.get("config", {}).get("seed", 0))
                fresh = build_model_from_meta(meta)  # the same net at initialisation
                for stage, net in (("init", fresh), ("trained", model)):
                    r = gradient_norms(net, batches, max_batches=args.batches)
                    reports[f"{name} ({stage})"] = r
                    depths[f"{name} ({stage})"] = depth
                    print(f"{name:>12} {stage:>7}: first/last conv gradient-norm ratio {r.ratio_first_last:.3g}")
            elif args.analysis == "responses":
                r = layer_responses(model, _batches(meta, "val", args.batches, args.batch_size, args.data_dir),
                                    max_batches=args.batches)
                reports[name], depths[name] = r, depth
                print(f"{name:>12}: {len(r.stds)} layers, response std mean {sum(r.stds) / len(r.stds):.3f}, "
                      f"max {max(r.stds):.3f}")
            else:
                r = lesion_study(model, _batches(meta, "test", args.batches, args.batch_size, args.data_dir))
                reports[name], depths[name] = r, depth
                worst = max(r.blocks, key=lambda b: b.error_pct if b.error_pct is not None else -1, default=None)
                print(f"{name:>12}: baseline {r.baseline_error_pct:.2f}% error; {r.removable_count}/{len(r.blocks)} "
                      f"blocks removable" + (f"; worst single lesion {worst.name} {worst.error_pct:.2f}%" if worst and worst.error_pct is not None else ""))
        figure = {"gradients": plots.plot_gradient_norms, "responses": plots.plot_layer_responses,
                  "lesion": plots.plot_lesion}[args.analysis]
        for group, members in _by_depth(reports, depths).items():
            png = figure(members, out / f"{args.analysis}{group}.png")
            print(f"figure: {png}")
        reports = {k: v.to_dict() for k, v in reports.items()}
    (out / f"{args.analysis}.json").write_text(json.dumps(reports, indent=2, default=str))
    print(f"results: {out / (args.analysis + '.json')}")
    return 0


def _by_depth(reports: dict[str, Any], depths: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Group plain and residual nets of the same depth into one figure ('' when there is one group)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, r in reports.items():
        groups.setdefault(f"_depth{depths[name]}", {})[name] = r
    return groups if len(groups) > 1 else {"": reports}
