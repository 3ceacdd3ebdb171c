"""The fine-tuning table: ``resdense train --init-from SOURCE --recipe finetune`` against the same
ResNet-20 trained from scratch (``--recipe quick``) for the same steps of the same batch, over seeds,
on two source -> target pairs of real images:

* ``fmnist-to-digits``: a ResNet-20 trained briefly on Fashion-MNIST (10,000 images, 2 epochs) ->
  scikit-learn's bundled handwritten digits (1,797 real 8x8 scans; 400 train, 1,397 test), a
  target of another domain, size and scale;
* ``fmnist04-to-fmnist59``: a ResNet-20 trained on Fashion-MNIST classes 0-4 (4,000 images, 2 epochs; tops, trousers,
  dresses, coats) -> classes 5-9 (sandals, shirts, sneakers, bags, ankle boots; 400 train images
  from the training set, 1,000 test images from the test set): new classes of the same domain.

Usage (from the repository root; needs scikit-learn for the digits: ``pip install scikit-learn``
or ``pip install -e '.[finetune-table]'``)::

    python scripts/finetune_table.py --out runs/finetune-table            # build, train, print the table
    python scripts/finetune_table.py --out runs/finetune-table --arm 'ft-lr02=--init-from {source} --recipe finetune --set lr=0.02'

Every run is an ordinary ``resdense train`` (printed before it starts) into
``OUT/<pair>/<arm>/seed<N>``; a finished run (its ``summary.json``) is not trained again, so an
interrupted table continues where it stopped and extra ``--arm``s reuse the others' runs. The
table reports each arm's test accuracy at the last step (mean ± sd over seeds) and its difference
to scratch paired by seed (mean ± its standard error, and the 90% t interval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from resdense.data import load_dataset  # noqa: E402
from resdense.studies.stats import t_quantile  # noqa: E402

TARGET_TRAIN = 400      # training images of each target (its val split is 10% of these)
SEEDS = (0, 1, 2)
# Every target run: the same batch, epochs and arithmetic for every arm, so every arm takes
# the same 11 x 10 = 110 steps of 32 images (360 training images, 40 held out for validation).
COMMON = ["--batch-size", "32", "--epochs", "10", "--precision", "fp32", "--threads", "1"]
# Handwritten digits are not mirror-symmetric: no flips in training or evaluation, for every arm.
NO_FLIPS = ["--set", "flip=0", "--set", "tta_flip=False"]

SOURCES = {
    "fmnist": ["--model", "resnet20", "--data", "fashion-mnist", "--train-subset", "10000", "--epochs", "2",
               "--seed", "0", "--precision", "fp32"],
    "fmnist04": ["--model", "resnet20", "--data", "{data}/fmnist04", "--train-subset", "4000", "--epochs", "2",
                 "--seed", "0", "--precision", "fp32"],
}
PAIRS = {
    "fmnist-to-digits": {"source": "fmnist", "target": "digits", "extra": NO_FLIPS},
    "fmnist04-to-fmnist59": {"source": "fmnist04", "target": "fmnist59", "extra": []},
}
ARMS = {
    "scratch": "--model resnet20 --recipe quick",
    "finetune": "--init-from {source} --recipe finetune",
    # The finetune recipe as it was before it was measured here (issue 23).
    "finetune-before": "--init-from {source} --recipe finetune --set lr=0.05 --backbone-lr-factor 0.1 --no-recalibrate-bn",
}


def _write_pngs(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.png")


def _pick(labels: np.ndarray, classes: list[int], per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of each class in ``classes`` (seeded), in order."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]))


def build_fmnist(data: Path) -> None:
    """fmnist04/ (2,000 training images of each of classes 0-4, the source) and fmnist59/
    (80 training images of each of classes 5-9, 200 test images of each)."""
    if (data / "fmnist04").exists() and (data / "fmnist59").exists():
        return
    splits = load_dataset("fashion-mnist", val_size=0)
    images, labels = splits.train.images[:, 0].numpy(), splits.train.labels.numpy()
    test = splits.load_test()
    t_images, t_labels = test.images[:, 0].numpy(), test.labels.numpy()
    names = [c.replace("/", "-") for c in splits.classes]
    if not (data / "fmnist04").exists():
        pick = _pick(labels, [0, 1, 2, 3, 4], 2000, seed=0)
        _write_pngs(data / "fmnist04" / "tmp", images[pick], labels[pick], names)
        (data / "fmnist04" / "tmp").rename(data / "fmnist04" / "train")
    if not (data / "fmnist59").exists():
        pick = _pick(labels, [5, 6, 7, 8, 9], TARGET_TRAIN // 5, seed=1)
        t_pick = _pick(t_labels, [5, 6, 7, 8, 9], 200, seed=1)
        _write_pngs(data / "fmnist59.tmp" / "train", images[pick], labels[pick], names)
        _write_pngs(data / "fmnist59.tmp" / "test", t_images[t_pick], t_labels[t_pick], names)
        (data / "fmnist59.tmp").rename(data / "fmnist59")


def build_digits(data: Path) -> None:
    """digits/: scikit-learn's 1,797 handwritten 8x8 digits (0-16 grey levels, scaled to 0-255),
    40 of each digit to train, the other 1,397 to test."""
    if (data / "digits").exists():
        return
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the digits target needs scikit-learn: pip install scikit-learn (or pip install -e '.[finetune-table]')")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    labels = digits.target
    pick = _pick(labels, list(range(10)), TARGET_TRAIN // 10, seed=0)
    rest = np.setdiff1d(np.arange(len(labels)), pick)
    names = [str(d) for d in range(10)]
    _write_pngs(data / "digits.tmp" / "train", images[pick], labels[pick], names)
    _write_pngs(data / "digits.tmp" / "test", images[rest], labels[rest], names)
    (data / "digits.tmp").rename(data / "digits")


def train(args: list[str], out: Path) -> dict:
    """``resdense train ARGS --out OUT`` unless OUT already holds a finished run; its summary."""
    if not (out / "summary.json").exists():
        cmd = ["resdense", "train", *args, "--out", str(out), *(["--overwrite"] if out.exists() else [])]
        print("$", shlex.join(cmd), flush=True)
        # This checkout's resdense, installed or not (the runs import it as this script does).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", *cmd], check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads((out / "summary.json").read_text())


def paired(diffs: list[float]) -> dict:
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    half = t_quantile(n - 1) * se if n > 1 else float("nan")
    return {"mean": mean, "se": se, "ci90": [mean - half, mean + half]}


def run_pair(name: str, pair: dict, arms: dict[str, str], seeds: list[int], data: Path, out: Path) -> list[dict]:
    source = out / "sources" / pair["source"]
    train([a.format(data=data) for a in SOURCES[pair["source"]]], source)
    acc: dict[str, dict[int, float]] = {}
    commands = {}
    for arm, spec in arms.items():
        args = [*shlex.split(spec.format(source=source, data=data)), "--data", str(data / pair["target"]),
                *COMMON, *pair["extra"]]
        commands[arm] = shlex.join(["resdense", "train", *args, "--seed", "N", "--out", str(out / name / arm / "seedN")])
        for seed in seeds:
            summary = train([*args, "--seed", str(seed)], out / name / arm / f"seed{seed}")
            acc.setdefault(arm, {})[seed] = 100 * summary["test_accuracy_last"]
    rows = []
    for arm, by_seed in acc.items():
        values = [by_seed[s] for s in seeds]
        row = {"pair": name, "arm": arm, "seeds": seeds, "accuracy": values, "mean": statistics.fmean(values),
               "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "command": commands[arm]}
        if arm != "scratch" and "scratch" in acc:
            row["minus_scratch"] = paired([by_seed[s] - acc["scratch"][s] for s in seeds])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| pair | arm | test accuracy % (mean ± sd) | − scratch, paired (mean ± se) | 90% interval |",
             "|---|---|---|---|---|"]
    for r in rows:
        d = r.get("minus_scratch")
        diff = f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else ""
        ci = f"[{d['ci90'][0]:+.2f}, {d['ci90'][1]:+.2f}]" if d else ""
        lines.append(f"| {r['pair']} | {r['arm']} | {r['mean']:.2f} ± {r['sd']:.2f} | {diff} | {ci} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the data folders, sources and runs go")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated (default 0,1,2)")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=ARGS",
                   help="another arm: resdense train arguments ({source}: the pair's source run)")
    p.add_argument("--arms", default=None, help="comma-separated: only these arms (default: every arm, and --arm's)")
    p.add_argument("--data-only", action="store_true", help="build the image folders and stop")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = dict(ARMS)
    for item in args.arm:
        name, _, spec = item.partition("=")
        arms[name] = spec
    if args.arms:
        unknown = [a for a in args.arms.split(",") if a not in arms]
        if unknown:
            sys.exit(f"--arms: no arm {', '.join(unknown)}; the arms are {', '.join(arms)}")
        arms = {name: arms[name] for name in args.arms.split(",")}
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    pairs = args.pairs.split(",")
    if "fmnist04-to-fmnist59" in pairs:
        build_fmnist(data)
    if "fmnist-to-digits" in pairs:
        build_digits(data)
    if args.data_only:
        return
    rows = [row for name in pairs for row in run_pair(name, PAIRS[name], arms, seeds, data, args.out)]
    table = markdown(rows)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    for r in rows:
        print(f"{r['pair']} {r['arm']}: {r['command']}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # this process only writes PNGs and reads JSON; the runs have the cores
    main()
