"""The efficiency study (Huang et al. 2017, Fig. 4 and Table 2; He et al. 2015, Sec. 4.1
bottlenecks): DenseNet-BC (k=12) at several depths beside basic and bottleneck ResNets, on the
same data, recipe and seeds; test error against parameters, multiply-adds and wall time.

Claims (test error of the final model, in points):

1. *parameters* — the DenseNet-BC with the most parameters still below the best ResNet's (the
   ResNet with the lowest mean test error) reaches that ResNet's error: DenseNet − ResNet <
   margin. N, the ratio of their parameter counts, is in the claim's sentence.
2. *multiply-adds* — the same with MACs per image.
3. *bottleneck* — a bottleneck ResNet is at most 1 point worse than the basic ResNet of the same
   depth, with fewer parameters (the 1x1 convolutions' purpose).

The best ResNet is chosen by the results, which makes claims 1 and 2 harder for DenseNet, not
easier. Wall time is reported, not claimed: on a CPU a DenseNet's concatenations and many thin
layers cost more time per multiply-add than a ResNet's convolutions.
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from .budget import PaperBudget, PaperEffect, PaperNumbers
from .report import count_text, macs_column, size_text
from .spec import QUICK_CPU, SMOKE, STANDARD, Arm, ArmOrder, StudyConfig, StudySpec, register_study
from .stats import Claim

DENSENET_BC = Arm("densenet-bc", "cifar_densenet", {"growth_rate": 12, "bc": True}, labels={"family": "densenet-bc"})
RESNET = Arm("resnet", "cifar_resnet", labels={"family": "resnet"})
BOTTLENECK = Arm("resnet-bottleneck", "cifar_resnet", {"bottleneck": True}, labels={"family": "resnet-bottleneck"})
ARMS = (DENSENET_BC, RESNET, BOTTLENECK)

# The arms at their depths, per preset. Depths: DenseNet-BC 6n+4, basic ResNets 6n+2, bottlenecks
# 9n+2; 20 and 110 are both of the last two, so basic and bottleneck meet at equal depth there.
PRESET_ARMS: dict[str, tuple[Arm, ...]] = {
    # Sized so that three seeds decide within about 15 minutes on a 2-core AVX2 CPU in fp32: a
    # DenseNet-BC-40 step costs as much as four ResNet-20 steps there.
    "quick": (DENSENET_BC.at_depth(22), DENSENET_BC.at_depth(40), RESNET.at_depth(20), RESNET.at_depth(32),
              BOTTLENECK.at_depth(20)),
    # One net of each family, the two ResNets at the depth where basic and bottleneck meet: every
    # claim is made, on numbers that mean nothing.
    "smoke": (DENSENET_BC.at_depth(10), RESNET.at_depth(20), BOTTLENECK.at_depth(20)),
    # The paper's pair (DenseNet-BC-100 k=12, ResNet-110) with a smaller net of each family beside
    # it, and the bottleneck ResNet-110 for the bottleneck claim.
    "standard": (DENSENET_BC.at_depth(40), DENSENET_BC.at_depth(100), RESNET.at_depth(20), RESNET.at_depth(56),
                 RESNET.at_depth(110), BOTTLENECK.at_depth(110)),
    # DenseNet paper, Table 2 (C10+): DenseNet-BC-100 k=12 against ResNet-110 (and its bottleneck twin).
    "paper": (DENSENET_BC.at_depth(40), DENSENET_BC.at_depth(100), RESNET.at_depth(110), BOTTLENECK.at_depth(110)),
}

PRESETS: dict[str, dict[str, Any]] = {
    # The claims are on test error, so the whole 10,000-image test set: on the 2,000-image subset
    # the test images alone put about 0.9 points of noise on a difference of two nets that
    # disagree on 15% of them (0.4 on 10,000); the study took 316 s instead of 269 s for it (fp32,
    # the AVX512 EPYC, --jobs 2).
    "quick": dict(QUICK_CPU, test_subset=None),
    "smoke": dict(QUICK_CPU, **SMOKE),
    # The standard length (spec.STANDARD) in the DenseNet paper's recipe shape: batch 64, Nesterov
    # momentum, lr 0.1 divided by 10 at 50% and 75% of the epochs.
    "standard": dict(STANDARD, recipe="densenet-cifar-paper", batch_size=64),
    # One recipe for every net, as the claim needs: the DenseNet paper's (300 epochs, batch 64).
    "paper": dict(recipe="densenet-cifar-paper", curve_every=100),
}

# The DenseNet paper's C10+ rows (Table 2), shown beside the measured ones.
PAPER_ROWS = (("DenseNet-BC (L=100, k=12)", 0.8e6, 4.51), ("ResNet-110", 1.7e6, 6.41),
              ("pre-activation ResNet-1001", 10.2e6, 4.62))
BOTTLENECK_MARGIN = 1.0  # points: "without degrading performance much"
# Huang et al. 2017, Sec. 4.2: 300 epochs of 64 on the 50,000 C10+ training images (782 batches an epoch).
PAPER_BUDGET = PaperBudget("Huang et al. 2017, Sec. 4.2 (C10+)", "CIFAR-10", steps=300 * 782, batch=64, images=50_000,
                           epochs=300)
_C10 = "C10+ test error, DenseNet-BC-100 (0.8M) vs ResNet-110 (1.7M)"
PAPER_NUMBERS = PaperNumbers(
    "The DenseNet paper's CIFAR-10+ rows (Huang et al. 2017, Table 2), for comparison",
    ("model", "params", "C10+ test error %"), tuple((name, count_text(p), e) for name, p, e in PAPER_ROWS),
    effects=tuple(PaperEffect(key, "DenseNet-BC-100 − ResNet-110", PAPER_ROWS[0][2] - PAPER_ROWS[1][2], _C10)
                  for key in ("params", "macs")))


def arms(study: StudyConfig) -> list[Arm]:
    """The preset's nets: one recipe for all of them, as the claims need."""
    if study.preset not in PRESET_ARMS:
        raise ConfigError(f"unknown preset {study.preset!r} for study efficiency; choose one of {', '.join(PRESET_ARMS)}")
    return list(PRESET_ARMS[study.preset])


