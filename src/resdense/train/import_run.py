"""A foreign checkpoint as a resdense run directory (``resdense import``).

The directory has the layout ``train`` writes (``checkpoints/epoch-0000/{model.safetensors,
meta.json,state.pt}`` with ``last`` and ``best`` pointing at it, written by
:func:`~resdense.train.checkpoint.save_checkpoint`), so ``eval``, ``predict``, ``export``,
``analyze`` and ``train --init-from`` take it like any run. Its ``meta.json`` records the
normalisation and class names the weights expect and where they came from; ``state.pt`` holds
no optimiser, so ``train --resume`` refuses it with a pointer to ``--init-from``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch.nn as nn

from ..errors import ConfigError, UserError
from ..models.importers import (LAYOUTS, Layout, Normalisation, build_from_state_dict, detect_layout,
                                find_state_dict, read_checkpoint, rename_keys, take_normalisation)
from ..outputs import RUN, check_writable, clear, mark
from ..runlock import RunLock
from . import checkpoint as ckpt


@dataclass
class ImportRequest:
    """What ``resdense import`` was asked to do; None fields take the layout's defaults."""

    path: str
    model: Optional[str]
    out: str
    fmt: str = "auto"
    classes: Optional[list[str]] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    input_size: Optional[int] = None
    data: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False


@dataclass
class Imported:
    """The imported model and its metadata; ``assumed`` is None when the normalisation was given or
    read from the file, else a line saying which one was assumed and how to change it."""

    model: nn.Module
    meta: dict[str, Any]
    checkpoint: Path
    assumed: Optional[str] = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stats(values: Optional[Sequence[float]], default: Sequence[float], chans: int, name: str) -> list[float]:
    if values is None:
        if len(default) != chans:
            raise ConfigError(f"the weights take {chans} input channel(s) but the layout's default {name} has "
                              f"{len(default)} values; give --mean and --std with {chans} value(s) each")
        return [float(v) for v in default]
    if len(values) != chans:
        raise ConfigError(f"--{name} has {len(values)} value(s) but the weights take {chans} input channel(s)")
    if name == "std" and any(v <= 0 for v in values):
        raise ConfigError(f"--std values must be positive; got {list(values)}")
    return [float(v) for v in values]


def _classes(given: Optional[list[str]], layout: Optional[Layout], num_classes: int) -> list[str]:
    if given is not None:
        if len(given) != num_classes:
            raise ConfigError(f"--classes names {len(given)} classes but the weights' classifier has {num_classes} "
                              f"outputs; give {num_classes} names (in the order of the outputs)")
        if len(set(given)) != len(given):
            raise ConfigError("--classes repeats a name; every class needs its own")
        return list(given)
    if layout is not None and len(layout.classes) == num_classes:
        return list(layout.classes)
    return [str(i) for i in range(num_classes)]


def _load(req: ImportRequest) -> tuple[nn.Module, dict[str, Any]]:
    """The model and the metadata of a foreign file, or of a resdense run/checkpoint directory."""
    path = Path(req.path)
    if req.fmt == "resdense" or path.is_dir():
        model, meta = ckpt.load_for_inference(path)
        if req.model is not None and req.model != meta["model"]:
            raise ConfigError(f"{path} holds {meta['model']} weights, not {req.model}; drop --model or fix it")
        meta = {k: v for k, v in meta.items() if k in ("model", "model_kwargs", "data", "classes", "mean", "std",
                                                         "input_size")}
        norm = Normalisation(tuple(meta["mean"]), tuple(meta["std"]), f"{path}") if meta.get("mean") else None
        return model, {**meta, "format": "resdense", "layout": None, "normalisation": norm}
    if req.model is None:
        raise ConfigError(f"{path} holds weights only; say which model they are for with --model NAME "
                          "(see `resdense list`)")
    obj = read_checkpoint(path)
    state, wrapper = find_state_dict(obj, str(path))
    state, norm = take_normalisation(obj, state, path)
    layout = detect_layout(state) if req.fmt == "auto" else LAYOUTS[req.fmt]
    model = build_from_state_dict(req.model, rename_keys(state, layout), source=str(path), **req.model_kwargs)
    return model, {"model": req.model, "format": layout.name, "layout": layout, "wrapper": wrapper,
                   "normalisation": norm}


def _normalisation(req: ImportRequest, found: Optional[Normalisation], layout: Optional[Layout],
                   chans: int) -> tuple[list[float], list[float], str, Optional[str]]:
    """(mean, std, where they came from, the line announcing an assumption or None)."""
    if req.mean is not None:
        return _stats(req.mean, (), chans, "mean"), _stats(req.std, (), chans, "std"), "given", None
    if found is not None:
        return _stats(None, found.mean, chans, "mean"), _stats(None, found.std, chans, "std"), found.where, None
    mean = _stats(None, layout.mean if layout else (), chans, "mean")
    std = _stats(None, layout.std if layout else (), chans, "std")
    numbers = f"mean {','.join(f'{v:g}' for v in mean)}, std {','.join(f'{v:g}' for v in std)}"
    line = (f"{req.path} does not say how its inputs were normalised: assumed {layout.stats if layout else 'the'} "
            f"({numbers}); if the weights were trained with another, import again with --mean M,M,M --std S,S,S "
            "--overwrite")
    return mean, std, "assumed", line


def import_checkpoint(req: ImportRequest) -> Imported:
    """Read, map and strictly load ``req.path``; write the run directory ``req.out``."""
    if req.fmt not in ("auto", "resdense", *LAYOUTS):
        raise ConfigError(f"--format must be auto, resdense or one of {', '.join(LAYOUTS)}; got {req.fmt!r}")
    out = Path(req.out)
    if check_writable(out, RUN) is not None and not req.overwrite:
        raise UserError(f"{out} already holds a run; choose a new --out or pass --overwrite to replace it")
    model, found = _load(req)  # everything is checked before anything is written
    layout: Optional[Layout] = found.pop("layout")
    kwargs = {k: v for k, v in found.get("model_kwargs", {}).items()}
    kwargs.update({"num_classes": model.num_classes, "in_chans": model.in_chans, **req.model_kwargs})
    chans = int(model.in_chans)
    mean, std, norm_source, assumed = _normalisation(req, found.pop("normalisation"), layout, chans)
    classes = _classes(req.classes if req.classes is not None else found.get("classes"), layout, model.num_classes)
    side = req.input_size or (layout.input_size if layout else None)
    input_size = [chans, side, side] if side else found.get("input_size")
    meta = {"model": found["model"], "model_kwargs": kwargs, "data": req.data or found.get("data") or
            (layout.data if layout else None), "classes": classes, "mean": mean, "std": std,
            "input_size": input_size, "epoch": 0, "step": 0, "config": {},
            "imported": {"file": str(Path(req.path).resolve()), "format": found["format"],
                         "wrapper": found.get("wrapper", ""), "normalisation": norm_source,
                         "sha256": _sha256(Path(req.path)) if Path(req.path).is_file() else None}}
    lock = RunLock(out)
    lock.acquire()
    try:
        mark(out, RUN)
        if req.overwrite:
            clear(out, RUN)
        written = ckpt.save_checkpoint(out, 0, model, {"step": 0, "epoch": 0, "imported": meta["imported"]}, meta,
                                       is_best=True)
    finally:
        lock.release()
    return Imported(model, meta, written, assumed)
