"""DenseNet (Huang et al. 2017) with the memory-efficient layer of Pleiss et al. 2017.

One class builds the CIFAR nets (L, k, with or without bottleneck and compression) and the
ImageNet nets. Module names follow torchvision (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``), so its ``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from ..errors import ConfigError
from ._registry import PaperFigures, register_model
from .layers import (
    ActLayer,
    ClassifierModel,
    NormLayer,
    build_model,
    check_positive,
    init_weights,
    make_act,
    resolve_norm,
)


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Undo any buffer update (BN running statistics) made inside the block.

    A checkpointed layer runs its first composite twice in training, once forward and once
    to recompute for backward; without this the running statistics would move twice."""
    saved = [b.clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv producing ``growth_rate`` new feature maps from all earlier ones.

    With a bottleneck (``bn_size``), BN-ReLU-1x1 (``bn_size * growth_rate`` maps) comes first
    (DenseNet-B). Dropout follows every convolution, as in the paper.
    """

    def __init__(self, in_chs: int, growth_rate: int, bn_size: Optional[int], drop_rate: float,
                 memory_efficient: bool, norm_layer: NormLayer, act_layer: ActLayer) -> None:
        super().__init__()
        first_out = bn_size * growth_rate if bn_size else growth_rate
        self.norm1 = norm_layer(in_chs)
        self.relu1 = make_act(act_layer)
        self.conv1 = nn.Conv2d(in_chs, first_out, 1 if bn_size else 3, 1, 0 if bn_size else 1, bias=False)
        self.bottleneck = bool(bn_size)
        if self.bottleneck:
            self.norm2 = norm_layer(first_out)
            self.relu2 = make_act(act_layer)
            self.conv2 = nn.Conv2d(first_out, growth_rate, 3, 1, 1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def first_composite(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """concat -> BN -> ReLU -> conv1: the part whose activations grow with depth."""
        out = self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))
        return F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out

    def _layer(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        out = self.first_composite(inputs)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
            if self.drop_rate > 0:
                out = F.dropout(out, self.drop_rate, self.training)
        return out

    def _checkpointed_layer(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        # The whole layer, not only its first composite (as torchvision does): with a bottleneck
        # the 4k-channel maps between conv1 and conv2 (conv1's output, BN2's and ReLU2's) are what
        # a layer keeps for backward, several times its k output channels. Recomputing conv2 costs
        # a few percent of a step; keeping them cost densenet121 0.64x instead of 0.5x the memory.
        calls = [0]

        def run(*xs: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 1:
                return self._layer(list(xs))
            with _frozen_buffers(self):  # recomputation for backward: BN statistics must not move twice
                return self._layer(list(xs))

        # Dropout must draw the same masks when recomputed: checkpoint restores the RNG state.
        return cp.checkpoint(run, *inputs, use_reentrant=False, preserve_rng_state=True)

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if self.memory_efficient and needs_grad:
            return self._checkpointed_layer(inputs)
        return self._layer(inputs)


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of the block input and all
    earlier layers' outputs. Returns that full concatenation."""

    def __init__(self, num_layers: int, in_chs: int, growth_rate: int, **layer_kwargs) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(in_chs + i * growth_rate, growth_rate, **layer_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)  # (N, in_chs + num_layers * growth_rate, H, W)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compressing by theta), optional dropout, 2x2 average pool."""

    def __init__(self, in_chs: int, out_chs: int, drop_rate: float, norm_layer: NormLayer, act_layer: ActLayer) -> None:
        super().__init__()
        self.add_module("norm", norm_layer(in_chs))
        self.add_module("relu", make_act(act_layer))
        self.add_module("conv", nn.Conv2d(in_chs, out_chs, 1, bias=False))
        if drop_rate > 0:
            self.add_module("dropout", nn.Dropout(drop_rate))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(ClassifierModel):
    """A densely connected network built from a spec.

    Args:
        block_config: dense layers per block, e.g. ``(6, 12, 24, 16)``.
        growth_rate: k, the feature maps each layer adds.
        num_init_features: channels of the first convolution.
        bn_size: bottleneck width as a multiple of k (4 in DenseNet-B/BC); ``None`` for none.
        compression: theta; a transition keeps ``floor(theta * m)`` of its m maps.
        drop_rate: dropout after each convolution but the first.
        stem_kernel, stem_stride, stem_pool: 7/2/True (with BN-ReLU) for ImageNet; 3/1/False
            (a bare conv, since every dense layer normalises its input) for CIFAR.
        memory_efficient: recompute each whole dense layer (concat-BN-ReLU-conv, and the
            bottleneck's BN-ReLU-conv) in backward instead of storing it: memory grows linearly
            with depth; outputs, gradients and running statistics are unchanged.
    """

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: Optional[int] = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        stem_pool: bool = True,
        memory_efficient: bool = False,
        norm_layer: Optional[NormLayer] = None,
        act_layer: Optional[ActLayer] = None,
    ) -> None:
        super().__init__()
        if not block_config:
            raise ConfigError("block_config needs at least one dense block")
        for n in block_config:
            check_positive("layers per dense block", n)
        check_positive("growth_rate", growth_rate)
        check_positive("num_init_features", num_init_features)
        if not 0 < compression <= 1:
            raise ConfigError(f"compression (theta) must be in (0, 1]; got {compression}")
        if not 0 <= drop_rate < 1:
            raise ConfigError(f"drop_rate must be in [0, 1); got {drop_rate}")
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_chans = check_positive("in_chans", in_chans)
        norm_layer = resolve_norm(norm_layer)
        act_layer = act_layer or nn.ReLU

        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_chans, num_init_features, stem_kernel, stem_stride,
                                                    stem_kernel // 2, bias=False))
        if stem_pool:
            self.features.add_module("norm0", norm_layer(num_init_features))
            self.features.add_module("relu0", make_act(act_layer))
            self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))

        chs = num_init_features
        stages = []
        layer_kwargs = dict(bn_size=bn_size, drop_rate=drop_rate, memory_efficient=memory_efficient,
                            norm_layer=norm_layer, act_layer=act_layer)
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, chs, growth_rate, **layer_kwargs))
            stages.append(f"features.denseblock{i + 1}")
            chs += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_chs = int(math.floor(chs * compression))
                self.features.add_module(f"transition{i + 1}", _Transition(chs, out_chs, drop_rate, norm_layer, act_layer))
                stages.append(f"features.transition{i + 1}")
                chs = out_chs
        # torchvision's name for the last norm is norm5 with four blocks: norm{blocks + 1}.
        self.features.add_module(f"norm{len(block_config) + 1}", norm_layer(chs))
        self.final_act = make_act(act_layer)
        self.classifier = nn.Linear(chs, num_classes)
        self.stage_names = tuple(stages)
        self.head_name = "classifier"
        self.num_features = chs
        # Each transition's 2x2 pooling (no padding) halves the map and needs at least 2x2.
        self.min_input_size = stem_stride * (2 if stem_pool else 1) * 2 ** (len(block_config) - 1)
        self.memory_efficient = memory_efficient
        init_weights(self)

    def set_memory_efficient(self, enabled: bool = True) -> None:
        """Switch checkpointing on or off in every dense layer (the weights are untouched)."""
        self.memory_efficient = enabled
        for m in self.modules():
            if isinstance(m, _DenseLayer):
                m.memory_efficient = enabled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.features(x))


