"""Layer responses (He et al. 2015, Sec. 4.2 and Fig. 7).

The paper plots "the standard deviations (std) of layer responses ... the outputs of each
3x3 layer, after BN and before other nonlinearity (ReLU/addition)". Residual functions
respond less than their plain counterparts: they stay close to zero, as the paper argues
they should when the identity is near optimal.

What counts as a 3x3 layer's response here:

* a post-activation layer (conv -> BN -> ReLU or addition; plain nets, ResNet, VGG): the
  output of the norm that consumes the convolution's output within the same module;
* a layer inside a pre-activation unit (a ``ResidualBlock`` with ``preact``; DenseNet layers, whose
  3x3 output goes straight into a concatenation; a bare stem): the convolution's own output,
  since no BN sits between it and the addition or concatenation.

Which norm consumes which convolution is found by data flow, on one image, not by name.
The std is taken per channel over (N, H, W), pooled over all batches, then averaged over
channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from ..errors import InputError
from ..models.blocks import ResidualBlock
from .gradients import Batch, _device_of, has_shortcuts, iter_batches, model_state

_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


@dataclass
class ResponseReport:
    """Std of each 3x3 layer's response, in depth order and sorted (descending).

    ``response_modules[i]`` names the module whose output was measured for
    ``layer_names[i]``: the BN after it, or the convolution itself (see the module docstring).
    """

    layer_names: list[str]
    response_modules: list[str]
    stds: list[float]
    sorted_stds: list[float]
    num_batches: int
    has_shortcuts: bool = True
    model_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResponseReport":
        return cls(**d)


def _is_3x3(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


@torch.no_grad()
def find_response_modules(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Map each 3x3 conv's name to the name of the module whose output is its response.

    Runs ``example[:1]`` once with hooks that note which norm receives which convolution's
    output tensor (identity, not just shape), so the answer follows the data, not the names.
    """
    convs = {name: m for name, m in model.named_modules() if _is_3x3(m)}
    if not convs:
        raise InputError(f"{type(model).__name__} has no 3x3 convolutions to measure responses of")
    norms = {name: m for name, m in model.named_modules() if isinstance(m, _NORMS)}
    producer: dict[int, str] = {}
    alive: list[torch.Tensor] = []  # holds the probe's outputs so their ids stay unique
    consumer: dict[str, str] = {}

    def conv_hook(name: str):
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            producer[id(out)] = name
            alive.append(out)
        return hook

    def norm_hook(name: str):
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
            conv = producer.get(id(inp[0]))
            if conv is not None and conv not in consumer:
                consumer[conv] = name
        return hook

    handles = [m.register_forward_hook(conv_hook(n)) for n, m in convs.items()]
    handles += [m.register_forward_pre_hook(norm_hook(n)) for n, m in norms.items()]
    try:
        with model_state(model, training=False):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        alive.clear()

    found = {}
    for conv in convs:
        norm = consumer.get(conv)
        parent = _parent(conv)
        owner = model.get_submodule(parent)
        post_activation = not (isinstance(owner, ResidualBlock) and owner.preact)
        # A norm in another module (the next block's pre-activation) is not this layer's BN.
        if norm is not None and post_activation and _parent(norm) == parent:
            found[conv] = norm
        else:
            found[conv] = conv
    return found


class _RunningStd:
    """Per-channel mean and sum of squared deviations, merged batch by batch (Chan et al.),
    in float64 so thousands of batches do not drift."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def update(self, y: torch.Tensor) -> None:
        # y: (N, C, H, W) -> per-channel statistics over (N, H, W)
        n = y.numel() // y.shape[1]
        var, mean = torch.var_mean(y.detach().float(), dim=(0, 2, 3), correction=0)
        var, mean = var.double(), mean.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, var * n
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + var * n + delta.square() * (self.count * n / total)
        self.count = total

    def channel_mean_std(self) -> float:
        return float((self.m2 / self.count).sqrt().mean())


@torch.no_grad()
def layer_responses(model: nn.Module, batches: Iterable[Batch], max_batches: Optional[int] = 4) -> ResponseReport:
    """Std of the response of every 3x3 layer (see the module docstring), in eval mode.

    Args:
        model: any resdense model.
        batches: ``(images, labels)`` pairs, images float NCHW already normalised (labels unused).
        max_batches: use at most this many batches (``None``: all).
    """
    device = _device_of(model)
    stats: dict[str, _RunningStd] = {}
    handles = []
    mapping: dict[str, str] = {}
    n = 0

    def stat_hook(name: str):
        # Statistics are taken inside the hook: an in-place ReLU right after would overwrite
        # the tensor, and keeping it would hold every layer's activations at once.
        def hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            stats[name].update(out)
        return hook

    try:
        with model_state(model, training=False):
            for images, _labels in iter_batches(batches, device, max_batches):
                if not mapping:
                    mapping = find_response_modules(model, images)
                    for module_name in dict.fromkeys(mapping.values()):
                        stats[module_name] = _RunningStd()
                        handles.append(model.get_submodule(module_name).register_forward_hook(stat_hook(module_name)))
                model(images)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise InputError("no batches to measure responses on: pass at least one (images, labels) batch")
    stds = [stats[m].channel_mean_std() for m in mapping.values()]
    return ResponseReport(
        layer_names=list(mapping),
        response_modules=list(mapping.values()),
        stds=stds,
        sorted_stds=sorted(stds, reverse=True),
        num_batches=n,
        has_shortcuts=has_shortcuts(model),
        model_name=getattr(model, "model_name", type(model).__name__),
    )


__all__ = ["ResponseReport", "find_response_modules", "layer_responses"]
