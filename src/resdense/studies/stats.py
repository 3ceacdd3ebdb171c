"""Claims decided with their uncertainty over seeds.

A claim is a contrast: a weighted sum of group means (``plain56 - plain20``, or a difference of
differences), with the sign the article predicts. Its estimate comes with a standard error over
seeds and a 90% two-sided Student-t interval, and the claim is decided three ways:

* **reproduced** — the interval lies entirely on the predicted side of zero;
* **not reproduced** — it lies entirely on the other side (the data contradict the claim);
* **inconclusive** — it contains zero: the budget (seeds, steps) is too small to tell.

A claim predicts a direction, so each decision is a one-sided t test at the 5% level (in the
predicted direction for *reproduced*, in the other for *not reproduced*): together, the 90%
two-sided interval. A study's decided claims are then controlled together (:func:`holm`:
Holm–Bonferroni at a family-wise 5% over their one-sided p-values); a claim keeps its unadjusted
interval and its decision alone beside the controlled decision, and control only ever turns a
decision into *inconclusive*, never the reverse.

Seeds pair the groups: the runs of one seed share the training subset, the data order and the
augmentation stream, so where every group of a claim has the same seeds the contrast is computed
per seed and its spread is the between-seed spread of that contrast (a paired design). Otherwise
the groups are taken as independent (Welch's standard error and Welch-Satterthwaite degrees of
freedom).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

from .budget import decided_at

CONFIDENCE = 0.90  # two-sided: a one-sided 5% test in each direction
FAMILY_ALPHA = 0.05  # Holm–Bonferroni: the chance of any wrong decision among a study's claims
# A decision (Verdict.decision) in words; the summary line writes them in capitals.
DECISION_WORDS = {"reproduced": "reproduced", "not_reproduced": "NOT reproduced", "inconclusive": "inconclusive"}

# Quantiles t_{0.95, df} of Student's t; between table rows the lower df is used, which widens
# the interval (conservative).
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812,
        11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740, 18: 1.734, 19: 1.729,
        20: 1.725, 22: 1.717, 24: 1.711, 26: 1.706, 28: 1.701, 30: 1.697, 40: 1.684, 60: 1.671, 120: 1.658}
_Z95 = 1.645


def t_quantile(df: float) -> float:
    """t_{0.95, df} (df >= 1): the one-sided 5% critical value; the normal one beyond the table."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    if df > 120:
        return _Z95
    return _T95[max(k for k in _T95 if k <= df)]


@dataclass(frozen=True)
class Claim:
    """``sum(weight * mean(metric of group))`` is predicted to be > 0 (``sign=+1``) or < 0 (``-1``).

    ``terms`` maps a group name (e.g. ``"plain-56"``) to its weight. ``text`` is the article's
    sentence; ``contrast`` writes the difference out (``"plain-56 − plain-20"``).
    """

    id: str
    text: str
    terms: tuple[tuple[str, float], ...]
    sign: int = 1
    metric: str = "train_error"
    headline: bool = True  # part of the study's verdict (not just reported)
    label: str = ""        # the contrast written out by hand, e.g. with brackets
    # False where the budget cannot test the claim (e.g. one the paper shows only after 64k
    # iterations, at a 150-step preset): the contrast is measured and reported, never decided.
    tested: bool = True
    untested_reason: str = ""
    # The threshold the contrast is predicted to clear, in points (0: a plain sign). A margin
    # makes a non-inferiority claim: "B is at most 1 point worse than A" is ``B − A < +1``.
    margin: float = 0.0

    @property
    def predicted(self) -> str:
        return f"{'>' if self.sign > 0 else '<'} {self.margin:+g}" if self.margin else ("> 0" if self.sign > 0 else "< 0")

    @property
    def contrast(self) -> str:
        if self.label:
            return self.label
        parts = []
        for i, (group, w) in enumerate(self.terms):
            op = ("" if w > 0 else "−") if i == 0 else (" + " if w > 0 else " − ")
            parts.append(f"{op}{'' if abs(w) == 1 else f'{abs(w):g}×'}{group}")
        return "".join(parts)


@dataclass
class Verdict:
    """A claim's estimate and decision (errors in points of percent where the metric is an error)."""

    claim: str
    text: str
    contrast: str
    metric: str
    predicted: str          # "> 0" or "< 0"
    difference: Optional[float]
    stderr: Optional[float]
    n_seeds: int
    df: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]
    method: str
    decision: str
    reason: str
    headline: bool = True
    per_seed: dict[str, float] = field(default_factory=dict)
    threshold: float = 0.0  # the margin the contrast is compared with (0: a plain sign)
    # One-sided p-value of the t statistic (difference − threshold) / stderr, in the direction
    # the estimate points (None without an uncertainty); the study's Holm control reads it.
    p_value: Optional[float] = None
    # Filled in by the study's Holm control (:func:`holm`): the decision this claim gets alone,
    # its Holm-adjusted p-value and the level its rank faced, among ``family`` decided claims.
    decision_alone: str = ""
    p_holm: Optional[float] = None
    holm_level: Optional[float] = None
    family: int = 1
    # Filled in by the report: the budget the claim was decided at, and the paper's.
    budget: dict[str, Any] = field(default_factory=dict)
    paper_budget: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(x: float) -> str:
    return f"{x:+.2f}"