# --- variants --------------------------------------------------------------------------------


def _cifar(depth: int, growth_rate: int, bc: bool, settings: Mapping[str, Any]) -> DenseNet:
    """CIFAR DenseNet of depth L (three blocks): (L-4)/3 layers per block, starting with 16
    channels; with ``bc`` (DenseNet-BC), (L-4)/6 bottleneck layers per block, 2k initial
    channels and compression 0.5. ``settings`` may override the initial channels, bottleneck
    and compression, and set anything else DenseNet takes."""
    per_layer = 6 if bc else 3
    if not isinstance(depth, int) or depth < 4 + per_layer or (depth - 4) % per_layer:
        rule = "(L-4)/6 bottleneck layers" if bc else "(L-4)/3 layers"
        raise ConfigError(f"DenseNet{'-BC' if bc else ''} depth L must give a whole number of {rule} "
                          f"per block (e.g. {'100, 190, 250' if bc else '40, 100'}); got {depth}")
    n = (depth - 4) // per_layer
    defaults = dict(num_init_features=2 * growth_rate, bn_size=4, compression=0.5) if bc else \
        dict(num_init_features=16, bn_size=None, compression=1.0)
    spec = dict(block_config=(n, n, n), growth_rate=growth_rate, stem_kernel=3, stem_stride=1, stem_pool=False)
    return build_model(DenseNet, spec, settings, {"num_classes": 10, **defaults})


