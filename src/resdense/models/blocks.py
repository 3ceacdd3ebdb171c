"""Residual blocks and the one interface every analysis reads them through.

A residual block (He et al. 2015) computes ``post(F(pre(x)) + shortcut(x))``:

* ``pre`` is the identity for the original (post-activation) blocks and BN-ReLU for the
  pre-activation blocks of He et al. 2016, whose ``post`` is the identity instead of a ReLU;
* ``F`` is the residual branch (two 3x3 convolutions, or a 1x1-3x3-1x1 bottleneck);
* ``shortcut`` is the identity, a zero-padding subsample (option A) or a projection (B, C);
  a plain twin's block (``shortcut="none"``) has none and computes ``post(F(pre(x)))``.

:class:`ResidualBlock` writes the forward pass, the shortcut path, the lesioned block and the
zero-init once; a block only builds its layers and says what its branch computes. Module names
follow torchvision (``conv1, bn1, ..., downsample``), so its ``state_dict`` loads strictly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .layers import ActLayer, NormLayer, conv1x1, conv3x3, make_act, make_shortcut, resolve_norm


class ResidualBlock(nn.Module):
    """The block interface: what lesions, gradient flow, layer responses and zero-init use.

    Attributes:
        expansion: output channels per ``planes`` (1 basic, 4 bottleneck).
        preact: True for pre-activation blocks (BN-ReLU before each convolution, nothing
            after the addition); their 3x3 outputs are not followed by a BN of their own.
        use_shortcut: whether the shortcut is added (False in a plain twin).
        downsample: the shortcut's module (zero-pad or projection), or None for the identity.
        drop_rate: dropout on the input of the branch's last convolution (Wide ResNet); 0: none.

    Subclasses build ``relu`` (and ``bn1`` when pre-activated), set the attributes above
    through :meth:`_init_shortcut`, and implement :meth:`branch` and :meth:`branch_end`.
    """

    expansion = 1
    preact = False
    drop_rate = 0.0
    use_shortcut: bool
    downsample: Optional[nn.Module]
    relu: nn.Module

    def _init_shortcut(self, kind: str, in_chs: int, out_chs: int, stride: int,
                       norm_layer: Optional[NormLayer], drop_rate: float) -> None:
        if not 0 <= drop_rate < 1:
            raise ConfigError(f"block drop_rate must be in [0, 1); got {drop_rate}")
        self.drop_rate = float(drop_rate)
        self.downsample, self.use_shortcut = make_shortcut(kind, in_chs, out_chs, stride, norm_layer)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """What the branch (and a projection shortcut) reads: the block input itself here."""
        return x

    def post_activation(self, out: torch.Tensor) -> torch.Tensor:
        """What follows the addition: a ReLU here."""
        return self.relu(out)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        """The residual function F on the pre-activated input."""
        raise NotImplementedError

    def branch_end(self) -> tuple[nn.Conv2d, Optional[nn.Module]]:
        """The branch's last convolution and the norm right after it (None where there is none)."""
        raise NotImplementedError

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.drop_rate, self.training) if self.drop_rate > 0 else x

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """F(x): the residual branch alone, on the block input."""
        return self.branch(self.pre_activation(x))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path alone, on the block input (what a plain block would add if it added)."""
        return x if self.downsample is None else self.downsample(self.pre_activation(x))

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch deleted (a lesion, Veit et al. 2016)."""
        return self.post_activation(self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pre is computed once and shared: a pre-activation's BN must update its statistics once.
        pre = self.pre_activation(x)
        out = self.branch(pre)
        if self.use_shortcut:
            # Out of place: hooks that keep the branch's last output (layer responses) must see it unsummed.
            out = out + (x if self.downsample is None else self.downsample(pre))
        return self.post_activation(out)

    def zero_init_last(self) -> None:
        """Start the branch at zero, so the block starts as its shortcut (Goyal et al. 2017).

        The last norm's scale is zeroed, or the last convolution where no norm follows it
        (pre-activation blocks, ``norm_layer="none"``)."""
        if not self.use_shortcut:  # a plain net with a zeroed branch would pass no signal at all
            return
        conv, norm = self.branch_end()
        scale = getattr(norm, "weight", None)
        nn.init.zeros_(scale if isinstance(scale, torch.Tensor) else conv.weight)


class PreActBlock(ResidualBlock):
    """A pre-activation block (He et al. 2016): BN-ReLU first, nothing after the addition, so
    the identity path is clean. A projection shortcut sees the pre-activated input."""

    preact = True
    bn1: nn.Module

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """BN-ReLU of the block input."""
        return self.relu(self.bn1(x))

    def post_activation(self, out: torch.Tensor) -> torch.Tensor:
        """Nothing: the sum is the block's output."""
        return out


def _strides(stride: int, stride_in_1x1: bool) -> tuple[int, int]:
    """(1x1 stride, 3x3 stride) of a bottleneck: on the 3x3 (torchvision, "v1.5") or the first 1x1 (the paper)."""
    return (stride, 1) if stride_in_1x1 else (1, stride)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions; ``relu(F(x) + shortcut(x))``. ``stride_in_1x1`` is accepted and
    ignored (it places a bottleneck's stride), so every block takes the same settings."""

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: Optional[NormLayer] = None, act_layer: Optional[ActLayer] = None,
                 stride_in_1x1: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        norm_layer = resolve_norm(norm_layer)
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = make_act(act_layer or nn.ReLU)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self._init_shortcut(shortcut, in_chs, planes, stride, norm_layer, drop_rate)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.relu(self.bn1(self.conv1(pre))))
        return self.bn2(self.conv2(out))

    def branch_end(self) -> tuple[nn.Conv2d, Optional[nn.Module]]:
        return self.conv2, self.bn2


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand (x4). The stride sits on the 3x3 (torchvision, "v1.5") or,
    with ``stride_in_1x1``, on the first 1x1 as in the paper ("v1")."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: Optional[NormLayer] = None, act_layer: Optional[ActLayer] = None,
                 stride_in_1x1: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        norm_layer = resolve_norm(norm_layer)
        out_chs = planes * self.expansion
        s1, s3 = _strides(stride, stride_in_1x1)
        self.conv1 = conv1x1(in_chs, planes, s1)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_chs)
        self.bn3 = norm_layer(out_chs)
        self.relu = make_act(act_layer or nn.ReLU)
        self._init_shortcut(shortcut, in_chs, out_chs, stride, norm_layer, drop_rate)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(pre)))
        out = self.dropout(self.relu(self.bn2(self.conv2(out))))
        return self.bn3(self.conv3(out))

    def branch_end(self) -> tuple[nn.Conv2d, Optional[nn.Module]]:
        return self.conv3, self.bn3


