"""Lesion studies (Veit, Wilber, Belongie 2016): delete blocks of a trained net at test time.

A residual block computes ``shortcut(x) + F(x)``; deleting it leaves ``shortcut(x)`` (the
block's ``forward_shortcut``, see :class:`~resdense.models.blocks.ResidualBlock`), and the net still works: most paths through a ResNet do not
go through any one block, so the error rises gently, and smoothly with the number of blocks
deleted. A plain net has only one path: a block can only be deleted where its input and
output shapes agree (it is replaced by the identity), and each deletion is catastrophic.

Lesions never change the model for good: :func:`lesioned` swaps blocks for wrappers and
puts the originals back on the way out, exceptions included.
"""

from __future__ import annotations

import contextlib
import random
import statistics
from collections.abc import Iterator as IteratorABC
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError, InputError
from ..models.blocks import ResidualBlock
from .gradients import Batch, _device_of, has_shortcuts, iter_batches, model_state


@dataclass
class BlockLesion:
    """One block deleted on its own. ``error_pct`` is ``None`` where it cannot be deleted."""

    name: str
    index: int  # 1-based position among the blocks, in depth order
    downsampling: bool  # input and output shapes differ (stride or width change)
    removable: bool
    error_pct: Optional[float]


@dataclass
class RandomLesion:
    """Mean (and std) error over ``trials`` random sets of ``k`` deleted blocks, for each k."""

    k_values: list[int]
    mean_error_pct: list[float]
    std_error_pct: list[float]
    trials: int
    seed: int
    candidates: list[str]


