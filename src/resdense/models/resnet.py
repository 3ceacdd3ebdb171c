"""ResNet (He et al. 2015), pre-activation ResNet (He et al. 2016) and their plain twins.

One class builds them all from a spec: a block type, the number of blocks per stage, the
stage widths, the stem, and the shortcut kind. A plain twin is the same spec with
``shortcut="none"``. Module names follow torchvision (``conv1, bn1, layer1..4, fc`` and, in a
block, ``conv1, bn1, ..., downsample``), so its ``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import PaperFigures, register_model
from .layers import (
    ActLayer,
    ClassifierModel,
    NormLayer,
    check_positive,
    conv1x1,
    conv3x3,
    init_weights,
    make_act,
    make_shortcut,
    resolve_norm,
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ``relu(F(x) + shortcut(x))``."""

    expansion = 1
    preact = False

    def __init__(self, in_chs: int, planes: int, stride: int, shortcut: str,
                 norm_layer: NormLayer, act_layer: ActLayer, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = make_act(act_layer)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample, self.use_shortcut = make_shortcut(shortcut, in_chs, planes, stride, norm_layer)

    def zero_init_last(self) -> None:
        if self.use_shortcut:  # a plain net with a zeroed branch would pass no signal at all
            # Without a norm layer (norm_layer="none") the branch's last conv is zeroed instead.
            nn.init.zeros_(self.bn2.weight if hasattr(self.bn2, "weight") else self.conv2.weight)

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch deleted (a lesion, Veit et al. 2016)."""
        return self.relu(x if self.downsample is None else self.downsample(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.use_shortcut:
            # Out of place: hooks that keep bn2's output (layer responses) must see it unsummed.
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4). The stride sits on the 3x3 (torchvision, "v1.5") or,
    with ``stride_in_1x1``, on the first 1x1 as in the paper ("v1")."""

    expansion = 4
    preact = False

    def __init__(self, in_chs: int, planes: int, stride: int, shortcut: str,
                 norm_layer: NormLayer, act_layer: ActLayer, stride_in_1x1: bool = False) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_chs, planes, s1)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_chs)
        self.bn3 = norm_layer(out_chs)
        self.relu = make_act(act_layer)
        self.downsample, self.use_shortcut = make_shortcut(shortcut, in_chs, out_chs, stride, norm_layer)

    def zero_init_last(self) -> None:
        if self.use_shortcut:
            nn.init.zeros_(self.bn3.weight if hasattr(self.bn3, "weight") else self.conv3.weight)

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch deleted (a lesion, Veit et al. 2016)."""
        return self.relu(x if self.downsample is None else self.downsample(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.use_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv twice; ``F(x) + shortcut(x)`` with nothing after the addition, so the
    identity path is clean (He et al. 2016). A projection sees the pre-activated input."""

    expansion = 1
    preact = True

    def __init__(self, in_chs: int, planes: int, stride: int, shortcut: str,
                 norm_layer: NormLayer, act_layer: ActLayer, stride_in_1x1: bool = False) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_chs)
        self.relu = make_act(act_layer)
        self.conv1 = conv3x3(in_chs, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample, self.use_shortcut = make_shortcut(shortcut, in_chs, planes, stride, None)

    def zero_init_last(self) -> None:
        if self.use_shortcut:
            nn.init.zeros_(self.conv2.weight)

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch deleted (a lesion, Veit et al. 2016)."""
        return x if self.downsample is None else self.downsample(self.relu(self.bn1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        if self.use_shortcut:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (x4), clean identity."""

    expansion = 4
    preact = True

    def __init__(self, in_chs: int, planes: int, stride: int, shortcut: str,
                 norm_layer: NormLayer, act_layer: ActLayer, stride_in_1x1: bool = False) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = norm_layer(in_chs)
        self.relu = make_act(act_layer)
        self.conv1 = conv1x1(in_chs, planes, s1)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, out_chs)
        self.downsample, self.use_shortcut = make_shortcut(shortcut, in_chs, out_chs, stride, None)

    def zero_init_last(self) -> None:
        if self.use_shortcut:
            nn.init.zeros_(self.conv3.weight)

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The block with its residual branch deleted (a lesion, Veit et al. 2016)."""
        return x if self.downsample is None else self.downsample(self.relu(self.bn1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.conv1(pre)))
        out = self.conv3(self.relu(self.bn3(self.conv2(out))))
        if self.use_shortcut:
            out = out + (x if self.downsample is None else self.downsample(pre))
        return out


class ResNet(ClassifierModel):
    """A residual (or, with ``shortcut="none"``, plain) network built from a spec.

    Args:
        block: a block class (``BasicBlock``, ``Bottleneck``, ``PreActBasicBlock``, ``PreActBottleneck``).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        widths: the width (``planes``) of each stage; a bottleneck's output is 4x this.
        stem_width: channels of the first convolution (default: ``widths[0]``).
        stem_kernel, stem_stride, stem_pool: 7/2/True for ImageNet, 3/1/False for CIFAR.
        shortcut: ``"A"``, ``"B"``, ``"C"`` or ``"none"`` (the plain twin).
        stride_in_1x1: bottlenecks only: stride on the first 1x1 (paper) instead of the 3x3.
        zero_init_last: start each residual branch at zero (off by default, as in the papers).
        norm_layer, act_layer: injected layers (default ``BatchNorm2d`` and ``ReLU``).
    """

    def __init__(
        self,
        block: type[nn.Module],
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
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ConfigError(f"layers {tuple(layers)} and widths {tuple(widths)} must have the same, non-zero length")
        for n in layers:
            check_positive("blocks per stage", n)
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

        in_chs = stem_width
        names = []
        for i, (n_blocks, planes) in enumerate(zip(layers, widths)):
            stage_stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_chs, planes, stage_stride if j == 0 else 1, shortcut,
                                    norm_layer, act_layer, stride_in_1x1))
                in_chs = planes * block.expansion
            names.append(f"layer{i + 1}")
            self.add_module(names[-1], nn.Sequential(*blocks))
        self.stage_names = tuple(names)
        self.num_features = in_chs
        # Pre-activation nets end with the BN-ReLU the last block left out.
        self.final_norm = norm_layer(in_chs) if preact else nn.Identity()
        self.final_act = make_act(act_layer) if preact else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        self.head_name = "fc"
        # Every op pads or pools adaptively, so any input of at least one pixel works.
        self.min_input_size = 1
        init_weights(self, zero_init_last)

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


# --- variants --------------------------------------------------------------------------------

_IMAGENET_LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
_PREACT_BLOCK = {BasicBlock: PreActBasicBlock, Bottleneck: PreActBottleneck}


def resnet_imagenet(depth: int = 50, preact: bool = False, **kwargs) -> ResNet:
    """ImageNet-style ResNet of depth 18, 34, 50, 101 or 152 (7x7 stem, max-pool, 4 stages)."""
    if depth not in _IMAGENET_LAYERS:
        raise ConfigError(f"ImageNet ResNet depth must be one of {', '.join(map(str, _IMAGENET_LAYERS))}; got {depth}")
    block, layers = _IMAGENET_LAYERS[depth]
    kwargs.setdefault("shortcut", "B")
    return ResNet(_PREACT_BLOCK[block] if preact else block, layers, (64, 128, 256, 512), **kwargs)


def _cifar_blocks(depth: int, per_block: int, rule: str) -> int:
    if not isinstance(depth, int) or depth < per_block * 3 + 2 or (depth - 2) % (per_block * 3):
        examples = ", ".join(str(per_block * 3 * n + 2) for n in (1, 3, 6, 9))
        raise ConfigError(f"CIFAR ResNet depth must be {rule} (e.g. {examples}); got {depth}")
    return (depth - 2) // (per_block * 3)


def resnet_cifar(depth: int = 20, bottleneck: bool = False, preact: bool = False, **kwargs) -> ResNet:
    """CIFAR-style ResNet (He et al. 2015, Sec. 4.2): 3x3 stem, three stages of 16/32/64, depth
    6n+2 with basic blocks or 9n+2 with bottlenecks. Shortcut option A unless told otherwise."""
    per_block, rule = (3, "9n+2") if bottleneck else (2, "6n+2")
    n = _cifar_blocks(depth, per_block, rule)
    block = (PreActBottleneck if preact else Bottleneck) if bottleneck else (PreActBasicBlock if preact else BasicBlock)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("shortcut", "A")
    return ResNet(block, (n, n, n), (16, 32, 64), stem_kernel=3, stem_stride=1, stem_pool=False, **kwargs)


_CIFAR = dict(input_size=(3, 32, 32), family="resnet")
_C10 = "CIFAR-10 test error %"


def _paper(params=None, error=None, macs=None, **macs_kwargs) -> PaperFigures:
    return PaperFigures(params=params, macs=macs, macs_kwargs=macs_kwargs, error=error,
                        error_label=_C10 if error is not None else "", source="He et al. 2015")


@register_model(**_CIFAR)
def cifar_resnet(depth: int = 20, **kwargs) -> ResNet:
    """CIFAR ResNet of any depth 6n+2 (or 9n+2 with ``bottleneck=True``)."""
    return resnet_cifar(depth, **kwargs)


@register_model(**_CIFAR)
def cifar_plain(depth: int = 20, **kwargs) -> ResNet:
    """Plain twin of :func:`cifar_resnet` at any depth."""
    return resnet_cifar(depth, shortcut="none", **kwargs)


@register_model(**_CIFAR, paper=_paper(0.27e6, 8.75))
def resnet20(**kwargs) -> ResNet:
    return resnet_cifar(20, **kwargs)


@register_model(**_CIFAR, paper=_paper(0.46e6, 7.51))
def resnet32(**kwargs) -> ResNet:
    return resnet_cifar(32, **kwargs)


@register_model(**_CIFAR, paper=_paper(0.66e6, 7.17))
def resnet44(**kwargs) -> ResNet:
    return resnet_cifar(44, **kwargs)


@register_model(**_CIFAR, paper=_paper(0.85e6, 6.97))
def resnet56(**kwargs) -> ResNet:
    return resnet_cifar(56, **kwargs)


@register_model(**_CIFAR, paper=_paper(1.7e6, 6.43))
def resnet110(**kwargs) -> ResNet:
    return resnet_cifar(110, **kwargs)


@register_model(**_CIFAR, paper=_paper(19.4e6, 7.93))
def resnet1202(**kwargs) -> ResNet:
    return resnet_cifar(1202, **kwargs)


def _register_cifar_plain(depth: int) -> None:
    def fn(**kwargs) -> ResNet:
        return resnet_cifar(depth, shortcut="none", **kwargs)

    fn.__name__ = fn.__qualname__ = f"plain{depth}"
    fn.__doc__ = f"Plain twin of resnet{depth}: the same network without shortcuts."
    globals()[fn.__name__] = register_model(**_CIFAR)(fn)


for _d in (20, 32, 44, 56, 110, 1202):
    _register_cifar_plain(_d)


def _register_imagenet(depth: int, macs: float) -> None:
    """resnetD, plainD and preact_resnetD for an ImageNet depth (Table 1 of the paper)."""
    bottleneck = _IMAGENET_LAYERS[depth][0] is Bottleneck
    # The paper's FLOPs are for stride on the first 1x1; torchvision's default puts it on the 3x3.
    paper = _paper(macs=macs, **({"stride_in_1x1": True} if bottleneck else {}))
    variants = {
        f"resnet{depth}": (dict(), paper),
        f"plain{depth}": (dict(shortcut="none"), None),
        f"preact_resnet{depth}": (dict(preact=True), None),
    }
    for name, (fixed, figures) in variants.items():
        def fn(_fixed=fixed, **kwargs) -> ResNet:
            return resnet_imagenet(depth, **_fixed, **kwargs)

        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = f"ImageNet {name} ({'bottleneck' if bottleneck else 'basic'} blocks)."
        globals()[name] = register_model(input_size=(3, 224, 224), paper=figures, family="resnet")(fn)


for _d, _macs in ((18, 1.8e9), (34, 3.6e9), (50, 3.8e9), (101, 7.6e9), (152, 11.3e9)):
    _register_imagenet(_d, _macs)


@register_model(**_CIFAR)
def cifar_preact_resnet(depth: int = 110, **kwargs) -> ResNet:
    """Pre-activation CIFAR ResNet of any depth (6n+2 basic, 9n+2 with ``bottleneck=True``);
    1x1 projections where the shape changes."""
    kwargs.setdefault("shortcut", "B")
    return resnet_cifar(depth, preact=True, **kwargs)


@register_model(**_CIFAR)
def preact_resnet110(**kwargs) -> ResNet:
    return cifar_preact_resnet(110, **kwargs)


@register_model(**_CIFAR, paper=PaperFigures(params=1.7e6, error=5.46, error_label=_C10, source="He et al. 2016"))
def preact_resnet164(**kwargs) -> ResNet:
    return cifar_preact_resnet(164, bottleneck=True, **kwargs)


@register_model(**_CIFAR, paper=PaperFigures(params=10.2e6, error=4.92, error_label=_C10, source="He et al. 2016"))
def preact_resnet1001(**kwargs) -> ResNet:
    return cifar_preact_resnet(1001, bottleneck=True, **kwargs)
