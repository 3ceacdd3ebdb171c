"""IDX files, the format of MNIST and Fashion-MNIST: read, validate, turn into tensors.

An IDX file is a 4-byte big-endian magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the items row-major. MNIST-style
image files are ``0x00000803`` (uint8, 3 dims: N, rows, cols) and label files ``0x00000801``
(uint8, 1 dim: N). Files may be gzipped (detected from the content, not the name).

Everything a broken file can do (bad gzip, wrong magic, header and byte count disagreeing,
images and labels disagreeing on N) raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..limits import MAX_UNPACKED_BYTES

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"
_KIND = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
_REFETCH = "delete it and download it again"


def read_bytes(path: str | os.PathLike) -> bytes:
    """The decompressed content of ``path`` (gzip if it starts with the gzip magic or ends in .gz)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    if raw[:2] == _GZIP_MAGIC or path.suffix == ".gz":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                data = f.read(MAX_UNPACKED_BYTES + 1)  # a gzip "bomb" stops here, not at the memory's end
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{path}: not a valid gzip file ({e}); {_REFETCH}") from None
        if len(data) > MAX_UNPACKED_BYTES:
            raise DataError(f"{path}: unpacks to more than {MAX_UNPACKED_BYTES:,} bytes, the most resdense reads "
                            f"from one file; {_REFETCH}")
        return data
    return raw


def parse_idx(data: bytes, magic: int, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Validate an IDX payload against the expected ``magic`` and view it as a uint8 array.

    The array is a read-only view of ``data`` (no copy).
    """
    kind = _KIND.get(magic, "IDX")
    if len(data) < 4:
        raise DataError(f"{path}: truncated: {len(data)} bytes, too short for an IDX header; {_REFETCH}")
    (got,) = struct.unpack(">I", data[:4])
    if got != magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{got:08x}, expected 0x{magic:08x} for an {kind} file "
                        f"(is it the right file, or not decompressed correctly?)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: {len(data)} bytes, too short for the {ndim}-dimension IDX header; "
                        f"{_REFETCH}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if any(d == 0 for d in dims[1:]):
        raise DataError(f"{path}: the IDX header declares an empty item shape {dims[1:]}; {_REFETCH}")
    want = math.prod(dims)
    have = len(data) - header
    if have < want:
        raise DataError(f"{path}: truncated: the header declares {dims[0]} {kind} ({want} bytes of data) but the "
                        f"file holds {have} bytes; {_REFETCH}")
    if have > want:
        raise DataError(f"{path}: {have - want} bytes beyond the {dims[0]} {kind} its header declares (count "
                        f"mismatch); {_REFETCH}")
    return np.frombuffer(data, dtype=np.uint8, count=want, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int, md5: str | None = None) -> np.ndarray:
    """Read and validate one IDX file; with ``md5``, also check the decompressed bytes' MD5."""
    data = read_bytes(path)
    arr = parse_idx(data, magic, path)
    if md5 is not None:
        got = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if got != md5:
            raise DataError(f"{path}: contents differ from the published file (MD5 {got} of the decompressed "
                            f"bytes, expected {md5}); {_REFETCH}")
    return arr


def read_idx_images(path: str | os.PathLike, md5: str | None = None) -> torch.Tensor:
    """An IDX image file as a uint8 tensor (N, 1, rows, cols)."""
    arr = read_idx(path, IMAGES_MAGIC, md5)
    # (N, H, W) -> (N, 1, H, W); one copy makes it writable and owned by torch.
    return torch.from_numpy(arr.copy()).unsqueeze(1)


def read_idx_labels(path: str | os.PathLike, md5: str | None = None) -> torch.Tensor:
    """An IDX label file as an int64 tensor (N,)."""
    return torch.from_numpy(read_idx(path, LABELS_MAGIC, md5).astype(np.int64))


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike, *,
                  images_md5: str | None = None, labels_md5: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from a matching pair of IDX files."""
    labels = read_idx_labels(labels_path, labels_md5)
    images = read_idx_images(images_path, images_md5)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path}: {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels "
                        f"(count mismatch); {_REFETCH}")
    return images, labels

