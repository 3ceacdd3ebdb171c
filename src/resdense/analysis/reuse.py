"""Feature reuse in a trained DenseNet (Huang et al. 2017, Sec. 5 and Fig. 5).

Inside a dense block, layer ``l`` reads the concatenation of the block input (source 0)
and the outputs of layers 1..l-1 (sources 1..l-1). The strength of the connection from
source ``s`` to target ``l`` is the mean absolute weight of ``l``'s first convolution over
the input channels that come from ``s`` (the paper's "average absolute weight, normalised
by the number of input feature maps"). The transition layer after the block (or, after
the last block, the classifier) is one more target reading every source.

Channel ranges come from the layer structure: layer ``i`` (0-based) of a block whose input
has ``c0`` channels reads ``c0 + i * k`` channels, ``k`` the growth rate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..models.densenet import _DenseBlock, _DenseLayer

TRANSITION, CLASSIFIER = "transition", "classifier"


@dataclass
class BlockReuse:
    """The reuse matrix of one dense block.

    ``matrix[t][s]``: target ``t`` (rows 0..L-1 are layers 1..L, row L the transition or
    classifier), source ``s`` (0 the block input, s the output of layer s). A layer cannot
    read later layers, so entries with ``s > t`` are NaN (``None`` in JSON): the matrix is
    lower-triangular.
    """

    name: str
    num_layers: int
    growth_rate: int
    in_chs: int
    last_target: str  # "transition" or "classifier"
    last_target_name: str
    matrix: list[list[float]]

    def normalised(self) -> list[list[float]]:
        """Each target's row divided by its largest entry, the colour scale of Fig. 5."""
        rows = []
        for row in self.matrix:
            top = max((v for v in row if not math.isnan(v)), default=0.0)
            rows.append([v / top if top > 0 and not math.isnan(v) else v for v in row])
        return rows


@dataclass
class ReuseReport:
    blocks: list[BlockReuse]
    model_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for b in d["blocks"]:
            b["matrix"] = [[None if math.isnan(v) else v for v in row] for row in b["matrix"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReuseReport":
        blocks = []
        for b in d["blocks"]:
            b = dict(b)
            b["matrix"] = [[math.nan if v is None else v for v in row] for row in b["matrix"]]
            blocks.append(BlockReuse(**b))
        return cls(blocks, d.get("model_name", ""))


def _layer_output_chs(layer: _DenseLayer) -> int:
    return (layer.conv2 if layer.bottleneck else layer.conv1).out_channels


def _source_means(weight: torch.Tensor, in_chs: int, growth: int, sources: int) -> list[float]:
    """Mean |w| over each source's input channels, for a conv (O, I, kh, kw) or linear (O, I) weight."""
    # (O, I, ...) -> (I,): mean |w| of each input channel over outputs and kernel positions
    per_channel = weight.detach().abs().float().transpose(0, 1).flatten(1).mean(1)
    first = per_channel[:in_chs].mean()
    rest = per_channel[in_chs:in_chs + (sources - 1) * growth].view(sources - 1, growth).mean(1)
    return torch.cat([first.view(1), rest]).tolist()


def _readers_after(model: nn.Module, block_name: str, chs: int) -> Optional[tuple[str, nn.Module]]:
    """The first convolution after the block (in module order, outside it) reading all ``chs``
    channels: the transition's 1x1 conv. None after the last block."""
    past = False
    for name, m in model.named_modules():
        if name == block_name:
            past = True
        elif past and not name.startswith(block_name + ".") and isinstance(m, nn.Conv2d):
            return (name, m) if m.in_channels == chs else None
    return None


@torch.no_grad()
def feature_reuse(model: nn.Module) -> ReuseReport:
    """The Fig. 5 matrices of a DenseNet, one per dense block (see :class:`BlockReuse`)."""
    dense_blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, _DenseBlock)]
    if not dense_blocks:
        raise ConfigError(f"feature reuse needs a DenseNet; {type(model).__name__} has no dense blocks")
    head_name = getattr(model, "head_name", None)
    reports = []
    for block_name, block in dense_blocks:
        layers = list(block.values())
        in_chs = layers[0].conv1.in_channels
        growth = _layer_output_chs(layers[0])
        for i, layer in enumerate(layers):
            if layer.conv1.in_channels != in_chs + i * growth:
                raise ConfigError(f"{block_name}: layer {i + 1} reads {layer.conv1.in_channels} channels, "
                                  f"expected {in_chs} + {i} x {growth}; not a dense block")
        n = len(layers)
        out_chs = in_chs + n * growth
        nan = math.nan
        matrix = []
        for t, layer in enumerate(layers, start=1):
            # Target t reads sources 0..t-1; later layers do not exist yet for it.
            matrix.append(_source_means(layer.conv1.weight, in_chs, growth, t) + [nan] * (n + 1 - t))
        reader = _readers_after(model, block_name, out_chs)
        if reader is not None:
            last_kind, (last_name, last) = TRANSITION, reader
        elif head_name is not None and model.get_submodule(head_name).in_features == out_chs:
            last_kind, last_name, last = CLASSIFIER, head_name, model.get_submodule(head_name)
        else:
            raise ConfigError(f"{block_name}: found neither a transition nor a classifier reading its {out_chs} channels")
        matrix.append(_source_means(last.weight, in_chs, growth, n + 1))
        reports.append(BlockReuse(block_name, n, growth, in_chs, last_kind, last_name, matrix))
    return ReuseReport(reports, getattr(model, "model_name", type(model).__name__))


__all__ = ["BlockReuse", "ReuseReport", "feature_reuse"]