def densenet_cifar(depth: int = 40, growth_rate: int = 12, bc: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet of depth L and growth rate k (``bc=True`` for DenseNet-BC); see :func:`_cifar`."""
    return _cifar(depth, growth_rate, bc, kwargs)


_CIFAR = dict(input_size=(3, 32, 32), family="densenet")


def _paper(params: float, error: float) -> PaperFigures:
    return PaperFigures(params=params, error=error, error_label="C10+ test error %", source="Huang et al. 2017")


@register_model(**_CIFAR)
def cifar_densenet(depth: int = 40, growth_rate: int = 12, bc: bool = False, **kwargs) -> DenseNet:
    """CIFAR DenseNet of any depth and growth rate (``bc=True`` for DenseNet-BC)."""
    return _cifar(depth, growth_rate, bc, kwargs)


@register_model(**_CIFAR, paper=_paper(1.0e6, 5.24))
def densenet40_k12(**kwargs) -> DenseNet:
    """CIFAR DenseNet with depth 40 and growth rate 12 (no bottlenecks, no compression)."""
    return _cifar(40, 12, False, kwargs)


@register_model(**_CIFAR, paper=_paper(7.0e6, 4.10))
def densenet100_k12(**kwargs) -> DenseNet:
    """CIFAR DenseNet with depth 100 and growth rate 12 (no bottlenecks, no compression)."""
    return _cifar(100, 12, False, kwargs)


@register_model(**_CIFAR, paper=_paper(27.2e6, 3.74))
def densenet100_k24(**kwargs) -> DenseNet:
    """CIFAR DenseNet with depth 100 and growth rate 24 (no bottlenecks, no compression)."""
    return _cifar(100, 24, False, kwargs)


@register_model(**_CIFAR, paper=_paper(0.8e6, 4.51))
def densenet_bc100_k12(**kwargs) -> DenseNet:
    """CIFAR DenseNet-BC with depth 100 and growth rate 12 (bottlenecks, compression 0.5)."""
    return _cifar(100, 12, True, kwargs)


@register_model(**_CIFAR, paper=_paper(15.3e6, 3.62))
def densenet_bc250_k24(**kwargs) -> DenseNet:
    """CIFAR DenseNet-BC with depth 250 and growth rate 24 (bottlenecks, compression 0.5)."""
    return _cifar(250, 24, True, kwargs)


@register_model(**_CIFAR, paper=_paper(25.6e6, 3.46))
def densenet_bc190_k40(**kwargs) -> DenseNet:
    """CIFAR DenseNet-BC with depth 190 and growth rate 40 (bottlenecks, compression 0.5)."""
    return _cifar(190, 40, True, kwargs)


def _imagenet(block_config: Sequence[int], settings: Mapping[str, Any], **fixed: Any) -> DenseNet:
    """ImageNet DenseNet-BC (Table 1 of the paper): 7x7 stem and max-pool, four blocks, k=32 and
    64 initial channels unless ``fixed`` (or, where it does not, ``settings``) say otherwise."""
    spec = dict(block_config=tuple(block_config), **fixed)
    return build_model(DenseNet, spec, settings, {"growth_rate": 32, "num_init_features": 64})


def densenet_imagenet(block_config: Sequence[int], growth_rate: int = 32, num_init_features: int = 64,
                      **kwargs) -> DenseNet:
    """ImageNet DenseNet-BC of any block configuration (7x7 stem and max-pool)."""
    return _imagenet(block_config, kwargs, growth_rate=growth_rate, num_init_features=num_init_features)


_IMAGENET = dict(input_size=(3, 224, 224), family="densenet")


@register_model(**_IMAGENET)
def densenet121(**kwargs) -> DenseNet:
    """ImageNet DenseNet-BC-121: dense blocks of 6, 12, 24 and 16 layers, growth rate 32."""
    return _imagenet((6, 12, 24, 16), kwargs)


@register_model(**_IMAGENET)
def densenet161(**kwargs) -> DenseNet:
    """ImageNet DenseNet-BC-161: dense blocks of 6, 12, 36 and 24 layers, growth rate 48."""
    return _imagenet((6, 12, 36, 24), kwargs, growth_rate=48, num_init_features=96)


@register_model(**_IMAGENET)
def densenet169(**kwargs) -> DenseNet:
    """ImageNet DenseNet-BC-169: dense blocks of 6, 12, 32 and 32 layers, growth rate 32."""
    return _imagenet((6, 12, 32, 32), kwargs)


@register_model(**_IMAGENET)
def densenet201(**kwargs) -> DenseNet:
    """ImageNet DenseNet-BC-201: dense blocks of 6, 12, 48 and 32 layers, growth rate 32."""
    return _imagenet((6, 12, 48, 32), kwargs)


@register_model(**_IMAGENET)
def densenet264(**kwargs) -> DenseNet:
    """ImageNet DenseNet-BC-264: dense blocks of 6, 12, 64 and 48 layers, growth rate 32."""
    return _imagenet((6, 12, 64, 48), kwargs)
