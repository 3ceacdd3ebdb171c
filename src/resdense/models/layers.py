"""Building blocks shared by every family: convolutions, shortcuts, init, and the common face.

Shortcut kinds (He et al. 2015, Sec. 4.1 and Table 3):

* ``"A"``: identity; where the shape changes, subsample by the stride and pad the new
  channels with zeros. No parameters (the paper's CIFAR choice).
* ``"B"``: identity; where the shape changes, a 1x1 projection (+ norm).
* ``"C"``: a 1x1 projection (+ norm) in every block.
* ``"none"``: no shortcut at all: the block's plain twin.
"""

from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InputError

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[..., nn.Module]

SHORTCUT_KINDS = ("A", "B", "C", "none")

# Norm layers by name, so a run's JSON config can choose one (``model_kwargs: {"norm_layer":
# "none"}``). ``nn.Identity`` takes and ignores the channel count: "none" removes every norm,
# the control of the remedies study (a plain net without batch norm).
NORM_LAYERS = MappingProxyType({"batchnorm": nn.BatchNorm2d, "none": nn.Identity})


def resolve_norm(norm_layer: Union[None, str, NormLayer]) -> NormLayer:
    """A norm layer factory from ``None`` (batch norm), a name in :data:`NORM_LAYERS`, or a callable."""
    if norm_layer is None:
        return nn.BatchNorm2d
    if isinstance(norm_layer, str):
        if norm_layer not in NORM_LAYERS:
            raise ConfigError(f"norm_layer must be one of {', '.join(NORM_LAYERS)} (or a callable); got {norm_layer!r}")
        return NORM_LAYERS[norm_layer]
    return norm_layer


def conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


def make_act(act_layer: ActLayer) -> nn.Module:
    """An activation module, in-place where the layer supports it (ReLU does; GELU does not)."""
    try:
        return act_layer(inplace=True)
    except TypeError:
        return act_layer()


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the channels, splitting the padding evenly
    before and after (the layout of the widely used CIFAR reimplementations, so their weights
    load unchanged)."""

    def __init__(self, stride: int, extra_chs: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_front = extra_chs // 2
        self.pad_back = extra_chs - extra_chs // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair pads dim 1 (channels) of an NCHW tensor.
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


def make_shortcut(
    kind: str,
    in_chs: int,
    out_chs: int,
    stride: int,
    norm_layer: Optional[NormLayer],
) -> tuple[Optional[nn.Module], bool]:
    """The shortcut of one block as ``(downsample module or None, whether to add it)``.

    ``norm_layer=None`` gives a bare 1x1 projection, as pre-activation blocks use.
    """
    if kind not in SHORTCUT_KINDS:
        raise ConfigError(f"shortcut must be one of {', '.join(SHORTCUT_KINDS)}; got {kind!r}")
    if kind == "none":
        return None, False
    reshapes = stride != 1 or in_chs != out_chs
    if kind == "A" and reshapes:
        if out_chs < in_chs:
            raise ConfigError("shortcut 'A' can only add channels; use 'B' where a stage narrows")
        return ZeroPadShortcut(stride, out_chs - in_chs), True
    if kind == "C" or (kind == "B" and reshapes):
        conv = conv1x1(in_chs, out_chs, stride)
        return (conv if norm_layer is None else nn.Sequential(conv, norm_layer(out_chs))), True
    return None, True


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, as He et al. 2015), unit norms, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class UnknownSettingError(ConfigError):
    """A keyword setting the builder does not take, or one the model's spec fixes.

    ``target`` is the class or function whose settings were checked. The error carries what it
    found so that :func:`~resdense.models.create_model` can name the model and add the
    registered function's own settings (``depth``, ``bc`` ...) to the list."""

    def __init__(self, owner: str, unknown: Sequence[str], fixed: Sequence[str], accepted: Iterable[str],
                 target: Callable[..., object]) -> None:
        self.owner, self.unknown, self.fixed, self.accepted = owner, tuple(unknown), tuple(fixed), tuple(accepted)
        self.target = target
        parts = []
        if self.unknown:
            parts.append(f"{owner} has no setting {', '.join(map(repr, self.unknown))}")
        if self.fixed:
            parts.append(f"{owner} fixes {', '.join(map(repr, self.fixed))} itself")
        super().__init__(f"{'; '.join(parts)}; its settings are: {', '.join(sorted(self.accepted))}")


def keyword_settings(target: Callable[..., object]) -> tuple[str, ...]:
    """The parameters of a function or class that can be passed by keyword, in order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(target).parameters.values() if p.kind in kinds)


def check_settings(target: Callable[..., object], settings: Mapping[str, object], fixed: Iterable[str] = (),
                   owner: str = "") -> None:
    """Refuse, with an :class:`UnknownSettingError`, a keyword ``target`` does not take or that
    the caller sets itself (``fixed``). A TypeError from the call would name neither the
    setting's owner nor what it does take."""
    fixed = set(fixed)
    known = keyword_settings(target)
    unknown = [k for k in settings if k not in known]
    clashes = [k for k in settings if k in fixed]
    if unknown or clashes:
        accepted = [k for k in known if k not in fixed]
        raise UnknownSettingError(owner or getattr(target, "__name__", str(target)), unknown, clashes, accepted, target)


def build_model(cls: Callable[..., nn.Module], spec: Mapping[str, object], settings: Mapping[str, object],
                defaults: Mapping[str, object] = MappingProxyType({})) -> nn.Module:
    """``cls(**spec, **settings)`` for a registered variant: ``spec`` is what makes the variant
    (a block, stage depths, widths), ``settings`` what its caller chose, and ``defaults`` the
    family's choices a caller may override (e.g. 10 classes for CIFAR). A setting that ``cls``
    does not take or that ``spec`` fixes is an :class:`UnknownSettingError` naming the rest."""
    check_settings(cls, settings, fixed=spec)
    return cls(**{**defaults, **settings, **spec})


def check_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return value


class ClassifierModel(nn.Module):
    """The face every resdense model shares, so analysis code is written once.

    Subclasses set ``num_classes``, ``in_chans``, ``num_features``, ``min_input_size``,
    ``stage_names`` (qualified names of the stage modules, in order) and ``head_name``
    (the final classifier), and implement :meth:`forward_features`.
    """

    num_classes: int
    in_chans: int
    num_features: int
    min_input_size: int
    stage_names: tuple[str, ...]
    head_name: str

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.get_submodule(self.head_name)(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last linear layer with a freshly initialised one for ``num_classes``."""
        check_positive("num_classes", num_classes)
        parent_name, _, attr = self.head_name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self
        old = getattr(parent, attr)
        new = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)
        nn.init.zeros_(new.bias)
        setattr(parent, attr, new)
        self.num_classes = num_classes

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise InputError(
                f"expected a batch of shape (N, {self.in_chans}, H, W); got {tuple(x.shape)}"
                f" (build the model with in_chans={x.shape[1] if x.dim() == 4 else '?'} to match)"
            )
        if x.shape[-2] < self.min_input_size or x.shape[-1] < self.min_input_size:
            raise InputError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small: this model needs at least "
                f"{self.min_input_size}x{self.min_input_size}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shape checks are Python-only: compiled and exported graphs trust their inputs.
        if not torch.compiler.is_compiling():
            self.check_input(x)
        return self.forward_head(self.forward_features(x))
