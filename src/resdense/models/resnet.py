"""ResNet (He et al. 2015), pre-activation ResNet (He et al. 2016) and their plain twins.

One class builds them all from a spec: a block type (:mod:`.blocks`), the number of blocks per
stage, the stage widths, the stem, and the shortcut kind. A plain twin is the same spec with
``shortcut="none"``. Module names follow torchvision (``conv1, bn1, layer1..4, fc`` and, in a
block, ``conv1, bn1, ..., downsample``), so its ``state_dict`` loads with ``strict=True``.

Every registered variant below is a function that passes its spec (block, blocks per stage)
and forwards the caller's settings; a setting the variant fixes or ResNet does not take is a
one-line :class:`~resdense.errors.ConfigError`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import PaperFigures, register_model
from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, ResidualBlock
from .layers import (
    ActLayer,
    ClassifierModel,
    NormLayer,
    build_model,
    check_positive,
    check_settings,
    init_weights,
    make_act,
    resolve_norm,
)

# What the builder passes to every block itself; block_kwargs may set anything else a block takes.
_BLOCK_ARGS = ("in_chs", "planes", "stride", "shortcut", "norm_layer", "act_layer", "stride_in_1x1")


class ResNet(ClassifierModel):
    """A residual (or, with ``shortcut="none"``, plain) network built from a spec.

    Args:
        block: a :class:`~resdense.models.blocks.ResidualBlock` class (``BasicBlock``,
            ``Bottleneck``, ``PreActBasicBlock``, ``PreActBottleneck``).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        widths: the width (``planes``) of each stage; a bottleneck's output is 4x this.
        stem_width: channels of the first convolution (default: ``widths[0]``).
        stem_kernel, stem_stride, stem_pool: 7/2/True for ImageNet, 3/1/False for CIFAR.
        shortcut: ``"A"``, ``"B"``, ``"C"`` or ``"none"`` (the plain twin).
        stride_in_1x1: bottlenecks only: stride on the first 1x1 (paper) instead of the 3x3.
        zero_init_last: start each residual branch at zero (off by default, as in the papers).
        drop_rate: dropout before the classifier.
        norm_layer, act_layer: injected layers (default ``BatchNorm2d`` and ``ReLU``).
        block_kwargs: further keyword settings for every block, e.g. ``{"drop_rate": 0.3}``
            (dropout inside each branch, as in a Wide ResNet).
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: Optional[int] = None,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        stem_pool: bool = True,
        shortcut: str = "B",
        stride_in_1x1: bool = False,
        zero_init_last: bool = False,
        drop_rate: float = 0.0,
        norm_layer: Optional[NormLayer] = None,
        act_layer: Optional[ActLayer] = None,
        block_kwargs: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        _check_spec(block, layers, widths, block_kwargs)
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_chans = check_positive("in_chans", in_chans)
        norm_layer = resolve_norm(norm_layer)
        act_layer = act_layer or nn.ReLU
        self.drop_rate = drop_rate
        stem_width = stem_width or widths[0]
        preact = block.preact

        self.conv1 = nn.Conv2d(in_chans, stem_width, stem_kernel, stem_stride, stem_kernel // 2, bias=False)
        # Pre-activation blocks normalise their own input, so the stem is a bare convolution.
        self.bn1 = nn.Identity() if preact else norm_layer(stem_width)
        self.relu = nn.Identity() if preact else make_act(act_layer)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()

        block_args = dict(block_kwargs or {}, shortcut=shortcut, norm_layer=norm_layer, act_layer=act_layer,
                          stride_in_1x1=stride_in_1x1)
        in_chs = self._make_stages(block, layers, widths, stem_width, block_args)
        self.num_features = in_chs
        # Pre-activation nets end with the BN-ReLU the last block left out.
        self.final_norm = norm_layer(in_chs) if preact else nn.Identity()
        self.final_act = make_act(act_layer) if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        self.head_name = "fc"
        # Every op pads or pools adaptively, so any input of at least one pixel works.
        self.min_input_size = 1
        init_weights(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()

    def _make_stages(self, block: type[ResidualBlock], layers: Sequence[int], widths: Sequence[int],
                     in_chs: int, block_args: dict[str, Any]) -> int:
        """Add ``layer1..layerN``; the first block of every stage but the first halves the map.
        Returns the channels of the last stage's output."""
        names = []
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(in_chs=in_chs, planes=planes, stride=stride, **block_args))
                in_chs = planes * block.expansion
            names.append(f"layer{i + 1}")
            self.add_module(names[-1], nn.Sequential(*blocks))
        self.stage_names = tuple(names)
        return in_chs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)