@dataclass
class LesionReport:
    baseline_error_pct: float
    blocks: list[BlockLesion]
    num_images: int
    has_shortcuts: bool = True
    model_name: str = ""
    random: Optional[RandomLesion] = None

    @property
    def removable_count(self) -> int:
        return sum(b.removable for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LesionReport":
        d = dict(d)
        d["blocks"] = [BlockLesion(**b) for b in d["blocks"]]
        d["random"] = None if d.get("random") is None else RandomLesion(**d["random"])
        return cls(**d)


class _Lesioned(nn.Module):
    """Stands in for a deleted block: its shortcut path, or the identity for a plain block."""

    def __init__(self, block: ResidualBlock) -> None:
        super().__init__()
        self.block = block
        # A plain block has no shortcut to fall back on: only the identity can stand in.
        self.identity = not block.use_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else self.block.forward_shortcut(x)


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """The model's residual blocks (a plain twin's included), in depth order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ResidualBlock)]


@contextlib.contextmanager
def lesioned(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Delete the named blocks for the duration of the ``with``; restore them on exit.

    A residual block is replaced by its shortcut path (``forward_shortcut``); a plain block
    (``use_shortcut`` False) by the identity, which only makes sense where its input and
    output shapes agree (:func:`lesion_blocks` checks this; here it is the caller's promise).
    """
    # Resolve every name before swapping any: a wrapper swapped in would hide the blocks below it.
    targets: list[tuple[nn.Module, str, ResidualBlock]] = []
    for name in dict.fromkeys(names):
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            block = parent.get_submodule(attr)
        except AttributeError:
            raise ConfigError(f"{type(model).__name__} has no block {name!r}; see residual_blocks(model)") from None
        if not isinstance(block, ResidualBlock):
            raise ConfigError(f"{name!r} is not a residual block; lesions apply to ResidualBlock modules")
        targets.append((parent, attr, block))
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent, attr, block in targets:
            setattr(parent, attr, _Lesioned(block))
            swapped.append((parent, attr, block))
        yield model
    finally:
        for parent, attr, block in reversed(swapped):
            setattr(parent, attr, block)


@torch.no_grad()
def _block_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input, output) shape, without the batch size, of each block for ``example[:1]``."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str):
        def record(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            shapes[name] = (tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in residual_blocks(model)]
    try:
        model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


@torch.no_grad()
def _error_pct(model: nn.Module, data: Iterable[Batch], device: torch.device) -> tuple[float, int]:
    wrong = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in iter_batches(data, device):
        wrong += (model(images).argmax(1) != labels).sum()
        total += labels.numel()
    return 100.0 * wrong.item() / total, total


@dataclass
class _Setup:
    data: Iterable[Batch]
    device: torch.device
    blocks: list[BlockLesion]


def _prepare(model: nn.Module, batches: Iterable[Batch], max_batches: Optional[int]) -> _Setup:
    """Keep the data replayable, find the blocks and which of them can be deleted."""
    device = _device_of(model)
    if isinstance(batches, IteratorABC) or max_batches is not None:
        # A one-shot iterator (or a cut-down dataset) is read once and kept: every lesion replays it.
        data: Iterable[Batch] = list(iter_batches(batches, device, max_batches))
    else:
        data = batches
    first = next(iter(iter_batches(data, device)), None)
    if first is None:
        raise InputError("no batches to evaluate lesions on: pass at least one (images, labels) batch")
    found = residual_blocks(model)
    if not found:
        raise ConfigError(f"{type(model).__name__} has no residual blocks to delete (lesions need a ResNet or its plain twin)")
    shapes = _block_shapes(model, first[0])
    blocks = []
    for i, (name, block) in enumerate(found, start=1):
        in_shape, out_shape = shapes[name]
        downsampling = in_shape != out_shape
        # A shortcut carries the signal past a deleted block; without one, only an identity
        # can stand in, and only where the shape does not change.
        removable = block.use_shortcut or not downsampling
        blocks.append(BlockLesion(name, i, downsampling, removable, None))
    return _Setup(data, device, blocks)


def _lesion_blocks(model: nn.Module, setup: _Setup) -> tuple[float, int]:
    baseline, n_images = _error_pct(model, setup.data, setup.device)
    for b in setup.blocks:
        if b.removable:
            with lesioned(model, [b.name]):
                b.error_pct = _error_pct(model, setup.data, setup.device)[0]
    return baseline, n_images


def lesion_blocks(model: nn.Module, batches: Iterable[Batch], *, max_batches: Optional[int] = None) -> LesionReport:
    """Test error with each block deleted on its own, beside the intact model's (eval mode).

    Args:
        model: a ResNet or plain net (any model built of ``ResidualBlock`` modules).
        batches: ``(images, labels)`` pairs, images float NCHW already normalised. Replayed
            once per block: a one-shot iterator is read into memory first.
        max_batches: use at most this many batches (``None``: all).
    """
    with model_state(model, training=False):
        setup = _prepare(model, batches, max_batches)
        baseline, n_images = _lesion_blocks(model, setup)
    return LesionReport(baseline, setup.blocks, n_images, has_shortcuts(model),
                        getattr(model, "model_name", type(model).__name__))


def _lesion_random(model: nn.Module, setup: _Setup, k_values: Optional[Sequence[int]], trials: int, seed: int,
                   exclude_downsampling: bool) -> RandomLesion:
    candidates = [b.name for b in setup.blocks if b.removable and not (exclude_downsampling and b.downsampling)]
    if not candidates:
        raise ConfigError("no block of this model can be deleted at random (none is removable)")
    ks = list(range(1, len(candidates) + 1)) if k_values is None else [int(k) for k in k_values]
    bad = [k for k in ks if not 1 <= k <= len(candidates)]
    if bad:
        raise ConfigError(f"k must be between 1 and {len(candidates)} (the deletable blocks); got {bad}")
    if trials < 1:
        raise ConfigError(f"trials must be at least 1; got {trials}")
    rng = random.Random(seed)  # local: the caller's global RNG state is left alone
    means, stds = [], []
    for k in ks:
        errors = []
        for _ in range(trials):
            with lesioned(model, rng.sample(candidates, k)):
                errors.append(_error_pct(model, setup.data, setup.device)[0])
        means.append(statistics.fmean(errors))
        stds.append(statistics.pstdev(errors))
    return RandomLesion(ks, means, stds, trials, seed, candidates)


def lesion_random(model: nn.Module, batches: Iterable[Batch], k_values: Optional[Sequence[int]] = None, *,
                  trials: int = 5, seed: int = 0, exclude_downsampling: bool = False,
                  max_batches: Optional[int] = None) -> RandomLesion:
    """Test error with ``k`` blocks deleted at once, chosen at random, for each ``k``.

    Blocks are drawn from the removable ones (all blocks of a residual net; the
    shape-preserving ones of a plain net), or from the non-downsampling ones with
    ``exclude_downsampling``. ``k_values`` defaults to 1..(number of candidates).
    """
    with model_state(model, training=False):
        setup = _prepare(model, batches, max_batches)
        return _lesion_random(model, setup, k_values, trials, seed, exclude_downsampling)


def lesion_study(model: nn.Module, batches: Iterable[Batch], k_values: Optional[Sequence[int]] = None, *,
                 trials: int = 5, seed: int = 0, exclude_downsampling: bool = False,
                 max_batches: Optional[int] = None) -> LesionReport:
    """:func:`lesion_blocks` and :func:`lesion_random` in one report, reading the data once."""
    with model_state(model, training=False):
        setup = _prepare(model, batches, max_batches)
        baseline, n_images = _lesion_blocks(model, setup)
        rand = _lesion_random(model, setup, k_values, trials, seed, exclude_downsampling)
    return LesionReport(baseline, setup.blocks, n_images, has_shortcuts(model),
                        getattr(model, "model_name", type(model).__name__), rand)


__all__ = ["BlockLesion", "LesionReport", "RandomLesion", "lesion_blocks", "lesion_random", "lesion_study",
           "lesioned", "residual_blocks"]
