"""The shortcuts study (He et al. 2015, Sec. 4.1, Table 3): one depth, four nets that differ only
in their shortcuts: none (the plain twin), A (identity, zero-padded where the shape changes),
B (identity, projected where the shape changes), C (projected everywhere).

Claims:

1. *option X fixes degradation* (X = A, B, C) — ResNet-D with shortcut X ends with lower
   training error than plain-D: X − plain < 0;
2. *projections are not essential* (X = B, C) — on test error, X improves on A by less than half
   of what A gained over plain: (A − X) < ½ (plain − A). In Table 3 (ImageNet ResNet-34, top-1)
   A gains 3.51 points over plain, B 0.51 and C 0.84 more (15% and 24% of A's gain), at about
   0.3% and 36% more parameters than A.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .budget import PaperBudget, PaperEffect, PaperNumbers
from .report import count_text
from .spec import QUICK_CPU, SMOKE, STANDARD, Arm, ArmOrder, StudyConfig, StudySpec, cifar_depth, register_study
from .stats import Claim

# One ResNet builder, four shortcut options: none (the plain twin), A, B, C.
ARMS = (Arm("plain", "cifar_resnet", {"shortcut": "none"}, labels={"shortcut": "none"}, shortcuts=False),
        *(Arm(f"resnet{x}", "cifar_resnet", {"shortcut": x}, labels={"shortcut": x}) for x in "ABC"))
PRESETS: dict[str, dict[str, Any]] = {
    # At depth 56, four nets × three seeds cost about 1.5 times the degradation study's twelve runs.
    "quick": dict(QUICK_CPU),
    "smoke": dict(QUICK_CPU, **SMOKE),
    "standard": dict(STANDARD),
    # The CIFAR-10 recipe of He et al. 2015, Sec. 4.2 (Table 3 itself is ImageNet ResNet-34).
    "paper": dict(recipe="resnet-cifar-paper", curve_every=100),
}
# He et al. 2015, Table 3: ImageNet validation top-1 error (10-crop), 34 layers (and 18, Table 2).
PAPER_ROWS = (("plain-34", 28.54), ("ResNet-34 A", 25.03), ("ResNet-34 B", 24.52), ("ResNet-34 C", 24.19),
              ("plain-18", 27.94), ("ResNet-18", 27.88))
FRACTION = 0.5  # claim 2: a projection buys less than this share of A's own gain
_TOP1 = dict(PAPER_ROWS)
# He et al. 2015, Sec. 3.4: Table 3's nets trained up to 600k iterations of 256 on ImageNet's 1.28M images.
PAPER_BUDGET = PaperBudget("He et al. 2015, Sec. 3.4 (ImageNet, Table 3)", "ImageNet", steps=600_000, batch=256,
                           images=1_281_167, epochs=round(600_000 * 256 / 1_281_167, 1))
_TABLE3 = "ImageNet top-1 validation error, 34 layers"
PAPER_NUMBERS = PaperNumbers(
    "He et al. 2015, Table 3 (ImageNet top-1 validation error, 10-crop; 18 layers from Table 2), for comparison",
    ("net", "top-1 error %"), PAPER_ROWS,
    effects=(*(PaperEffect(f"{x}_fixes_degradation", f"ResNet-34 {x} − plain-34",
                           _TOP1[f"ResNet-34 {x}"] - _TOP1["plain-34"], _TABLE3) for x in "ABC"),
             *(PaperEffect(f"{x}_not_essential", f"{FRACTION:g}(plain-34 − A) − (A − {x})",
                           FRACTION * (_TOP1["plain-34"] - _TOP1["ResNet-34 A"])
                           - (_TOP1["ResNet-34 A"] - _TOP1[f"ResNet-34 {x}"]), _TABLE3) for x in "BC")))


def group_name(shortcut: str, depth: int) -> str:
    return next(a for a in ARMS if a.labels["shortcut"] == shortcut).at_depth(depth).group


def _depth(study: StudyConfig) -> int:
    return cifar_depth(study, 56)


def arms(study: StudyConfig) -> list[Arm]:
    depth = _depth(study)
    return [arm.at_depth(depth) for arm in ARMS]


def claims(study: StudyConfig, table: Optional[list[dict[str, Any]]] = None) -> list[Claim]:
    d = _depth(study)
    plain, a = group_name("none", d), group_name("A", d)
    out = [Claim(f"{x}_fixes_degradation", f"Option {x} fixes degradation: ResNet-{d} with shortcut {x} ends with lower "
                 f"training error than plain-{d}", ((group_name(x, d), 1.0), (plain, -1.0)), sign=-1)
           for x in ("A", "B", "C")]
    half = FRACTION
    for x in ("B", "C"):
        g = group_name(x, d)
        # A − X < f (plain − A)  <=>  f·plain − (1 + f)·A + X > 0
        out.append(Claim(f"{x}_not_essential", f"Projections are not essential: option {x} improves on A by less than "
                         f"{half:g} of A's own gain over plain (test error)",
                         ((plain, half), (a, -(1 + half)), (g, 1.0)), sign=1, metric="test_error",
                         label=f"{half:g}({plain} − {a}) − ({a} − {g})"))
    return out


def extra_tables(study: StudyConfig, rows: list[dict[str, Any]], table: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    by = {t["shortcut"]: t for t in table}
    ref = by.get("A")
    body = []
    for t in table:
        extra = (t["params"] - ref["params"]) if ref and ref.get("params") and t.get("params") else None
        gain = (100 * (ref["test_error"] - t["test_error"]) if ref and ref.get("test_error") is not None
                and t.get("test_error") is not None else None)
        body.append([t["group"], count_text(t.get("params")),
                     "–" if extra is None else (f"{extra:+,d}" + (f" ({100 * extra / ref['params']:+.1f}%)" if ref["params"] else "")),
                     "–" if gain is None else f"{gain:+.2f}"])
    return [("Parameters against A and what they buy (test error gained over A, points; mean over seeds)",
             ["group", "params", "params vs A", "test error gain over A"], body)]


def figures(rows: list[dict[str, Any]], table: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    from .figures import plot_bars

    plot_bars(table, out / "shortcuts.png", (("train_error", "training error, eval mode"), ("test_error", "test error")),
              "Shortcut options at one depth (mean ± std over seeds; parameters under each name)")
    return [("shortcuts.png", "Final training error (eval mode) and test error of the plain net and the three "
                              "shortcut options (after He et al. 2015, Table 3); grey: no shortcuts.")]


SPEC = register_study(StudySpec(
    name="shortcuts", title="Shortcut options: none, A (zero-padding), B (projection where shapes change), C (projection everywhere)",
    summary="plain vs shortcut options A/B/C at one depth: error and parameters (ResNet paper, Table 3)",
    presets=PRESETS, arms=arms, claims=claims, figures=figures, group_order=ArmOrder(ARMS, "shortcut"),
    label_columns=("shortcut", "depth"), default_options={"depth": 56}, option_help={"depth": "the one depth of every net, 6n+2"},
    setup_note="depth {depth}", extra_tables=extra_tables, paper_budget=PAPER_BUDGET, paper_numbers=PAPER_NUMBERS,
    measured={"quick": "6.5 min on a 2-core AVX512-BF16 AMD EPYC (fp32 forced, --jobs 2)"}))
