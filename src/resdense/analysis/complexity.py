"""Parameters and multiply-accumulates (MACs), in total and per stage.

MACs count the multiply-adds of convolutions and linear layers for one image, the quantity
the ResNet paper calls FLOPs. Norms, activations, pooling and additions are left out, as
the papers leave them out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..models._registry import PaperFigures, create_model, model_entry


@dataclass
class StageRow:
    name: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class ModelInfo:
    name: str
    input_size: tuple[int, int, int]
    params: int
    macs: int
    rows: list[StageRow]
    paper: Optional[PaperFigures] = None
    # MACs of the model built the way the paper counted (e.g. stride on the first 1x1), if different.
    paper_comparable_macs: Optional[int] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _leaf_macs(module: nn.Module, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        return out[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


def _row_of(name: str, stage_names: tuple[str, ...], seen_first_stage: bool) -> str:
    for stage in stage_names:
        if name == stage or name.startswith(stage + "."):
            return stage
    return "head" if seen_first_stage else "stem"


@torch.no_grad()
def profile(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, int, list[StageRow]]:
    """Run one image through ``model`` and return (params, MACs, per-stage rows).

    Rows are ``stem``, each of ``model.stage_names``, and ``head``; a leaf module counts
    towards the stage whose name prefixes its own."""
    stage_names: tuple[str, ...] = tuple(getattr(model, "stage_names", ()))
    rows = {n: StageRow(n, (), 0, 0) for n in ("stem", *stage_names, "head")}
    owner: dict[nn.Module, str] = {}
    seen_stage = False
    for name, m in model.named_modules():
        if name in stage_names:
            seen_stage = True
        if not list(m.children()):
            owner[m] = _row_of(name, stage_names, seen_stage)
            rows[owner[m]].params += sum(p.numel() for p in m.parameters(recurse=False))

    def leaf_hook(m: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            rows[owner[m]].macs += _leaf_macs(m, out)

    def stage_hook(name: str):
        def hook(_m: nn.Module, inp: Any, out: torch.Tensor) -> None:
            rows[name].output_shape = tuple(out.shape[1:])
            if name == stage_names[0]:
                rows["stem"].output_shape = tuple(inp[0].shape[1:])
        return hook

    handles = [m.register_forward_hook(leaf_hook) for m in owner]
    handles += [model.get_submodule(n).register_forward_hook(stage_hook(n)) for n in stage_names]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        out = model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    rows["head"].output_shape = tuple(out.shape[1:])
    total_params = count_params(model)
    return total_params, sum(r.macs for r in rows.values()), list(rows.values())


def model_info(name_or_model: Union[str, nn.Module], input_size: Optional[tuple[int, int, int]] = None,
               **kwargs: Any) -> ModelInfo:
    """Parameters, MACs and a per-stage table for a registered name or a built model.

    ``input_size`` is ``(C, H, W)``; by default the model's own (CIFAR 3x32x32, ImageNet
    3x224x224). For a name, ``kwargs`` go to the builder."""
    entry = model_entry(name_or_model) if isinstance(name_or_model, str) else None
    if entry is not None:
        model = create_model(entry.name, **kwargs)
        name = entry.name
    else:
        model = name_or_model
        name = getattr(model, "model_name", type(model).__name__)
    if input_size is None:
        size = entry.input_size if entry else (3, 32, 32)
        input_size = (getattr(model, "in_chans", size[0]), *size[1:])
    params, macs, rows = profile(model, input_size)
    info = ModelInfo(name, tuple(input_size), params, macs, rows, entry.paper if entry else None)
    paper = info.paper
    if entry is not None and paper is not None and paper.macs is not None and paper.macs_kwargs:
        if any(kwargs.get(k) != v for k, v in paper.macs_kwargs.items()):
            alt = create_model(entry.name, **{**kwargs, **paper.macs_kwargs})
            info.paper_comparable_macs = profile(alt, input_size)[1]
            setting = ", ".join(f"{k}={v}" for k, v in paper.macs_kwargs.items())
            info.notes.append(f"the paper counts with {setting}: {info.paper_comparable_macs / 1e9:.2f} G MACs")
    return info
