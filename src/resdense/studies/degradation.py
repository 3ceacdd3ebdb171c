"""The degradation study (He et al. 2015, Fig. 1 and Fig. 6): plain nets and their residual
twins trained with the same recipe, data order and seeds at several depths.

Every run is an ordinary resdense run directory inside the study directory, so the study
resumes after a crash (an unfinished run continues from its last checkpoint) and skips runs
that already finished. ``results.jsonl`` holds one row per run; the report is drawn from it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .._io import atomic_write_text
from ..errors import ConfigError
from ..train.config import TrainConfig, apply_overrides
from ..train.recipes import recipe

# Each preset is data: the training settings every run of the study shares.
PRESETS: dict[str, dict[str, Any]] = {
    # For a 2-core CPU: one-cycle over 230 steps (10 epochs of a seeded 3k subset) with the
    # paper's weight decay, and a 1k validation split, sized so that depths 20 and 56 (four runs)
    # finish within 15 minutes in fp32 (11 min here). The plain nets fall behind at once. Training
    # error is what the verdict compares, and the deeper ResNet only passes the shallower one once
    # its extra capacity counts: with 4 epochs of 9k images (280 steps) it was still 0.35-0.77
    # points behind, with 10 epochs of 3k it ends 0.37 points ahead.
    "quick": dict(recipe="quick", epochs=10, batch_size=128, lr=0.2, schedule="onecycle", warmup=0.3,
                  label_smoothing=0.0, weight_decay=1e-4, tta_flip=False, min_scale=1.0, train_subset=3000,
                  val_size=1000, curve_every=10),
    # He et al. 2015, Sec. 4.2 (for users with a GPU and CIFAR-10): depths 20/32/44/56/110.
    "paper": dict(recipe="resnet-cifar-paper", curve_every=100),
}
KINDS = {"plain": "cifar_plain", "resnet": "cifar_resnet"}  # plain twin, residual net


@dataclass
class StudyConfig:
    data: str = "fashion-mnist"
    depths: list[int] = field(default_factory=lambda: [20, 56])
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "quick"
    shortcut: str = "A"
    out: str = "runs/degradation"
    data_dir: Optional[str] = None
    overrides: dict[str, Any] = field(default_factory=dict)  # any TrainConfig setting, e.g. epochs


def run_name(kind: str, depth: int, seed: int) -> str:
    return f"{kind}{depth}-seed{seed}"


def run_config(study: StudyConfig, kind: str, depth: int, seed: int) -> TrainConfig:
    """The TrainConfig of one run: identical across kinds but for the shortcut."""
    if study.preset not in PRESETS:
        raise ConfigError(f"unknown preset {study.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = dict(PRESETS[study.preset])
    base = recipe(preset.pop("recipe"))
    values = {**base, **preset, **study.overrides}
    # Model settings from the preset or --set (e.g. zero_init_last, which plain twins ignore)
    # join the depth and shortcut this run is about.
    model_kwargs = {**values.get("model_kwargs", {}), "depth": depth,
                    **({"shortcut": study.shortcut} if kind == "resnet" else {})}
    values.update({"recipe": PRESETS[study.preset]["recipe"], "model": KINDS[kind], "model_kwargs": model_kwargs,
                   "data": study.data, "data_dir": study.data_dir, "seed": seed, "progress": False,
                   "out": str(Path(study.out) / run_name(kind, depth, seed))})
    return apply_overrides(TrainConfig(), values, f"study preset {study.preset}")


def run_study(study: StudyConfig, log=print) -> list[dict[str, Any]]:
    """Train every (kind, depth, seed) not yet finished; write results.jsonl; return its rows."""
    from ..train.runner import train

    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(asdict(study), indent=2))
    for depth in study.depths:
        for seed in study.seeds:
            for kind in KINDS:
                cfg = run_config(study, kind, depth, seed)
                run_dir = Path(cfg.out)
                if (run_dir / "summary.json").is_file():
                    log(f"{run_dir.name}: finished earlier, skipped")
                    continue
                log(f"{run_dir.name}: {'resuming' if run_dir.exists() else 'training'}")
                train(cfg, resume=run_dir.exists())
    rows = collect_rows(out)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def collect_rows(out: Path) -> list[dict[str, Any]]:
    """One row per finished run directory of the study: its config, final errors, curves."""
    rows = []
    for summary_path in sorted(Path(out).glob("*/summary.json")):
        run_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        cfg = summary["config"]
        kind = next((k for k, model in KINDS.items() if model == cfg["model"]), None)
        if kind is None:  # another run kept in the study folder (e.g. a DenseNet for `analyze reuse`)
            continue
        curve = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()] \
            if (run_dir / "curve.jsonl").is_file() else []
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rows.append({
            "run": run_dir.name, "kind": kind, "depth": int(cfg["model_kwargs"]["depth"]), "seed": cfg["seed"],
            "final_train_error": summary["final_train_error"], "final_val_error": summary["final_val_error"],
            "test_error": summary["test_error_last"], "test_error_best": summary["test_error_best"],
            "wall_time": summary["wall_time"], "curve": curve,
            "epochs": [{k: m[k] for k in ("step", "train_error", "val_error")} for m in metrics],
            "config": cfg,
        })
    return rows


def load_rows(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: run `resdense study degradation --out {out}` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def final_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of the final errors, per (kind, depth)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["depth"]), []).append(r)
    table = []
    for (kind, depth), rs in sorted(groups.items(), key=lambda kv: (list(KINDS).index(kv[0][0]), kv[0][1])):
        entry = {"kind": kind, "depth": depth, "seeds": len(rs)}
        for key in ("final_train_error", "final_val_error", "test_error"):
            entry[key], entry[key + "_std"] = mean_std([r[key] for r in rs])
        table.append(entry)
    return table


def verdict(table: list[dict[str, Any]]) -> dict[str, Any]:
    """Reproduced: the deepest plain net ends with higher training error than the shallowest.
    Solved: the deepest ResNet ends with training error no higher than the shallowest."""
    by = {(t["kind"], t["depth"]): t["final_train_error"] for t in table}
    depths = sorted({t["depth"] for t in table})
    if len(depths) < 2 or not all((k, d) in by for k in KINDS for d in (depths[0], depths[-1])):
        return {"reproduced": None, "solved": None,
                "text": "needs finished plain and residual runs at two depths or more to judge"}
    lo, hi = depths[0], depths[-1]
    reproduced = by[("plain", hi)] > by[("plain", lo)]
    solved = by[("resnet", hi)] <= by[("resnet", lo)]
    pct = {key: f"{100 * value:.2f}%" for key, value in by.items()}
    text = (f"Degradation {'reproduced' if reproduced else 'NOT reproduced'}: plain-{hi} ends with training error "
            f"{pct[('plain', hi)]} vs plain-{lo} {pct[('plain', lo)]}. "
            f"{'Solved by shortcuts' if solved else 'NOT solved by shortcuts'}: ResNet-{hi} ends with training error "
            f"{pct[('resnet', hi)]} vs ResNet-{lo} {pct[('resnet', lo)]}.")
    return {"reproduced": reproduced, "solved": solved, "text": text, "shallow": lo, "deep": hi}
