"""CIFAR-10 and CIFAR-100 in their official "python version" format.

Each batch file is a pickled dict (written by Python 2, so read with ``encoding="bytes"``):
``b"data"`` a uint8 array N x 3072 whose rows are the R, G and B planes of a 32x32 image,
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100) a list of N ints. The meta
file holds the class names (``b"label_names"`` / ``b"fine_label_names"``).

Pickle can run arbitrary code, so files are read with an unpickler that resolves only the
few globals these files need (numpy array reconstruction, and bytes as Python 3 pickles
them) and refuses everything else.
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR100_TRAIN = "train"
CIFAR100_TEST = "test"
CIFAR100_META = "meta"
_IMAGE_BYTES = 3 * 32 * 32


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core; the files name the old path.
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(module)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("numpy has no multiarray._reconstruct")


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 pickles bytes at protocol 2: ``_codecs.encode(str, 'latin1')``; only latin1 allowed."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_reconstruct()
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _encode_latin1,
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
    }


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowed few."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and plain numpy arrays, nothing else."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refusing to load global {module}.{name}") from None


def load_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys; any failure is a :class:`DataError` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except RefusedGlobal as e:
        raise DataError(f"{path}: unsafe or foreign pickle ({e}); not a CIFAR file, so not loaded") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError, MemoryError) as e:
        raise DataError(f"{path}: corrupt or truncated CIFAR file ({type(e).__name__}: {e}); "
                        f"delete it and download it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_batch(path: str | os.PathLike, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch file as images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    d = load_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: no {key!r} entry (has {sorted(d)}); is it a CIFAR batch of the right kind?")
    data, labels = d["data"], d[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == _IMAGE_BYTES):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: 'data' should be a uint8 array N x {_IMAGE_BYTES}, found "
                        f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    # Integers only: np.asarray would turn 3.5 into 3 and True into 1 without a word.
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        labels = labels.tolist()
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DataError(f"{path}: {label_key!r} is not a list of integers")
    if labels and (min(labels) < 0 or max(labels) >= 2**31):
        raise DataError(f"{path}: {label_key!r} holds a class index out of range ({min(labels)}..{max(labels)})")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels (count mismatch)")
    # (N, 3072) -> (N, 3, 32, 32): each row holds the R plane, then G, then B, each row-major.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def read_batches(paths: list[Path] | tuple[Path, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Several batch files concatenated in order."""
    parts = [read_batch(p, label_key) for p in paths]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def read_meta(path: str | os.PathLike, key: str) -> list[str]:
    """The class names stored under ``key`` in a meta file."""
    d = load_pickle(path)
    names = d.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: no {key!r} list of class names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]

