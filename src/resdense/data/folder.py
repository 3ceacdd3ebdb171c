"""Image folders: ``root/<class>/*.png`` or ``root/{train,val,test}/<class>/*``.

Images are decoded once with Pillow into uint8 tensors of one common size and one channel
count, and the tensors are cached (``torch.save`` of plain tensors + JSON, loadable with
``weights_only=True``) under a key made of the folder's path and every file's name, size
and modification time, so the next load reads one file instead of decoding again, and any
change to the folder decodes afresh.

Choices, in order:
- size: ``image_size`` if given, else the most common size among the folder's images;
  other images are resized (stretched, bilinear with antialiasing) to it;
- channels: 1 if every image is greyscale, else 3 (RGB; alpha is dropped);
- splits: ``test/`` and ``val/`` subfolders when present; without ``test/``, a fixed
  (seed 0, per class) ``test_ratio`` of the training files is held out as the test split.
  The test hold-out never depends on the validation seed, so changing that seed cannot move
  test images into training.

An image Pillow cannot read: ``bad_images="error"`` raises :class:`DataError` naming it;
``"skip"`` leaves it out with one warning line naming it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, DataError
from ..limits import TOO_LARGE, image_too_large
from .download import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BAD_IMAGE_POLICIES = ("error", "skip")
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_TEST_SEED = 0
_CACHE_VERSION = 1


class BadImageWarning(UserWarning):
    """An image file was skipped because it could not be decoded."""


@dataclass(frozen=True)
class FileEntry:
    path: str       # relative to the folder root, with '/' separators
    label: int
    size: int       # bytes
    mtime_ns: int


@dataclass
class FolderData:
    """What :func:`load_image_folder` found: decoded train (and val) tensors, a lazy test reader."""

    root: Path
    classes: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor] | None
    read_test: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    fingerprint: str
    image_size: tuple[int, int]
    in_chans: int
    skipped: list[str] = field(default_factory=list)


def load_image_folder(root: str | os.PathLike, *, cache_root: str | os.PathLike | None,
                      image_size: int | tuple[int, int] | None = None, test_ratio: float = 0.1,
                      bad_images: str = "error") -> FolderData:
    """Scan, decode (or read from the cache) an image folder; the test split is decoded lazily."""
    root = Path(root).expanduser().resolve()
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}; got {bad_images!r}")
    if not 0.0 <= test_ratio < 1.0:
        raise ConfigError(f"test_ratio must be in [0, 1); got {test_ratio}")
    size_request = _parse_size(image_size)
    classes, groups = scan_folder(root, test_ratio)
    key = _cache_key(root, groups, size_request, test_ratio, bad_images)
    cache = Path(cache_root) / "folders" / key if cache_root is not None else None

    fmt = _read_json(cache / "format.json") if cache else None
    if not _valid_format(fmt):
        fmt = _choose_format(root, groups, size_request, bad_images)  # warns about what it skips
        _try_write_json(cache, "format.json", fmt)
    else:
        for rel in fmt["skipped"]:
            _warn_skipped(root / rel, "cannot read it as an image")
    size, chans = (fmt["height"], fmt["width"]), fmt["channels"]
    skip = frozenset(fmt["skipped"])
    decode = functools.partial(_decode_group_cached, root, cache=cache, size=size, chans=chans,
                               bad_images=bad_images, skip=skip)
    train = decode("train", groups["train"])
    val = decode("val", groups["val"]) if "val" in groups else None
    return FolderData(root=root, classes=classes, train=train, val=val,
                      read_test=functools.partial(decode, "test", groups["test"]),
                      fingerprint=key, image_size=size, in_chans=chans, skipped=list(fmt["skipped"]))


def scan_folder(root: Path, test_ratio: float = 0.1) -> tuple[list[str], dict[str, list[FileEntry]]]:
    """Class names and the files of each split ("train", optional "val", "test"), in sorted order."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    nested = (root / "train").is_dir()
    base = root / "train" if nested else root
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{base} has no class subfolders; expected {base}/<class>/*.png (or .jpg, .jpeg, .bmp, .webp)")
    if len(classes) < 2:
        # One class trains to a perfect, meaningless score: every answer is right.
        raise DataError(f"{base} has one class subfolder ({classes[0]}); a classifier needs two or more, "
                        f"one subfolder per class")
    index = {c: i for i, c in enumerate(classes)}
    groups = {"train": _list_split(root, base, index, every_class=True)}
    if nested:
        for split in ("val", "test"):
            if (root / split).is_dir():
                groups[split] = _list_split(root, root / split, index, every_class=False)
    if "test" not in groups:
        groups["train"], groups["test"] = _hold_out(groups["train"], len(classes), test_ratio)
    return classes, groups


def _list_split(root: Path, base: Path, index: dict[str, int], *, every_class: bool) -> list[FileEntry]:
    """The image files under ``base/<class>/`` (recursively); ``every_class``: a class folder
    without images is an error (a training class must have examples)."""
    entries = []
    for class_dir in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if class_dir.name not in index:
            raise DataError(f"{class_dir}: class {class_dir.name!r} is not among the training classes "
                            f"({', '.join(index)}); rename or remove it")
        found = 0
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                full = os.path.join(dirpath, name)
                st = os.stat(full)
                entries.append(FileEntry(Path(full).relative_to(root).as_posix(), index[class_dir.name],
                                         st.st_size, st.st_mtime_ns))
                found += 1
        if found == 0 and every_class:
            raise DataError(f"{class_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder")
    if not entries:
        raise DataError(f"{base}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class subfolders")
    return entries


def _hold_out(entries: list[FileEntry], num_classes: int, ratio: float) -> tuple[list[FileEntry], list[FileEntry]]:
    """Split off ``round(ratio * n)`` files of each class (at least one when the class has two or
    more and ratio > 0), chosen by a fixed seed. Loops over classes, not files."""
    labels = torch.tensor([e.label for e in entries])
    g = torch.Generator().manual_seed(_TEST_SEED)
    test_mask = torch.zeros(len(entries), dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        n = members.numel()
        k = min(max(round(ratio * n), 1 if (ratio > 0 and n > 1) else 0), max(n - 1, 0))
        test_mask[members[torch.randperm(n, generator=g)[:k]]] = True
    keep = test_mask.tolist()
    return [e for e, t in zip(entries, keep) if not t], [e for e, t in zip(entries, keep) if t]


def _parse_size(image_size: int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ConfigError(f"image_size must be a positive int or (height, width); got {image_size!r}")
    return hw  # type: ignore[return-value]


def _cache_key(root: Path, groups: dict[str, list[FileEntry]], size: tuple[int, int] | None,
               test_ratio: float, bad_images: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, str(root), size, test_ratio, bad_images]).encode())
    for split in sorted(groups):
        h.update(split.encode())
        for e in groups[split]:
            h.update(f"\0{e.path}\0{e.label}\0{e.size}\0{e.mtime_ns}".encode())
    return h.hexdigest()[:24]


# --- decoding -----------------------------------------------------------------------------


def _map(fn: Callable, items: list) -> list:
    """Pillow releases the GIL while decoding, so threads give real parallelism here."""
    workers = min(8, os.cpu_count() or 1, max(len(items), 1))
    if workers <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _header(path: Path) -> tuple[tuple[int, int], str] | str:
    """((width, height), mode) from the file header, or the error text if Pillow cannot read it."""
    try:
        with Image.open(path) as im:
            return image_too_large(*im.size) or (im.size, im.mode)
    except UnidentifiedImageError:
        return "not an image file Pillow recognises"
    except Image.DecompressionBombError:
        return TOO_LARGE
    except (OSError, ValueError, SyntaxError) as e:
        return str(e) or type(e).__name__


def _choose_format(root: Path, groups: dict[str, list[FileEntry]], size: tuple[int, int] | None,
                   bad_images: str) -> dict:
    """Common size and channel count from every image's header (headers only, no decoding)."""
    entries = [e for split in sorted(groups) for e in groups[split]]
    headers = _map(_header, [root / e.path for e in entries])
    skipped, sizes, grey = [], collections.Counter(), True
    for e, h in zip(entries, headers):
        if isinstance(h, str):
            _bad_image(root / e.path, h, bad_images)
            skipped.append(e.path)
            continue
        sizes[h[0]] += 1
        grey = grey and h[1] in _GREY_MODES
    if not sizes:
        raise DataError(f"{root}: none of its {len(entries)} images could be read")
    if size is None:
        # Most common (width, height); ties go to the larger image so nothing is lost to downscaling.
        (w, h), _ = max(sizes.items(), key=_size_rank)
        size = (h, w)
    return {"height": size[0], "width": size[1], "channels": 1 if grey else 3, "skipped": skipped}


def _valid_format(fmt: dict | None) -> bool:
    return (isinstance(fmt, dict) and all(isinstance(fmt.get(k), int) and fmt[k] > 0 for k in ("height", "width"))
            and fmt.get("channels") in (1, 3) and isinstance(fmt.get("skipped"), list))


def _size_rank(item: tuple[tuple[int, int], int]) -> tuple[int, int, tuple[int, int]]:
    (w, h), count = item
    return count, w * h, (w, h)


def _decode_into(job: tuple[int, Path], out: np.ndarray) -> str | None:
    """Decode image ``job = (i, path)`` into ``out[i]`` (H, W, C); the error text if it cannot."""
    i, path = job
    pixels = _decode_one(path, out.shape[1:3], out.shape[3])
    if isinstance(pixels, str):
        return pixels
    out[i] = pixels
    return None


def _decode_one(path: Path, size: tuple[int, int], chans: int) -> np.ndarray | str:
    """(H, W, C) uint8 pixels at ``size``, or the error text if the file cannot be decoded."""
    try:
        with Image.open(path) as im:
            too_large = image_too_large(*im.size)  # the header again: the file may have changed since
            if too_large:
                return too_large
            im.load()
            if im.mode.startswith("I;16"):
                # 16-bit greyscale: keep the high byte rather than clipping at 255.
                im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
            im = im.convert("L" if chans == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).reshape(size[0], size[1], chans)
    except Image.DecompressionBombError:
        return TOO_LARGE
    except (OSError, ValueError, SyntaxError) as e:
        return str(e) or type(e).__name__


def _decode_group(root: Path, entries: list[FileEntry], size: tuple[int, int], chans: int,
                  bad_images: str) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str]]:
    # Workers write straight into one preallocated array: no per-image arrays kept around.
    pixels = np.empty((len(entries), size[0], size[1], chans), dtype=np.uint8)
    errors = _map(functools.partial(_decode_into, out=pixels), [(i, root / e.path) for i, e in enumerate(entries)])
    ok = np.array([err is None for err in errors], dtype=bool)
    skipped = []
    for e, err in zip(entries, errors):
        if err is not None:
            _bad_image(root / e.path, err, bad_images)
            skipped.append(e.path)
    labels = torch.tensor([e.label for e in entries], dtype=torch.int64)
    if skipped:
        pixels, labels = pixels[ok], labels[torch.from_numpy(ok)]
    # (N, H, W, C) -> (N, C, H, W)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return (images, labels), skipped


def _decode_group_cached(root: Path, split: str, entries: list[FileEntry], *, cache: Path | None,
                         size: tuple[int, int], chans: int, bad_images: str,
                         skip: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor]:
    entries = [e for e in entries if e.path not in skip]
    if cache is not None:
        hit = _read_tensors(cache / f"{split}.pt", size, chans)
        meta = _read_json(cache / f"{split}.json")
        if hit is not None and meta is not None:
            for rel in meta.get("skipped", []):
                _warn_skipped(root / rel, "cannot decode it")
            return hit
    (images, labels), skipped = _decode_group(root, entries, size, chans, bad_images)
    if cache is not None:
        try:
            atomic_write(cache / f"{split}.pt", functools.partial(torch.save, {"images": images, "labels": labels}))
            _try_write_json(cache, f"{split}.json", {"count": len(labels), "skipped": skipped})
        except OSError as e:
            log.warning("cannot cache decoded images in %s (%s); they will be decoded again next time", cache, e)
    return images, labels


def _bad_image(path: Path, reason: str, bad_images: str) -> None:
    if bad_images == "error":
        raise DataError(f"{path}: cannot decode image ({reason}); fix or remove it, or skip bad images "
                        f"(--bad-images skip; bad_images='skip' from Python)")
    _warn_skipped(path, reason)


def _warn_skipped(path: Path, reason: str) -> None:
    warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=3)


# --- cache files --------------------------------------------------------------------------


def _read_tensors(path: Path, size: tuple[int, int], chans: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (images, labels) if the file is there and sound; None means decode again."""
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = d["images"], d["labels"]
    except Exception as e:  # a cache is disposable: any failure to read it just means decoding again
        log.warning("ignoring unreadable cache file %s (%s)", path, e)
        return None
    ok = (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)
          and images.dtype == torch.uint8 and labels.dtype == torch.int64
          and images.shape[1:] == (chans, *size) and labels.shape == images.shape[:1])
    return (images.contiguous(), labels) if ok else None


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _try_write_json(cache: Path | None, name: str, obj: dict) -> None:
    if cache is None:
        return
    try:
        atomic_write_bytes(cache / name, json.dumps(obj, indent=1).encode())
    except OSError as e:
        log.warning("cannot write cache file %s (%s)", cache / name, e)