class PreActBasicBlock(PreActBlock):
    """BN-ReLU-conv twice; ``F(x) + shortcut(x)`` with nothing after the addition."""

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: Optional[NormLayer] = None, act_layer: Optional[ActLayer] = None,
                 stride_in_1x1: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        norm_layer = resolve_norm(norm_layer)
        self.bn1 = norm_layer(in_chs)
        self.relu = make_act(act_layer or nn.ReLU)
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        # A bare 1x1 projection: the input it sees is already normalised.
        self._init_shortcut(shortcut, in_chs, planes, stride, None, drop_rate)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))

    def branch_end(self) -> tuple[nn.Conv2d, Optional[nn.Module]]:
        return self.conv2, None


class PreActBottleneck(PreActBlock):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (x4), clean identity."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B",
                 norm_layer: Optional[NormLayer] = None, act_layer: Optional[ActLayer] = None,
                 stride_in_1x1: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        norm_layer = resolve_norm(norm_layer)
        out_chs = planes * self.expansion
        s1, s3 = _strides(stride, stride_in_1x1)
        self.bn1 = norm_layer(in_chs)
        self.relu = make_act(act_layer or nn.ReLU)
        self.conv1 = conv1x1(in_chs, planes, s1)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_chs)
        self._init_shortcut(shortcut, in_chs, out_chs, stride, None, drop_rate)

    def branch(self, pre: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.conv1(pre)))
        out = self.dropout(self.relu(self.bn3(self.conv2(out))))
        return self.conv3(out)

    def branch_end(self) -> tuple[nn.Conv2d, Optional[nn.Module]]:
        return self.conv3, None


__all__ = ["BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBlock", "PreActBottleneck", "ResidualBlock"]
