"""The remedies study: the fixes that articles on vanishing and exploding gradients list besides
shortcuts, each applied to the deep plain net, beside the ResNet of the same depth.

Nets (one depth D; every run records its gradient norms: the global norm in each curve point,
and per layer at initialisation and after every epoch in ``RUN/gradients/``):

* ``plain`` and ``resnet`` — the premise: plain-D trains worse than ResNet-D;
* remedies on plain-D — a smaller batch (16 instead of the preset's, same lr: four times the
  steps), gradient clipping (global norm 1), a ten times stronger L2 weight penalty;
* controls — plain-D without batch norm (what the plain nets already rely on), and ResNet-D with
  the last BN of each residual branch zero-initialised (Goyal et al. 2017).

Claims (training error, eval mode): each remedy *removes the degradation* when it closes at
least half of plain-D's gap to ResNet-D: (plain − R) − ½ (plain − ResNet) > 0.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional

from .budget import PaperBudget, PaperEffect, PaperNumbers
from .spec import QUICK_CPU, SMOKE, STANDARD, Arm, ArmOrder, StudyConfig, StudySpec, cifar_depth, register_study, run_config
from .stats import Claim

# ``weight_decay_factor`` is relative: it multiplies the weight decay every other arm gets.
ARMS = (
    Arm("plain", "cifar_plain", labels={"net": "plain"}, about="the plain net", shortcuts=False),
    Arm("plain+small-batch", "cifar_plain", settings={"batch_size": 16}, labels={"net": "plain+small-batch"},
        about="a smaller batch (16, same lr)", shortcuts=False),
    Arm("plain+clip", "cifar_plain", settings={"grad_clip": 1.0}, labels={"net": "plain+clip"},
        about="gradient clipping (global norm 1)", shortcuts=False),
    Arm("plain+l2", "cifar_plain", settings={"weight_decay_factor": 10.0}, labels={"net": "plain+l2"},
        about="a 10x stronger L2 weight penalty", shortcuts=False),
    Arm("plain-no-bn", "cifar_plain", {"norm_layer": "none"}, labels={"net": "plain-no-bn"},
        about="no batch norm (control)", shortcuts=False),
    Arm("resnet", "cifar_resnet", labels={"net": "resnet"}, about="the ResNet"),
    Arm("resnet+zero-init", "cifar_resnet", {"zero_init_last": True}, labels={"net": "resnet+zero-init"},
        about="zero-init of each branch's last BN (control)"),
)
REMEDIES = ("plain+small-batch", "plain+clip", "plain+l2")
FRACTION = 0.5  # a remedy "removes" the degradation when it closes at least this share of the gap

# The articles give no budget or numbers for these remedies; the premise is the ResNet paper's, so
# its CIFAR-10 recipe (Sec. 4.2) and an independent reproduction of it (depth 56, not this study's 32).
PAPER_BUDGET = PaperBudget("He et al. 2015, Sec. 4.2 (the premise; the articles give no budget)", "CIFAR-10",
                           steps=64_000, batch=128, images=45_000, epochs=round(64_000 * 128 / 45_000, 1))
PAPER_NUMBERS = PaperNumbers(
    "The premise at the ResNet paper's budget (an independent CIFAR-10 reproduction of its recipe, depth 56; "
    "the articles give no numbers for the remedies)",
    ("net", "train error %", "test error %"), (("plain-56", 5.24, 14.22), ("ResNet-56", 0.18, 8.30)),
    effects=(PaperEffect("premise", "plain-56 − ResNet-56", 5.24 - 0.18, "training error, independent reproduction, depth 56"),))

PRESETS: dict[str, dict[str, Any]] = {
    # Seven nets × three seeds at depth 32 cost about what twelve runs of depths 20 and 56 do.
    "quick": dict(QUICK_CPU, record_gradients=True),
    "smoke": dict(QUICK_CPU, **SMOKE, record_gradients=True),
    # The small-batch arm takes 8x the steps of the others here (batch 16 on all 55,000 images).
    "standard": dict(STANDARD, record_gradients=True),
    "paper": dict(recipe="resnet-cifar-paper", curve_every=100, record_gradients=True),
}


def group_name(net: str, depth: int) -> str:
    return f"{net}-{depth}"


def _depth(study: StudyConfig) -> int:
    return cifar_depth(study, 32)


def _settings(net_settings: Mapping[str, Any], preset_weight_decay: float) -> dict[str, Any]:
    """A net's run settings, relative ones resolved against the preset's (the L2 factor)."""
    settings = dict(net_settings)
    factor = settings.pop("weight_decay_factor", None)
    if factor is not None:
        settings["weight_decay"] = factor * (preset_weight_decay or 1e-4)
    return settings


def arms(study: StudyConfig) -> list[Arm]:
    depth = _depth(study)
    # The weight decay every other run gets (recipe < preset < --set), which the L2 remedy multiplies.
    weight_decay = run_config(study, SPEC, "plain", "cifar_plain", {"depth": depth}, 0).weight_decay
    return [replace(arm.at_depth(depth), settings=_settings(arm.settings, weight_decay)) for arm in ARMS]


def claims(study: StudyConfig, table: Optional[list[dict[str, Any]]] = None) -> list[Claim]:
    d = _depth(study)
    plain, resnet = group_name("plain", d), group_name("resnet", d)
    out = [Claim("premise", f"The premise: plain-{d} ends with higher training error than ResNet-{d}",
                 ((plain, 1.0), (resnet, -1.0)), sign=1)]
    about = {arm.group: arm.about for arm in ARMS}
    for net in REMEDIES:
        g = group_name(net, d)
        out.append(Claim(f"{net}", f"{about[net][0].upper()}{about[net][1:]} removes the degradation of plain-{d}: "
                         f"it closes at least half of the gap to ResNet-{d}",
                         ((plain, 1 - FRACTION), (resnet, FRACTION), (g, -1.0)), sign=1,
                         label=f"({plain} − {g}) − {FRACTION:g}({plain} − {resnet})"))
    out.append(Claim("no_bn", f"Control: without batch norm plain-{d} ends with higher training error",
                     ((group_name("plain-no-bn", d), 1.0), (plain, -1.0)), sign=1, headline=False))
    out.append(Claim("zero_init", f"Control: zero-init of the residual branches leaves ResNet-{d} at most 1 point worse",
                     ((group_name("resnet+zero-init", d), 1.0), (resnet, -1.0)), sign=-1, margin=1.0, headline=False))
    return out


def _gradient_reports(rows: list[dict[str, Any]], epoch_of: str) -> dict[str, list[Any]]:
    """group -> its seeds' per-layer gradient reports at initialisation ("first") or at the end ("last")."""
    from ..analysis.gradients import GradientReport

    out: dict[str, list[Any]] = {}
    for r in rows:
        folder = Path(r["config"].get("out") or "") / "gradients"
        files = sorted(folder.glob("epoch-*.json")) if folder.is_dir() else []
        if files:
            path = files[0] if epoch_of == "first" else files[-1]
            out.setdefault(r["group"], []).append(GradientReport.from_dict(json.loads(path.read_text())))
    return out