def _depths(study: StudyConfig, family: Arm) -> set[int]:
    return {a.labels["depth"] for a in arms(study) if a.labels["family"] == family.labels["family"]}


def _ratio(big: Optional[float], small: Optional[float]) -> str:
    return f"{big / small:.1f}×" if big and small else "N×"


def _pick(table: list[dict[str, Any]], key: str) -> tuple[Optional[dict[str, Any]], Optional[dict[str, Any]]]:
    """(the best ResNet, the DenseNet-BC with the most ``key`` below it; the cheapest one if none is)."""
    resnets = [t for t in table if t["family"] != "densenet-bc" and t.get("test_error") is not None]
    dense = [t for t in table if t["family"] == "densenet-bc" and t.get(key)]
    if not resnets or not dense:
        return None, None
    best = min(resnets, key=itemgetter("test_error"))
    below = [t for t in dense if best.get(key) and t[key] < best[key]]
    return best, (max(below, key=itemgetter(key)) if below else min(dense, key=itemgetter(key)))


def claims(study: StudyConfig, table: Optional[list[dict[str, Any]]] = None) -> list[Claim]:
    margin = float(study.options.get("margin", 0.5))
    out = []
    for key, what in (("params", "parameters"), ("macs", "multiply-adds")):
        best, dense = _pick(table or [], key)
        if best is None or dense is None:
            # No results yet (`study list`): the claim by its rule.
            out.append(Claim(key, f"DenseNet-BC reaches the test error of the best ResNet with N× fewer {what}",
                             (("densenet-bc", 1.0), ("best resnet", -1.0)), sign=-1, metric="test_error",
                             margin=margin, label="DenseNet-BC − best ResNet"))
            continue
        out.append(Claim(
            key, f"DenseNet-BC-{dense['depth']} reaches the test error of the best ResNet ({best['group']}) with "
                 f"{_ratio(best[key], dense[key])} fewer {what} ({count_text(dense[key])} vs {count_text(best[key])}), "
                 f"at most {margin:g} point{'s' if margin != 1 else ''} worse",
            ((dense["group"], 1.0), (best["group"], -1.0)), sign=-1, metric="test_error", margin=margin))
    for depth in sorted(_depths(study, RESNET) & _depths(study, BOTTLENECK)):
        basic, bottle = RESNET.at_depth(depth).group, BOTTLENECK.at_depth(depth).group
        out.append(Claim(
            f"bottleneck_{depth}", f"Bottleneck blocks cut parameters without degrading much: bottleneck ResNet-{depth} "
                                   f"is at most {BOTTLENECK_MARGIN:g} point worse than basic ResNet-{depth}",
            ((bottle, 1.0), (basic, -1.0)), sign=-1, metric="test_error", margin=BOTTLENECK_MARGIN))
    return out


def extra_tables(study: StudyConfig, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Cost on this machine (honest where DenseNet loses)."""
    macs_header, macs_cell = macs_column(table)
    cost = []
    for t in table:
        ips = [r["images_per_s"] for r in rows if r["group"] == t["group"] and r.get("images_per_s")]
        err = "–" if t.get("test_error") is None else f"{100 * t['test_error']:.2f}"
        cost.append([t["group"], count_text(t.get("params")), macs_cell(t), err, f"{t['wall_time']:.0f}",
                     f"{sum(ips) / len(ips):.0f}" if ips else "–"])
    return [("Cost on this machine (wall time per run includes evaluation)",
             ["group", "params", macs_header, "test error %", "wall s / run", "training images/s"], cost)]


def figures(rows: list[dict[str, Any]], table: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    from .figures import plot_efficiency

    if not any(t.get("params") for t in table):
        return []
    sizes = {size_text(t.get("input_size")) for t in table}
    plot_efficiency(table, out / "efficiency.png", ARMS, sizes.pop() if len(sizes) == 1 else "")
    return [("efficiency.png", "Test error (mean ± std over seeds) against parameters, multiply-adds per image "
                               "(after Huang et al. 2017, Fig. 4) and wall time per run on this machine, all on log "
                               "axes; labels are depths.")]


SPEC = register_study(StudySpec(
    name="efficiency", title="Efficiency study: DenseNet-BC and ResNets by parameters, multiply-adds and time",
    summary="DenseNet-BC vs basic and bottleneck ResNets: error per parameter, MAC and second (DenseNet paper, Fig. 4)",
    presets=PRESETS, arms=arms, claims=claims, figures=figures, group_order=ArmOrder(ARMS, "family"),
    label_columns=("family", "depth"), default_options={"margin": 0.5},
    option_help={"margin": "points by which DenseNet-BC may trail the best ResNet and still reach its error"},
    setup_note="non-inferiority margin {margin} points for the DenseNet claims", extra_tables=extra_tables,
    paper_budget=PAPER_BUDGET, paper_numbers=PAPER_NUMBERS,
    measured={"quick": "5.3 min on a 2-core AVX512-BF16 AMD EPYC (fp32 forced, --jobs 2)"}))
