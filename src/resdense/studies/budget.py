"""The budget a claim was decided at, the paper's budget beside it, and the paper's numbers for
the same comparison.

A claim the papers make about trained nets, decided on a budget far below theirs, holds or fails
*at this budget*: every decision is written with the budget it was taken at (steps, batch,
training images, epochs, from the runs' own results) beside the paper's (data in each study's
module, as :class:`PaperBudget`). :class:`PaperNumbers` holds the paper's table for the study's
comparison and the paper's size of each claim's effect (:class:`PaperEffect`), so the report can
say how large this budget's effect is against the paper's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

Number = Union[int, float]


@dataclass(frozen=True)
class PaperBudget:
    """What the paper trained its nets for: ``steps`` of ``batch`` images on ``images`` training
    images of ``data`` (``epochs`` = steps × batch / images), as ``source`` states it."""

    source: str
    data: str
    steps: int
    batch: int
    images: int
    epochs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PaperEffect:
    """The paper's size of one claim's effect: claim ``claim``'s contrast as the paper measured it
    (``contrast``, in its own groups), ``value`` points of ``metric`` (in words, with its source)."""

    claim: str
    contrast: str
    value: float
    metric: str


@dataclass(frozen=True)
class PaperNumbers:
    """The paper's numbers for a study's comparison: a table (``title``, ``header``, ``rows``; a
    float cell is a percentage) and the effects its claims are compared with."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[Union[str, float], ...], ...]
    effects: tuple[PaperEffect, ...] = ()

    def table(self) -> tuple[str, list[str], list[list[str]]]:
        """(title, header, rows) as the report's tables are written."""
        body = [[c if isinstance(c, str) else f"{c:.2f}" for c in row] for row in self.rows]
        return self.title, list(self.header), body


def _span(values: Sequence[Number]) -> Union[Number, list[Number], None]:
    """One value where the runs agree, [lowest, highest] where they differ, None where unknown."""
    known = sorted(set(values))
    if not known:
        return None
    return known[0] if len(known) == 1 else [known[0], known[-1]]


def _images(row: Mapping[str, Any]) -> Optional[int]:
    # Runs of an older resdense lack train_images; their subset size is the same number.
    return row.get("train_images") or row.get("config", {}).get("train_subset")


def _epochs(row: Mapping[str, Any]) -> Optional[Number]:
    # A row's "epochs" is its per-epoch metrics: their count is the epochs it trained.
    trained = row.get("epochs")
    return len(trained) if isinstance(trained, list) and trained else row.get("config", {}).get("epochs")


def runs_budget(rows: Iterable[Mapping[str, Any]], groups: Iterable[str]) -> dict[str, Any]:
    """The budget of the finished runs of ``groups``: steps, batch, training images and epochs,
    each one number where the runs agree or [lowest, highest] where they differ (``uniform``
    says which), and the number of runs it was read from."""
    wanted = set(groups)
    picked = [r for r in rows if r.get("group") in wanted]
    fields = {"steps": [r["steps"] for r in picked if r.get("steps") is not None],
              "batch": [r["config"]["batch_size"] for r in picked if r.get("config", {}).get("batch_size")],
              "images": [n for n in map(_images, picked) if n],
              "epochs": [n for n in map(_epochs, picked) if n]}
    budget = {key: _span(values) for key, values in fields.items()}
    budget["uniform"] = not any(isinstance(v, list) for v in budget.values())
    budget["runs"] = len(picked)
    return budget


def _count(value: Any) -> str:
    if isinstance(value, list):
        return f"{value[0]:,}–{value[1]:,}"
    return "?" if value is None else f"{value:,}"


def count_of(value: Any, word: str) -> str:
    """'1 step', '150 steps', '150–620 steps'."""
    return f"{_count(value)} {word}" + ("" if value == 1 else "s")


def budget_text(budget: Mapping[str, Any]) -> str:
    """'150 steps × 64 on 1,000 images (10 epochs)'; ranges where the runs differ."""
    if not budget or not budget.get("runs"):
        return "no finished runs"
    text = f"{count_of(budget.get('steps'), 'step')} × {_count(budget.get('batch'))} on {count_of(budget.get('images'), 'image')}"
    epochs = budget.get("epochs")
    text += f" ({count_of(epochs, 'epoch')})" if epochs else ""
    return text + ("" if budget.get("uniform", True) else ", runs differ")


def paper_text(paper: Mapping[str, Any]) -> str:
    """'paper: 64,000 × 128 on 45,000 CIFAR-10 images'."""
    return (f"paper: {paper['steps']:,} × {paper['batch']:,} on {paper['images']:,} {paper['data']} images"
            if paper else "no paper budget")


def decided_at(word: str, budget: Mapping[str, Any], paper: Mapping[str, Any]) -> str:
    """A decision with the budget it was taken at beside the paper's:
    'REPRODUCED at 150 steps × 64 on 1,000 images (10 epochs) (paper: 64,000 × 128 on 45,000 CIFAR-10 images)'."""
    return f"{word} at {budget_text(budget)} ({paper_text(paper)})"


def planned_text(cfg: Any) -> str:
    """What a run's settings ask for (``study list``, before any run): '150 steps × 64 on 1,000
    images (10 epochs)'; on all training images the steps depend on the data set."""
    images = count_of(cfg.train_subset, "image") if cfg.train_subset else "all training images"
    if cfg.iterations:
        return f"{count_of(cfg.iterations, 'step')} × {cfg.batch_size:,} on {images}"
    if cfg.train_subset:
        # Every epoch drops its last partial batch.
        steps = max(cfg.epochs * (cfg.train_subset // cfg.batch_size), cfg.min_steps or 0)
        return f"{count_of(steps, 'step')} × {cfg.batch_size:,} on {images} ({count_of(cfg.epochs, 'epoch')})"
    return f"{count_of(cfg.epochs, 'epoch')} × {cfg.batch_size:,} on {images}"


def _size(here: float, paper: float) -> str:
    if abs(paper) < 1e-9 or (here > 0) != (paper > 0):
        return "the opposite sign to the paper's" if abs(paper) >= 1e-9 else "the paper's is about zero"
    return f"{here / paper:.1f} times the paper's"


def effect_sentences(numbers: Optional[PaperNumbers], decided: Sequence[Mapping[str, Any]],
                     measured: Sequence[Mapping[str, Any]], budget: str) -> list[str]:
    """One sentence per claim the paper puts a number on: this budget's effect beside the paper's.
    ``decided`` and ``measured`` are the claims' objects (as in table.json); ``budget`` in words."""
    if numbers is None:
        return []
    by_claim = {c["claim"]: c for c in [*decided, *measured]}
    out = []
    for effect in numbers.effects:
        c = by_claim.get(effect.claim)
        if c is None or c.get("difference") is None:
            continue
        out.append(f"{c['contrast']} here {c['difference']:+.2f} points of {c['metric'].replace('_', ' ')} at {budget}; "
                   f"in the paper's budget {effect.contrast} is about {effect.value:+.2f} ({effect.metric}): "
                   f"{_size(c['difference'], effect.value)}.")
    return out