def figures(rows: list[dict[str, Any]], table: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    from .. import plots
    from .figures import plot_bars, plot_grad_norm_curves

    order = [t["group"] for t in table]
    colours = plots.palette(order)  # one colour per net in every figure of the report
    made = []
    plot_bars(table, out / "remedies.png", (("train_error", "training error, eval mode"), ("test_error", "test error")),
              "Remedies on the deep plain net, beside the ResNet (mean ± std over seeds)", label_key="net",
              colours=colours)
    made.append(("remedies.png", "Final training error (eval mode) and test error of every net, each in its colour "
                                 "of every figure here; hatched: plain nets."))
    plot_grad_norm_curves(rows, order, out / "grad_norm_curves.png",
                          "Gradient norm and running training error over training", colours)
    made.append(("grad_norm_curves.png", "Global gradient norm (log scale, before clipping) and running training error "
                                         "every few steps: each line is the seeds' mean, the band their range."))
    for when, caption in (("first", "at initialisation"), ("last", "after the last epoch")):
        reports = _gradient_reports(rows, when)
        if reports:
            name = f"gradients_{when}.png"
            plots.plot_gradient_norms({g: reports[g] for g in order if g in reports}, out / name,
                                      title=f"Gradient norm per layer {caption} (validation batches)", colours=colours)
            made.append((name, f"Per-layer gradient norm {caption}, input to output, on validation batches; the "
                               "legend gives the first convolution's norm over the last's: far below 1, the gradient "
                               "vanishes on its way to the input; far above 1, it explodes."))
    return made


SPEC = register_study(StudySpec(
    name="remedies", title="Remedies for the deep plain net: smaller batch, gradient clipping, L2 penalty",
    summary="the articles' fixes for vanishing/exploding gradients on plain-D, beside ResNet-D, with gradient norms",
    presets=PRESETS, arms=arms, claims=claims, figures=figures, group_order=ArmOrder(ARMS, "net"),
    label_columns=("net", "depth"), default_options={"depth": 32}, option_help={"depth": "the one depth of every net, 6n+2"}, setup_note="depth {depth}",
    paper_budget=PAPER_BUDGET, paper_numbers=PAPER_NUMBERS,
    measured={"quick": "6.3 min on a 2-core AVX512-BF16 AMD EPYC (fp32 forced, --jobs 2)"}))