def decide(claim: Claim, values: Mapping[str, Mapping[int, float]], scale: float = 100.0) -> Verdict:
    """Decide ``claim`` from ``values[group][seed]`` (fractions; reported ×``scale``, i.e. points)."""
    predicted = claim.predicted
    m = claim.margin
    base = dict(claim=claim.id, text=claim.text, contrast=claim.contrast, metric=claim.metric,
                predicted=predicted, headline=claim.headline, threshold=m)
    missing = [g for g, _ in claim.terms if not values.get(g)]
    if missing:
        return Verdict(**base, difference=None, stderr=None, n_seeds=0, df=None, ci_low=None, ci_high=None,
                       method="none", decision="inconclusive",
                       reason=f"no finished runs of {', '.join(missing)} yet")
    seed_sets = [set(values[g]) for g, _ in claim.terms]
    common = set.intersection(*seed_sets)
    paired = all(s == common for s in seed_sets) and len(common) >= 2
    per_seed: dict[str, float] = {}
    if paired:
        seeds = sorted(common)
        contrasts = [scale * sum(w * values[g][s] for g, w in claim.terms) for s in seeds]
        per_seed = {str(s): c for s, c in zip(seeds, contrasts)}
        n = len(seeds)
        diff = statistics.fmean(contrasts)
        se = statistics.stdev(contrasts) / math.sqrt(n)
        df: Optional[float] = n - 1
        method = f"paired by seed, t interval ({n - 1} df)"
    else:
        groups = {g: [scale * v for v in values[g].values()] for g, _ in claim.terms}
        n = min(len(v) for v in groups.values())
        diff = sum(w * statistics.fmean(groups[g]) for g, w in claim.terms)
        if n < 2:
            return Verdict(**base, difference=diff, stderr=None, n_seeds=n, df=None, ci_low=None, ci_high=None,
                           method="one seed", decision="inconclusive",
                           reason="one seed gives no uncertainty: run 3 or more seeds (--seeds 0,1,2)")
        parts = [(w * w * statistics.variance(groups[g]) / len(groups[g]), len(groups[g])) for g, w in claim.terms]
        var = sum(p for p, _ in parts)
        se = math.sqrt(var)
        denom = sum(p * p / (k - 1) for p, k in parts)
        df = var * var / denom if denom > 0 else float(n - 1)
        method = f"independent groups, Welch t interval ({df:.1f} df)"
    if se == 0.0:
        # Identical contrasts on every seed: no spread to measure, so no interval to trust.
        return Verdict(**base, difference=diff, stderr=0.0, n_seeds=n, df=df, ci_low=diff, ci_high=diff,
                       method=method, decision="inconclusive", per_seed=per_seed,
                       reason="no spread between seeds (identical runs?): the uncertainty cannot be estimated")
    half = t_quantile(df) * se
    lo, hi = diff - half, diff + half
    p_value = t_sf(abs(diff - m) / se, df)
    on_side = (lo > m) if claim.sign > 0 else (hi < m)
    against = (hi < m) if claim.sign > 0 else (lo > m)
    interval = f"90% interval [{_fmt(lo)}, {_fmt(hi)}]"
    mark = f"{m:+g}" if m else "0"
    if on_side:
        decision, reason = "reproduced", f"{interval} excludes {mark} on the predicted side ({predicted})"
    elif against:
        decision, reason = "not_reproduced", f"{interval} excludes {mark} on the other side: the data contradict {predicted}"
    else:
        decision, reason = "inconclusive", f"{interval} includes {mark}: {budget_hint(diff - m, se, n)}"
    return Verdict(**base, difference=diff, stderr=se, n_seeds=n, df=df, ci_low=lo, ci_high=hi, method=method,
                   decision=decision, reason=reason, per_seed=per_seed, p_value=p_value)


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    out = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            out *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return out


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast only below its mean; above it, the symmetry I_x(a,b) = 1 − I_{1−x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - front * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (> 0, fractional allowed) degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_critical(alpha: float, df: float) -> float:
    """t such that P(T > t) = ``alpha`` (0 < alpha < 0.5), by bisection on :func:`t_sf`."""
    lo, hi = 0.0, 1e4
    for _ in range(64):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_sf(mid, df) > alpha else (lo, mid)
    return hi


def budget_hint(diff: float, se: float, n: int, alpha: float = 1 - (1 + CONFIDENCE) / 2) -> str:
    """What budget would decide a contrast ``diff`` away from its threshold at this spread: the
    seeds it would take (the standard error shrinks as 1/sqrt(seeds)) for a one-sided test at
    level ``alpha`` (5% alone; the level its rank faces under the study's Holm control)."""
    if abs(diff) < 1e-9:
        return "the difference sits on its threshold at this budget; a longer training budget (more steps, --preset paper) is needed"
    crits: dict[int, float] = {}  # past 200 df the quantile is the normal one to three digits: computed once
    for need in range(n + 1, 1000):
        df = min(need - 1, 200)
        if df not in crits:
            crits[df] = t_quantile(df) if abs(alpha - 0.05) < 1e-12 else t_critical(alpha, df)
        if crits[df] * se * math.sqrt(n / need) < abs(diff):
            return (f"at this spread about {need} seeds would decide a difference of {abs(diff):.2f} points, "
                    "or a longer training budget (more steps, --preset paper) may widen it")
    return "the difference is far inside the noise; a longer training budget (--preset paper) is needed"


def decide_all(claims: Sequence[Claim], values_by_metric: Mapping[str, Mapping[str, Mapping[int, float]]],
               alpha: float = FAMILY_ALPHA) -> list[Verdict]:
    """Decide every claim alone, then control them together (:func:`holm`)."""
    return holm([decide(c, values_by_metric.get(c.metric, {})) for c in claims], alpha)


def _p_or_one(v: Verdict) -> float:
    return 1.0 if v.p_value is None else v.p_value


def holm(vs: Sequence[Verdict], alpha: float = FAMILY_ALPHA) -> list[Verdict]:
    """Holm–Bonferroni over one study's decided claims at family-wise level ``alpha``.

    Each claim's p-value is one-sided in the direction its estimate points (towards
    *reproduced* or *not reproduced*). Sorted ascending, the r-th smallest (r = 1..k) is tested at
    ``alpha / (k − r + 1)``, stopping at the first that fails. A claim stays decided only where it
    was decided alone *and* passes its Holm level; otherwise it becomes inconclusive. A claim
    without an uncertainty counts in the family with p = 1. Returns new verdicts, in order."""
    k = len(vs)
    order = sorted(range(k), key=[_p_or_one(v) for v in vs].__getitem__)
    out: list[Optional[Verdict]] = [None] * k
    passing, adjusted = True, 0.0
    for rank, i in enumerate(order):
        v, p = vs[i], _p_or_one(vs[i])
        level = alpha / (k - rank)
        passing = passing and p < level
        adjusted = max(adjusted, min(1.0, (k - rank) * p))
        decision, reason = v.decision, v.reason
        if v.decision != "inconclusive" and not passing:
            decision = "inconclusive"
            reason = (f"alone, {v.reason}; under the study's Holm control (rank {rank + 1} of {k} claims) it needs a "
                      f"one-sided p below {level:.4f} and has {p:.4f}: "
                      + budget_hint(v.difference - v.threshold, v.stderr, v.n_seeds, level))
        elif v.decision != "inconclusive":
            reason = f"{v.reason}; holds under the study's Holm control (p = {p:.4f} < {level:.4f}, rank {rank + 1} of {k})"
        elif v.p_value is not None and v.stderr:
            # Alone it is already undecided; what would decide it is judged at the level its rank faces.
            reason = (v.reason.split(": ")[0] + ": " + budget_hint(v.difference - v.threshold, v.stderr, v.n_seeds, level)
                      + f" (one-sided p = {p:.4f}; Holm level {level:.4f}, rank {rank + 1} of {k})")
        out[i] = replace(v, decision=decision, reason=reason, decision_alone=v.decision,
                         p_holm=None if v.p_value is None else adjusted, holm_level=level, family=k)
    return [v for v in out if v is not None]


def measure(claim: Claim, values: Mapping[str, Mapping[int, float]]) -> dict[str, Any]:
    """An untested claim's contrast: the estimate and its uncertainty, with no decision."""
    v = decide(claim, values)
    keep = ("claim", "text", "contrast", "metric", "difference", "stderr", "n_seeds", "df", "ci_low", "ci_high",
            "method", "per_seed")
    return {**{k: getattr(v, k) for k in keep}, "why_not_decided": claim.untested_reason}


def summary_line(v: Verdict) -> str:
    """'plain-56 − plain-20 = +18.70 ± 2.10 points (3 seeds; predicted > 0): REPRODUCED at 150 steps × 64 on
    1,000 images (10 epochs) (paper: 64,000 × 128 on 45,000 CIFAR-10 images) — reason'."""
    if v.difference is None:
        return f"{v.contrast}: no data yet — {decided_at(v.decision, v.budget, v.paper_budget)}"
    unc = f" ± {v.stderr:.2f}" if v.stderr is not None else ""
    word = decided_at(DECISION_WORDS[v.decision].upper(), v.budget, v.paper_budget)
    return (f"{v.contrast} = {v.difference:+.2f}{unc} points ({v.n_seeds} seed{'s' if v.n_seeds != 1 else ''}; "
            f"predicted {v.predicted}): {word} — {v.reason}")
