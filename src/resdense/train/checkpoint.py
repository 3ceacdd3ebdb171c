"""Safe, atomic, exactly resumable checkpoints.

A checkpoint is a directory ``RUN/checkpoints/epoch-NNNN`` holding

* ``model.safetensors`` — the weights and buffers (no code, no pickle);
* ``state.pt`` — optimiser, step, epoch, RNG states, schedule state, metrics so far: tensors
  and plain Python values only, loadable with ``torch.load(weights_only=True)``;
* ``meta.json`` — the resolved config, model name and arguments, classes, normalisation.

It is written into a temporary directory, fsynced and renamed into place; then the links
``RUN/last`` and ``RUN/best`` are swapped atomically (``os.replace`` of a symlink), and only
then are unreferenced checkpoints deleted. A crash at any moment leaves the previous
checkpoint loadable; a write the disk refuses (full, read-only) removes its temporary directory
and raises :class:`~resdense.errors.WriteError`. A checkpoint taken inside an epoch (a stop
signal, ``checkpoint_every``) is ``RUN/checkpoints/step-NNNNNNN``; its state holds the loader
position (see ``state``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._io import fsync_dir, write_failure
from ..errors import CheckpointError
from ..models.importers import strip_prefixes, weights_only_load

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes DDP (``module.``) and torch.compile (``_orig_mod.``) add to keys."""
    return {strip_prefixes(key): value for key, value in state.items()}


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
                    *, is_best: bool, name: Optional[str] = None) -> Path:
    """Write checkpoint ``name`` (default ``epoch-NNNN``) and point ``last`` (and, if ``is_best``,
    ``best``) at it."""
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / (name or f"epoch-{epoch:04d}")
    tmp: Optional[Path] = None
    writing = final
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".{final.name}."))
        weights = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        writing = final / MODEL_FILE
        save_file(weights, str(tmp / MODEL_FILE))
        writing = final / STATE_FILE
        torch.save(state, tmp / STATE_FILE)
        writing = final / META_FILE
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        writing = final
        for file in (MODEL_FILE, STATE_FILE, META_FILE):
            with open(tmp / file, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # a re-run of the same epoch (after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        tmp = None
        writing = run_dir / "last"
        _point(run_dir / "last", final)
        if is_best:
            writing = run_dir / "best"
            _point(run_dir / "best", final)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # before measuring the free space in the message
        failure = write_failure(e, writing) if isinstance(e, Exception) else None
        if failure is not None and failure is not e:
            raise failure from None
        raise
    _remove_unreferenced(run_dir)
    return final


def _point(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left behind in ``run_dir`` (temporary checkpoint directories,
    ``.last.tmp`` links, ``.name.*.tmp`` files); returns them. Call it only while holding the
    run's lock: then no other process can be writing them."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(".*.tmp") if p.is_file() or p.is_symlink()]
    if (run_dir / "checkpoints").is_dir():
        found += [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def _remove_unreferenced(run_dir: Path) -> None:
    keep = {(run_dir / name).resolve() for name in ("last", "best") if (run_dir / name).exists()}
    for path in (run_dir / "checkpoints").iterdir():
        if path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run directory (its ``best``, else ``last``) or a
    checkpoint directory itself."""
    path = Path(path)
    # A run's links first: `export` writes RUN/model.safetensors beside them, which does not make
    # the run folder a checkpoint.
    for name in (prefer, "last", "best"):
        if (path / name / MODEL_FILE).is_file():
            return (path / name).resolve()
    if (path / MODEL_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {path}")
    raise CheckpointError(f"{path} holds no checkpoint ({MODEL_FILE} not found in it, its best/ or last/)")


_META_TYPES: dict[str, Any] = {"model": str, "model_kwargs": dict, "classes": list, "input_size": list,
                               "mean": list, "std": list, "config": dict, "data": str}
_OPTIONAL_META = {"data"}  # imported weights name no dataset


def read_meta(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's metadata, with the types of the fields resdense reads checked."""
    path = ckpt / META_FILE
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8
        raise CheckpointError(f"{path} is missing or corrupt ({e.__class__.__name__}); the checkpoint cannot be used") from None
    return check_meta(meta, path)


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """``meta`` (read from ``path``) if the fields resdense reads have their types, else a CheckpointError."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{path} names no model; it is damaged or was not written by resdense")
    for key, kind in _META_TYPES.items():
        if key in meta and not isinstance(meta[key], kind) and not (key in _OPTIONAL_META and meta[key] is None):
            raise CheckpointError(f"{path}: {key!r} is a {type(meta[key]).__name__}, not a {kind.__name__}; the file is damaged")
    if any(not isinstance(k, str) for k in meta.get("model_kwargs", {})):
        raise CheckpointError(f"{path}: 'model_kwargs' is damaged")
    size = meta.get("input_size", [1, 1, 1])
    numbers = [*size, *meta.get("mean", []), *meta.get("std", [])]
    if (len(size) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65536 for v in size)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
            or not all(isinstance(c, str) for c in meta.get("classes", []))):
        raise CheckpointError(f"{path}: input_size, mean, std or classes are damaged")
    return meta


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / MODEL_FILE))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{ckpt / MODEL_FILE} is corrupt or unreadable ({_first_line(e)})") from None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The training state, loaded with ``weights_only=True``: a file that needs pickled code is refused."""
    try:
        state = weights_only_load(ckpt / STATE_FILE)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{ckpt / STATE_FILE} needs pickled code to load; resdense refuses to run it") from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error, OverflowError, MemoryError, RecursionError) as e:
        # Damaged bytes reach many corners of the zip reader and the weights-only unpickler (a
        # key or index they expect, a short struct, bad UTF-8): all of them mean a damaged file.
        raise CheckpointError(f"{ckpt / STATE_FILE} is corrupt or unreadable ({_first_line(e)})") from None
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else type(e).__name__


def build_model_from_meta(meta: dict[str, Any]) -> nn.Module:
    from ..models import create_model

    try:
        return create_model(meta["model"], **meta.get("model_kwargs", {}))
    except KeyError as e:
        raise CheckpointError(f"checkpoint metadata lacks {e}; it was not written by resdense") from None
    except (TypeError, ValueError) as e:  # model arguments the builder cannot take (ConfigError passes through)
        if isinstance(e, CheckpointError) or getattr(e, "exit_code", None):
            raise
        raise CheckpointError(f"checkpoint metadata gives {meta['model']} arguments it cannot take "
                              f"({_first_line(e)}); the metadata is damaged") from None


def load_for_inference(path: str | Path, prefer: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """An eval-mode model and its metadata (``model``, ``input_size``, ``classes``, ``mean``,
    ``std``, ``config`` ...) from a run or checkpoint directory."""
    ckpt = resolve_checkpoint(path, prefer)
    meta = read_meta(ckpt)
    model = build_model_from_meta(meta)
    load_weights(model, read_weights(ckpt), source=str(ckpt))
    meta["checkpoint"] = str(ckpt)
    return model.eval(), meta


def describe_resume_point(run_dir: Path) -> str:
    """'the previous checkpoint RUN/last (epoch 2, step 16) is intact', or that there is none yet."""
    point = find_resume_point(run_dir)
    if point is None:
        return f"no checkpoint was written in {run_dir} yet"
    try:
        meta = read_meta(point)
        epoch, step = int(meta["epoch"]), int(meta["step"])
        # meta's epoch counts finished epochs; a mid-epoch checkpoint (step-N) sits inside the next
        # one, which the stop line numbers from 1 ("epoch 2, batch 9 of 16"): say it the same way.
        inside = point.name.startswith("step-")
        where = f" (step {step}, inside epoch {epoch + 1})" if inside else f" (end of epoch {epoch}, step {step})"
    except (CheckpointError, KeyError, TypeError, ValueError):
        where = ""
    return f"the previous checkpoint {Path(run_dir) / 'last'}{where} is intact"


_STATE_TYPES: dict[str, Any] = {"optimizer": dict, "step": int, "epoch": int, "warmup_done": bool,
                                "best_val_error": (int, float), "rng": dict, "metrics": list, "curve": list}
_POSITION_TYPES: dict[str, Any] = {"epoch": int, "batch": int, "epoch_seed": int, "progress": dict,
                                   "epoch_time": (int, float), "wall_time": (int, float)}
_PROGRESS_TYPES: dict[str, Any] = {"batch": int, "loss_sum": (int, float), "wrong": int, "seen": int,
                                   "train_time": (int, float), "interval": list}


def _check_fields(d: Any, types: dict[str, Any], what: str, source: Path) -> None:
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: {what} is a {type(d).__name__}, not a mapping; the file is damaged")
    for key, kind in types.items():
        value = d.get(key)
        # bool is an int to Python; a count stored as True is still damage.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise CheckpointError(f"{source}: {what} has no valid {key!r}; the file is damaged or not resdense's")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0 and key != "epoch_seed":
            raise CheckpointError(f"{source}: {what} has a negative {key!r}; the file is damaged")


def check_state(state: Any, source: Path) -> dict[str, Any]:
    """``state`` if it has the shape of a resdense training state (types of the fields a resume
    reads, the loader position of a mid-epoch checkpoint), else a CheckpointError."""
    _check_fields(state, _STATE_TYPES, "the training state", source)
    if not isinstance(state["rng"].get("torch"), torch.Tensor) or state["rng"]["torch"].dtype != torch.uint8:
        raise CheckpointError(f"{source}: the saved random state is damaged")
    rows = state["metrics"]
    if not all(isinstance(r, dict) for r in rows) or (rows and not isinstance(rows[-1].get("wall_time"), (int, float))):
        raise CheckpointError(f"{source}: the saved metrics are damaged")
    if not all(isinstance(r, dict) for r in state["curve"]):
        raise CheckpointError(f"{source}: the saved training curve is damaged")
    if "position" in state:
        pos = state["position"]
        _check_fields(pos, _POSITION_TYPES, "the loader position", source)
        _check_fields(pos["progress"], _PROGRESS_TYPES, "the epoch's progress", source)
        interval = pos["progress"]["interval"]
        if (len(interval) != 3 or set(pos["progress"]) != set(_PROGRESS_TYPES) or pos["epoch"] != state["epoch"]
                or pos["progress"]["batch"] != pos["batch"]
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)):
            raise CheckpointError(f"{source}: the loader position is inconsistent; the file is damaged")
    return state


def find_resume_point(run_dir: Path) -> Optional[Path]:
    last = Path(run_dir) / "last"
    return last.resolve() if (last / MODEL_FILE).is_file() else None