def _check_spec(block: type, layers: Sequence[int], widths: Sequence[int],
                block_kwargs: Optional[Mapping[str, Any]]) -> None:
    if not (isinstance(block, type) and issubclass(block, ResidualBlock)):
        raise ConfigError(f"block must be a ResidualBlock class (e.g. BasicBlock); got {block!r}")
    if len(layers) != len(widths) or not layers:
        raise ConfigError(f"layers {tuple(layers)} and widths {tuple(widths)} must have the same, non-zero length")
    for n in layers:
        check_positive("blocks per stage", n)
    if block_kwargs is not None and not isinstance(block_kwargs, Mapping):
        raise ConfigError(f"block_kwargs must be a mapping of block settings, e.g. {{'drop_rate': 0.3}}; got {block_kwargs!r}")
    check_settings(block, block_kwargs or {}, fixed=_BLOCK_ARGS, owner=f"block_kwargs of {block.__name__}")


# --- variants --------------------------------------------------------------------------------

_CIFAR_DEFAULTS = MappingProxyType({"num_classes": 10, "shortcut": "A"})
_IMAGENET_WIDTHS = (64, 128, 256, 512)


def _cifar(block: type[ResidualBlock], n: int, settings: Mapping[str, Any], **fixed: Any) -> ResNet:
    """A CIFAR-style ResNet (He et al. 2015, Sec. 4.2): 3x3 stem, no pooling, three stages of
    ``n`` blocks and 16/32/64 planes; 10 classes and shortcut option A unless ``settings`` say
    otherwise. ``fixed`` adds to the spec what a variant does not let a caller change."""
    spec = dict(block=block, layers=(n, n, n), widths=(16, 32, 64), stem_kernel=3, stem_stride=1,
                stem_pool=False, **fixed)
    return build_model(ResNet, spec, settings, _CIFAR_DEFAULTS)


def _imagenet(block: type[ResidualBlock], layers: Sequence[int], settings: Mapping[str, Any], **fixed: Any) -> ResNet:
    """An ImageNet-style ResNet (Table 1 of the paper): 7x7 stride-2 stem, max-pool, four stages
    of 64/128/256/512 planes, shortcut option B unless ``settings`` say otherwise."""
    spec = dict(block=block, layers=tuple(layers), widths=_IMAGENET_WIDTHS, **fixed)
    return build_model(ResNet, spec, settings)


def _cifar_depth(depth: int, bottleneck: bool, preact: bool) -> tuple[type[ResidualBlock], int]:
    """(block, blocks per stage) of a CIFAR ResNet of ``depth`` = 6n+2 (basic) or 9n+2 (bottleneck)."""
    per_block, rule = (3, "9n+2") if bottleneck else (2, "6n+2")
    if not isinstance(depth, int) or depth < per_block * 3 + 2 or (depth - 2) % (per_block * 3):
        examples = ", ".join(str(per_block * 3 * n + 2) for n in (1, 3, 6, 9))
        raise ConfigError(f"CIFAR ResNet depth must be {rule} (e.g. {examples}); got {depth}")
    blocks = ((PreActBasicBlock, PreActBottleneck) if preact else (BasicBlock, Bottleneck))
    return blocks[bottleneck], (depth - 2) // (per_block * 3)


def resnet_cifar(depth: int = 20, bottleneck: bool = False, preact: bool = False, **kwargs: Any) -> ResNet:
    """CIFAR-style ResNet of any depth: 6n+2 with basic blocks or 9n+2 with bottlenecks.
    Shortcut option A unless told otherwise."""
    return _cifar(*_cifar_depth(depth, bottleneck, preact), kwargs)


# Blocks per stage of the ImageNet nets by depth (Table 1 of He et al. 2015).
_IMAGENET_LAYERS = MappingProxyType({
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
})
_PREACT_BLOCK = MappingProxyType({BasicBlock: PreActBasicBlock, Bottleneck: PreActBottleneck})


def resnet_imagenet(depth: int = 50, preact: bool = False, **kwargs: Any) -> ResNet:
    """ImageNet-style ResNet of depth 18, 34, 50, 101 or 152 (7x7 stem, max-pool, 4 stages)."""
    if depth not in _IMAGENET_LAYERS:
        raise ConfigError(f"ImageNet ResNet depth must be one of {', '.join(map(str, _IMAGENET_LAYERS))}; got {depth}")
    block, layers = _IMAGENET_LAYERS[depth]
    return _imagenet(_PREACT_BLOCK[block] if preact else block, layers, kwargs)


_CIFAR = dict(input_size=(3, 32, 32), family="resnet")
_IMAGENET = dict(input_size=(3, 224, 224), family="resnet")
_C10 = "CIFAR-10 test error %"


