"""VGG with batch norm (Simonyan & Zisserman 2015), the baseline of the ResNet paper's Fig. 3.

Module names follow torchvision's ``vgg19_bn`` (``features.N``, ``classifier.0/3/6``). The
ImageNet head is torchvision's (7x7 adaptive pool, two 4096-wide layers with dropout); the
CIFAR head is the usual single linear layer on globally pooled 512 features.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import ConfigError
from ._registry import PaperFigures, register_model
from .layers import ActLayer, ClassifierModel, NormLayer, build_model, check_positive, init_weights, make_act, resolve_norm

# Stage widths and convolutions per stage for each depth ("M" ends a stage with a 2x2 max-pool).
_CONFIGS = {
    11: ((64, 1), (128, 1), (256, 2), (512, 2), (512, 2)),
    13: ((64, 2), (128, 2), (256, 2), (512, 2), (512, 2)),
    16: ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)),
    19: ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4)),
}


class VGG(ClassifierModel):
    """VGG-D/E style network: stages of 3x3 conv-BN-ReLU separated by 2x2 max-pools.

    Args:
        depth: 11, 13, 16 or 19 weight layers.
        head: ``"imagenet"`` (7x7 pool, 4096-4096-classes with dropout) or ``"cifar"``
            (global pool, one linear layer).
    """

    def __init__(self, depth: int = 19, num_classes: int = 1000, in_chans: int = 3, head: str = "imagenet",
                 drop_rate: float = 0.5, norm_layer: Optional[NormLayer] = None,
                 act_layer: Optional[ActLayer] = None) -> None:
        super().__init__()
        if depth not in _CONFIGS:
            raise ConfigError(f"VGG depth must be one of {', '.join(map(str, _CONFIGS))}; got {depth}")
        heads = ("imagenet", "cifar")
        if head not in heads:
            raise ConfigError(f"VGG head must be one of {', '.join(heads)}; got {head!r}")
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_chans = check_positive("in_chans", in_chans)
        norm_layer = resolve_norm(norm_layer)
        act_layer = act_layer or nn.ReLU

        layers: list[nn.Module] = []
        stages = []
        chs = in_chans
        for width, n_convs in _CONFIGS[depth]:
            for _ in range(n_convs):
                layers += [nn.Conv2d(chs, width, 3, padding=1), norm_layer(width), make_act(act_layer)]
                chs = width
            layers.append(nn.MaxPool2d(2, 2))
            stages.append(f"features.{len(layers) - 1}")  # a stage ends at its pool
        self.features = nn.Sequential(*layers)
        self.stage_names = tuple(stages)
        self.num_features = chs
        self.head = head
        self.min_input_size = 2 ** len(_CONFIGS[depth])
        if head == "imagenet":
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(chs * 7 * 7, 4096), make_act(act_layer), nn.Dropout(drop_rate),
                nn.Linear(4096, 4096), make_act(act_layer), nn.Dropout(drop_rate),
                nn.Linear(4096, num_classes),
            )
            self.head_name = "classifier.6"
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(chs, num_classes)
            self.head_name = "classifier"
        init_weights(self)
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):  # torchvision's VGG head init
                nn.init.normal_(m.weight, 0, 0.01)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        if isinstance(self.classifier, nn.Sequential):
            x = self.classifier[:-1](x)  # pre-logits: the input of the last linear layer
        return x if pre_logits else self.get_submodule(self.head_name)(x)


@register_model(input_size=(3, 224, 224), family="vgg",
                paper=PaperFigures(macs=19.6e9, source="He et al. 2015, Fig. 3"))
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with batch norm and torchvision's ImageNet head."""
    return build_model(VGG, {"depth": 19}, kwargs)


@register_model(input_size=(3, 32, 32), family="vgg")
def cifar_vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with batch norm and a CIFAR head (global pool, one linear layer)."""
    return build_model(VGG, {"depth": 19, "head": "cifar"}, kwargs, {"num_classes": 10})
