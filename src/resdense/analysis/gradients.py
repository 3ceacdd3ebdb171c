"""Per-layer gradient norms: the vanishing-gradient picture of plain versus residual nets.

For every convolution weight, in depth order, and the final classifier, the L2 norm of the
gradient of the mean loss of a batch, averaged over a few batches. Gradients come from
``torch.autograd.grad`` on the weights themselves, so they are exact and leave each
parameter's ``.grad`` untouched.

The small helpers at the bottom (:func:`iter_batches`, :func:`model_state`,
:func:`has_shortcuts`) are shared by the other analyses in this package.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..models.blocks import ResidualBlock
from ..models.densenet import DenseNet

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = Sequence[torch.Tensor]

# Kinds of entries in a GradientReport.
CONV, SHORTCUT, CLASSIFIER = "conv", "shortcut", "classifier"


@dataclass
class GradientReport:
    """Gradient norms of one model, one entry per weight, in depth order.

    ``kinds[i]`` is ``"conv"`` (a convolution on the main path), ``"shortcut"`` (a projection
    on a shortcut) or ``"classifier"`` (the final linear layer, always the last entry).
    ``ratio_first_last`` is the norm of the first main-path convolution over that of the
    last one: far above 1 when gradients explode towards the input, far below when they vanish.
    """

    layer_names: list[str]
    norms: list[float]
    kinds: list[str]
    ratio_first_last: float
    num_batches: int
    training_mode: bool
    autocast_dtype: Optional[str] = None
    has_shortcuts: bool = True
    model_name: str = ""

    @property
    def is_classifier(self) -> list[bool]:
        return [k == CLASSIFIER for k in self.kinds]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # JSON has no infinity; a zero last-layer gradient gives one.
        if not math.isfinite(self.ratio_first_last):
            d["ratio_first_last"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GradientReport":
        d = dict(d)
        if d.get("ratio_first_last") is None:
            d["ratio_first_last"] = math.inf
        return cls(**d)


@dataclass
class _Layer:
    name: str
    weight: nn.Parameter
    kind: str


def _weights_in_depth_order(model: nn.Module) -> list[_Layer]:
    """Every Conv2d weight in ``named_modules()`` order, then the classifier's weight."""
    shortcut_modules: set[int] = set()
    for m in model.modules():
        if isinstance(m, ResidualBlock) and m.downsample is not None:
            shortcut_modules.update(id(s) for s in m.downsample.modules())
    layers = [
        _Layer(name, m.weight, SHORTCUT if id(m) in shortcut_modules else CONV)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    head_name = getattr(model, "head_name", None)
    if head_name is None:  # a model without the resdense face: take its last linear layer
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        head_name = linears[-1] if linears else None
    if head_name is not None:
        layers.append(_Layer(head_name, model.get_submodule(head_name).weight, CLASSIFIER))
    if not any(layer.kind == CONV for layer in layers):
        raise InputError(f"{type(model).__name__} has no convolutions to measure gradients of")
    return layers


def gradient_norms(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn = F.cross_entropy,
    max_batches: Optional[int] = 4,
    autocast_dtype: Optional[torch.dtype] = None,
    train_mode: bool = True,
) -> GradientReport:
    """L2 norm of ``d loss / d weight`` for every conv weight and the classifier.

    Args:
        model: any resdense model (in-place activations, checkpointed DenseNets included).
        batches: ``(images, labels)`` pairs, images float NCHW already normalised.
        loss_fn: ``loss_fn(logits, labels)``, a mean over the batch.
        max_batches: use at most this many batches (``None``: all). The per-batch norms are averaged.
        autocast_dtype: e.g. ``torch.bfloat16`` to measure under autocast; ``None`` for full precision.
        train_mode: measure as training sees it (batch-statistics BN, the default) or in eval mode.

    The model comes back as it was: same train/eval mode, same BN running statistics
    (a train-mode forward would otherwise move them), every ``.grad`` untouched.
    """
    layers = _weights_in_depth_order(model)
    weights = [layer.weight for layer in layers]
    device = _device_of(model)
    total: Optional[torch.Tensor] = None
    n = 0
    frozen = [w for w in weights if not w.requires_grad]
    with model_state(model, training=train_mode), _requiring_grad(frozen):
        for images, labels in iter_batches(batches, device, max_batches):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = model(images)
            loss = loss_fn(logits.float(), labels)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            norms = torch.stack([
                torch.zeros((), device=device) if g is None else torch.linalg.vector_norm(g.float())
                for g in grads
            ])
            # Summed on the device; one transfer at the end instead of one per batch.
            total = norms if total is None else total + norms
            n += 1
    if total is None:
        raise InputError("no batches to measure gradients on: pass at least one (images, labels) batch")
    mean = (total / n).tolist()
    kinds = [layer.kind for layer in layers]
    main = [v for v, k in zip(mean, kinds) if k == CONV]
    ratio = main[0] / main[-1] if main[-1] > 0 else math.inf
    return GradientReport(
        layer_names=[layer.name for layer in layers],
        norms=mean,
        kinds=kinds,
        ratio_first_last=ratio,
        num_batches=n,
        training_mode=train_mode,
        autocast_dtype=None if autocast_dtype is None else str(autocast_dtype).removeprefix("torch."),
        has_shortcuts=has_shortcuts(model),
        model_name=getattr(model, "model_name", type(model).__name__),
    )


# --- helpers shared by the analyses ----------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def iter_batches(batches: Iterable[Batch], device: torch.device,
                 max_batches: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)`` moved to ``device``, at most ``max_batches`` of them.

    Accepts tuples or lists (a DataLoader's batches); refuses unnormalised integer images.
    """
    if max_batches is not None and max_batches < 1:
        raise InputError(f"max_batches must be at least 1; got {max_batches}")
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InputError("each batch must be an (images, labels) pair")
        images, labels = batch[0], batch[1]
        if not torch.is_floating_point(images) or images.dim() != 4:
            raise InputError(f"images must be a float NCHW tensor, normalised; got {images.dtype} "
                             f"of shape {tuple(images.shape)} (convert and normalise first)")
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


@contextlib.contextmanager
def model_state(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train or eval mode and give it back as it was: the same mode and, for
    a train-mode run, the same buffers (BN running statistics and counters)."""
    was_training = model.training
    saved = [b.detach().clone() for b in model.buffers()] if training else []
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, s in zip(model.buffers(), saved):
                b.copy_(s)


@contextlib.contextmanager
def _requiring_grad(params: list[nn.Parameter]) -> Iterator[None]:
    """Let autograd reach frozen weights for the measurement, then freeze them again."""
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)


def has_shortcuts(model: nn.Module) -> bool:
    """Whether the model has shortcut connections: a residual block that adds its shortcut,
    or dense connectivity (every DenseNet layer reads all earlier ones). Plain nets and VGG
    have none; plots draw them dashed."""
    return isinstance(model, DenseNet) or any(isinstance(m, ResidualBlock) and m.use_shortcut for m in model.modules())


__all__ = ["GradientReport", "gradient_norms", "has_shortcuts", "iter_batches", "model_state"]