def _paper(params=None, error=None, macs=None, **macs_kwargs) -> PaperFigures:
    return PaperFigures(params=params, macs=macs, macs_kwargs=macs_kwargs, error=error,
                        error_label=_C10 if error is not None else "", source="He et al. 2015")


def _paper_v1(macs: float) -> PaperFigures:
    # The paper's bottleneck FLOPs are for the stride on the first 1x1; torchvision's default puts it on the 3x3.
    return _paper(macs=macs, stride_in_1x1=True)


def _preact_paper(params: float, error: float) -> PaperFigures:
    return PaperFigures(params=params, error=error, error_label=_C10, source="He et al. 2016")


# CIFAR, any depth.

@register_model(**_CIFAR)
def cifar_resnet(depth: int = 20, bottleneck: bool = False, preact: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet of any depth 6n+2 (or 9n+2 with ``bottleneck=True``)."""
    return _cifar(*_cifar_depth(depth, bottleneck, preact), kwargs)


@register_model(**_CIFAR)
def cifar_plain(depth: int = 20, bottleneck: bool = False, preact: bool = False, **kwargs) -> ResNet:
    """Plain twin of :func:`cifar_resnet` at any depth."""
    return _cifar(*_cifar_depth(depth, bottleneck, preact), kwargs, shortcut="none")


@register_model(**_CIFAR)
def cifar_preact_resnet(depth: int = 110, bottleneck: bool = False, **kwargs) -> ResNet:
    """Pre-activation CIFAR ResNet of any depth (6n+2 basic, 9n+2 with ``bottleneck=True``);
    1x1 projections where the shape changes."""
    return _cifar(*_cifar_depth(depth, bottleneck, preact=True), {"shortcut": "B", **kwargs})


# CIFAR ResNets of the paper (Sec. 4.2, Table 6): n basic blocks per stage, depth 6n+2, option A.

@register_model(**_CIFAR, paper=_paper(0.27e6, 8.75))
def resnet20(**kwargs) -> ResNet:
    """CIFAR ResNet-20 of the paper: 3 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 3, kwargs)


@register_model(**_CIFAR, paper=_paper(0.46e6, 7.51))
def resnet32(**kwargs) -> ResNet:
    """CIFAR ResNet-32 of the paper: 5 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 5, kwargs)


@register_model(**_CIFAR, paper=_paper(0.66e6, 7.17))
def resnet44(**kwargs) -> ResNet:
    """CIFAR ResNet-44 of the paper: 7 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 7, kwargs)


@register_model(**_CIFAR, paper=_paper(0.85e6, 6.97))
def resnet56(**kwargs) -> ResNet:
    """CIFAR ResNet-56 of the paper: 9 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 9, kwargs)


@register_model(**_CIFAR, paper=_paper(1.7e6, 6.43))
def resnet110(**kwargs) -> ResNet:
    """CIFAR ResNet-110 of the paper: 18 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 18, kwargs)


@register_model(**_CIFAR, paper=_paper(19.4e6, 7.93))
def resnet1202(**kwargs) -> ResNet:
    """CIFAR ResNet-1202 of the paper: 200 basic blocks per stage, shortcut option A."""
    return _cifar(BasicBlock, 200, kwargs)


# Their plain twins: the same networks without shortcuts.

@register_model(**_CIFAR)
def plain20(**kwargs) -> ResNet:
    """Plain twin of resnet20: the same network without shortcuts."""
    return _cifar(BasicBlock, 3, kwargs, shortcut="none")


@register_model(**_CIFAR)
def plain32(**kwargs) -> ResNet:
    """Plain twin of resnet32: the same network without shortcuts."""
    return _cifar(BasicBlock, 5, kwargs, shortcut="none")


@register_model(**_CIFAR)
def plain44(**kwargs) -> ResNet:
    """Plain twin of resnet44: the same network without shortcuts."""
    return _cifar(BasicBlock, 7, kwargs, shortcut="none")


@register_model(**_CIFAR)
def plain56(**kwargs) -> ResNet:
    """Plain twin of resnet56: the same network without shortcuts."""
    return _cifar(BasicBlock, 9, kwargs, shortcut="none")


@register_model(**_CIFAR)
def plain110(**kwargs) -> ResNet:
    """Plain twin of resnet110: the same network without shortcuts."""
    return _cifar(BasicBlock, 18, kwargs, shortcut="none")


@register_model(**_CIFAR)
def plain1202(**kwargs) -> ResNet:
    """Plain twin of resnet1202: the same network without shortcuts."""
    return _cifar(BasicBlock, 200, kwargs, shortcut="none")


