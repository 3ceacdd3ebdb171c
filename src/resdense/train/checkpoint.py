"""Safe, atomic, exactly resumable checkpoints.

A checkpoint is a directory ``RUN/checkpoints/epoch-NNNN`` holding

* ``model.safetensors`` — the weights and buffers (no code, no pickle);
* ``state.pt`` — optimiser, step, epoch, RNG states, schedule state, metrics so far: tensors
  and plain Python values only, loadable with ``torch.load(weights_only=True)``;
* ``meta.json`` — the resolved config, model name and arguments, classes, normalisation.

It is written into a temporary directory, fsynced and renamed into place; then the links
``RUN/last`` and ``RUN/best`` are swapped atomically (``os.replace`` of a symlink), and only
then are unreferenced checkpoints deleted. A crash at any moment leaves the previous
checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import fsync_dir
from ..errors import CheckpointError

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
_PREFIXES = ("module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes DDP (``module.``) and torch.compile (``_orig_mod.``) add to keys."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` strictly (after prefix cleaning); any mismatch is a CheckpointError that
    lists the keys, never a silent partial load."""
    from ..models.importers import mismatch_report

    state = clean_state_dict(state)
    problem = mismatch_report(unwrap(model).state_dict(), state)
    if problem:
        raise CheckpointError(f"{source} does not fit this model ({problem}); was it saved for another model?")
    unwrap(model).load_state_dict(state, strict=True)


def save_checkpoint(run_dir: Path, epoch: int, model: nn.Module, state: dict[str, Any], meta: dict[str, Any],
                    *, is_best: bool) -> Path:
    """Write checkpoint ``epoch`` and point ``last`` (and, if ``is_best``, ``best``) at it."""
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}."))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        save_file(weights, str(tmp / MODEL_FILE))
        torch.save(state, tmp / STATE_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        for name in (MODEL_FILE, STATE_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a re-run of the same epoch (after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point(run_dir / "last", final)
    if is_best:
        _point(run_dir / "best", final)
    _remove_unreferenced(run_dir)
    return final


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def _remove_unreferenced(run_dir: Path) -> None:
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    for path in (run_dir / "checkpoints").iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run directory (its ``best``, else ``last``) or a
    checkpoint directory itself."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for name in (prefer, "last", "best"):
        if (path / name / MODEL_FILE).is_file():
            return (path / name).resolve()
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    raise CheckpointError(f"{path} holds no checkpoint ({MODEL_FILE} not found in it, its best/ or last/)")


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE} is missing or corrupt ({e.__class__.__name__}); the checkpoint cannot be used") from None


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / MODEL_FILE))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{ckpt / MODEL_FILE} is corrupt or unreadable ({str(e).splitlines()[0][:120]})") from None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The training state, loaded with ``weights_only=True``: a file that needs pickled code is refused."""
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{ckpt / STATE_FILE} needs pickled code to load; resdense refuses to run it") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt or unreadable ({str(e).splitlines()[0][:120]})") from None


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    from ..models import create_model

    try:
        return create_model(meta["model"], **meta.get("model_kwargs", {}))
    except KeyError as e:
        raise CheckpointError(f"checkpoint metadata lacks {e}; it was not written by resdense") from None


def load_for_inference(path: str | Path, prefer: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """An eval-mode model and its metadata (``model``, ``input_size``, ``classes``, ``mean``,
    ``std``, ``config`` ...) from a run or checkpoint directory."""
    ckpt = resolve_checkpoint(path, prefer)
    meta = read_meta(ckpt)
    model = build_model_from_meta(meta)
    load_weights(model, read_weights(ckpt), source=str(ckpt))
    meta["checkpoint"] = str(ckpt)
    return model.eval(), meta


def find_resume_point(run_dir: Path) -> Optional[Path]:
    last = Path(run_dir) / "last"
    return last.resolve() if (last / MODEL_FILE).is_file() else None