# Pre-activation CIFAR ResNets (He et al. 2016): 1x1 projections where the shape changes.

@register_model(**_CIFAR)
def preact_resnet110(**kwargs) -> ResNet:
    """Pre-activation CIFAR ResNet-110: 18 basic blocks per stage, 1x1 projections where the shape changes."""
    return _cifar(PreActBasicBlock, 18, {"shortcut": "B", **kwargs})


@register_model(**_CIFAR, paper=_preact_paper(1.7e6, 5.46))
def preact_resnet164(**kwargs) -> ResNet:
    """Pre-activation CIFAR ResNet-164: 18 bottleneck blocks per stage, 1x1 projections where the shape changes."""
    return _cifar(PreActBottleneck, 18, {"shortcut": "B", **kwargs})


@register_model(**_CIFAR, paper=_preact_paper(10.2e6, 4.92))
def preact_resnet1001(**kwargs) -> ResNet:
    """Pre-activation CIFAR ResNet-1001: 111 bottleneck blocks per stage, 1x1 projections where the shape changes."""
    return _cifar(PreActBottleneck, 111, {"shortcut": "B", **kwargs})


# ImageNet ResNets (Table 1 of He et al. 2015), their plain twins and pre-activation versions.

@register_model(**_IMAGENET, paper=_paper(macs=1.8e9))
def resnet18(**kwargs) -> ResNet:
    """ImageNet resnet18 (basic blocks)."""
    return _imagenet(BasicBlock, (2, 2, 2, 2), kwargs)


@register_model(**_IMAGENET, paper=_paper(macs=3.6e9))
def resnet34(**kwargs) -> ResNet:
    """ImageNet resnet34 (basic blocks)."""
    return _imagenet(BasicBlock, (3, 4, 6, 3), kwargs)


@register_model(**_IMAGENET, paper=_paper_v1(3.8e9))
def resnet50(**kwargs) -> ResNet:
    """ImageNet resnet50 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 4, 6, 3), kwargs)


@register_model(**_IMAGENET, paper=_paper_v1(7.6e9))
def resnet101(**kwargs) -> ResNet:
    """ImageNet resnet101 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 4, 23, 3), kwargs)


@register_model(**_IMAGENET, paper=_paper_v1(11.3e9))
def resnet152(**kwargs) -> ResNet:
    """ImageNet resnet152 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 8, 36, 3), kwargs)


@register_model(**_IMAGENET)
def plain18(**kwargs) -> ResNet:
    """ImageNet plain18 (basic blocks)."""
    return _imagenet(BasicBlock, (2, 2, 2, 2), kwargs, shortcut="none")


@register_model(**_IMAGENET)
def plain34(**kwargs) -> ResNet:
    """ImageNet plain34 (basic blocks)."""
    return _imagenet(BasicBlock, (3, 4, 6, 3), kwargs, shortcut="none")


@register_model(**_IMAGENET)
def plain50(**kwargs) -> ResNet:
    """ImageNet plain50 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 4, 6, 3), kwargs, shortcut="none")


@register_model(**_IMAGENET)
def plain101(**kwargs) -> ResNet:
    """ImageNet plain101 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 4, 23, 3), kwargs, shortcut="none")


@register_model(**_IMAGENET)
def plain152(**kwargs) -> ResNet:
    """ImageNet plain152 (bottleneck blocks)."""
    return _imagenet(Bottleneck, (3, 8, 36, 3), kwargs, shortcut="none")


@register_model(**_IMAGENET)
def preact_resnet18(**kwargs) -> ResNet:
    """ImageNet preact_resnet18 (basic blocks)."""
    return _imagenet(PreActBasicBlock, (2, 2, 2, 2), kwargs)


@register_model(**_IMAGENET)
def preact_resnet34(**kwargs) -> ResNet:
    """ImageNet preact_resnet34 (basic blocks)."""
    return _imagenet(PreActBasicBlock, (3, 4, 6, 3), kwargs)


@register_model(**_IMAGENET)
def preact_resnet50(**kwargs) -> ResNet:
    """ImageNet preact_resnet50 (bottleneck blocks)."""
    return _imagenet(PreActBottleneck, (3, 4, 6, 3), kwargs)


@register_model(**_IMAGENET)
def preact_resnet101(**kwargs) -> ResNet:
    """ImageNet preact_resnet101 (bottleneck blocks)."""
    return _imagenet(PreActBottleneck, (3, 4, 23, 3), kwargs)


@register_model(**_IMAGENET)
def preact_resnet152(**kwargs) -> ResNet:
    """ImageNet preact_resnet152 (bottleneck blocks)."""
    return _imagenet(PreActBottleneck, (3, 8, 36, 3), kwargs)
