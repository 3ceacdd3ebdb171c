"""Datasets by name: where their files are looked for, how they are read, split and normalised.

``load_dataset("fashion-mnist")`` returns a :class:`DatasetSplits`: the training files split
into ``train`` and a seeded validation hold-out ``val`` (uint8 tensors), the per-channel
mean/std of ``train``, and :meth:`DatasetSplits.load_test`, which alone reads the test
files, only when called, and counts how often it did.

Names map to :class:`DatasetSpec` entries in :data:`DATASETS` (data, not code): each names
its files, its readers, its default validation size and where it is published. A name that
is a directory, or ``folder:PATH``, is an image folder (see :mod:`.folder`); a registered
name wins over a directory of the same name (use ``folder:mnist`` for that directory).

Files of a named dataset are searched, in order, in: ``data_dir``; ``$RESDENSE_DATA``; the
dataset's system folders (the Debian package ``dataset-fashion-mnist`` installs
``/usr/share/datasets/fashion-mnist``); the user cache ``~/.cache/resdense/<name>``. In
``data_dir`` and ``$RESDENSE_DATA`` the files may sit directly or in a subfolder named
after the dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import ConfigError, DataError
from . import cifar, folder, idx, synthetic
from .download import Remote, RemoteFile, atomic_write_bytes, cache_dir, extract_tar, fetch, md5_file

log = logging.getLogger(__name__)

ReadTest = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 and their labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet.images must be uint8 (N, C, H, W); got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"ImageSet.labels must be int64 ({self.images.shape[0]},); got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageSet(n={n}, shape=({c}, {h}, {w}))"


@dataclass(eq=False)
class DatasetSplits:
    """A dataset ready to train on: train/val in memory, the test split behind :meth:`load_test`."""

    name: str
    classes: list[str]
    train: ImageSet
    val: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    test_reads: int = 0
    source: str = ""  # where the files were found (or how the data was made)
    _read_test: ReadTest | None = field(default=None, repr=False)

    @property
    def in_chans(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load_test(self) -> ImageSet:
        """Read the test split now (never earlier); each call reads it again and counts once."""
        if self._read_test is None:
            raise DataError(f"{self.name} has no test split")
        test = ImageSet(*self._read_test())
        if test.images.shape[1:] != self.train.images.shape[1:]:
            raise DataError(f"{self.name}: test images are {tuple(test.images.shape[1:])} but training images are "
                            f"{tuple(self.train.images.shape[1:])}; the files do not belong together")
        _check_labels(test, self.num_classes, f"{self.name} test split ({self.source})")
        self.test_reads += 1
        return test


@dataclass(frozen=True)
class ReadOptions:
    """Reader settings that only some datasets take (image folders)."""

    bad_images: str = "error"
    image_size: int | tuple[int, int] | None = None
    test_ratio: float = 0.1
    cache_root: Path | None = None


@dataclass
class RawDataset:
    """What a reader returns: the whole training files, and the test files behind a callable."""

    classes: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    read_test: ReadTest
    fingerprint: str  # identifies the files' versions, for the statistics cache
    source: str
    val: tuple[torch.Tensor, torch.Tensor] | None = None  # the dataset's own validation files


Reader = Callable[["DatasetSpec", Mapping[str, Path], ReadOptions], RawDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset. ``files`` maps a role to the relative paths that may hold it (first
    found wins); ``checksums`` the MD5 of a role's decompressed content where published."""

    name: str
    reader: Reader
    default_val: int | float  # images, or a fraction of the training files
    aliases: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    checksums: Mapping[str, str] = field(default_factory=dict)
    system_dirs: tuple[str, ...] = ()
    remote: Remote | None = None
    install_hint: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


# --- readers: (spec, found files, options) -> RawDataset -------------------------------------


def _read_idx_dataset(spec: DatasetSpec, found: Mapping[str, Path], opts: ReadOptions) -> RawDataset:
    md5 = spec.checksums.get
    train = idx.read_idx_pair(found["train_images"], found["train_labels"],
                              images_md5=md5("train_images"), labels_md5=md5("train_labels"))
    read_test = functools.partial(idx.read_idx_pair, found["test_images"], found["test_labels"],
                                  images_md5=md5("test_images"), labels_md5=md5("test_labels"))
    return RawDataset(list(spec.classes), train, read_test, _fingerprint(found["train_images"], found["train_labels"]),
                      str(found["train_images"].parent))


def _read_cifar_dataset(spec: DatasetSpec, found: Mapping[str, Path], opts: ReadOptions) -> RawDataset:
    label_key, names_key = spec.params["label_key"], spec.params["names_key"]
    train_files = [found[k] for k in spec.params["train_roles"]]
    classes = cifar.read_meta(found["meta"], names_key)
    train = cifar.read_batches(train_files, label_key)
    read_test = functools.partial(cifar.read_batches, [found["test"]], label_key)
    return RawDataset(classes, train, read_test, _fingerprint(*train_files), str(found["meta"].parent))


def _read_synthetic(spec: DatasetSpec, found: Mapping[str, Path], opts: ReadOptions) -> RawDataset:
    p = dict(spec.params)
    seed = p.pop("seed")
    n_train, n_test = p.pop("num_train"), p.pop("num_test")
    train = synthetic.make_synthetic(n_train, seed=seed + synthetic.TRAIN_SEED_OFFSET, **p)
    read_test = functools.partial(synthetic.make_synthetic, n_test, seed=seed + synthetic.TEST_SEED_OFFSET, **p)
    classes = [f"class{k}" for k in range(p["num_classes"])]
    desc = f"generated ({p['in_chans']}x{p['size']}x{p['size']}, seed {seed})"
    return RawDataset(classes, train, read_test, json.dumps(spec.params, sort_keys=True), desc)


def _read_folder(path: str | os.PathLike, opts: ReadOptions) -> RawDataset:
    data = folder.load_image_folder(path, cache_root=opts.cache_root, image_size=opts.image_size,
                                    test_ratio=opts.test_ratio, bad_images=opts.bad_images)
    return RawDataset(data.classes, data.train, data.read_test, data.fingerprint, str(data.root), val=data.val)


def _fingerprint(*paths: Path) -> str:
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


# --- the registry ----------------------------------------------------------------------------


def _idx_files() -> dict[str, tuple[str, ...]]:
    stems = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    # Some mirrors name the raw files train-images.idx3-ubyte.
    return {role: (f"{s}.gz", s, s.replace("-idx", ".idx")) for role, s in stems.items()}


def _cifar_files(folder_name: str, roles: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    return {role: (f"{folder_name}/{fname}", fname) for role, fname in roles.items()}


def _idx_remote(mirror: str, *md5s: str) -> Remote:
    """The four MNIST-layout .gz files at ``mirror`` with their published MD5s, in the order
    train-images, train-labels, t10k-images, t10k-labels."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return Remote((mirror,), tuple(RemoteFile(f, m) for f, m in zip(names, md5s, strict=True)))


_DOWNLOAD_HINT = "pass --download (download=True) to fetch it from the official mirror"

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({spec.name: spec for spec in (
    DatasetSpec(
        name="fashion-mnist", reader=_read_idx_dataset, default_val=5000, aliases=("fashion_mnist", "fmnist"),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        files=_idx_files(),
        # MD5 of the decompressed files: the Debian package recompresses the .gz files, so their
        # own MD5s differ from the published ones while the contents are identical.
        checksums={"train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a", "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
                   "test_images": "8181f5470baa50b63fa0f6fddb340f0a", "test_labels": "15d484375f8d13e6eb1aabb0c3f46965"},
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        # The .gz MD5s published in the zalando/fashion-mnist README.
        remote=_idx_remote("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                           "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                           "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        install_hint=f"install it with `sudo apt-get install dataset-fashion-mnist`, or {_DOWNLOAD_HINT}",
    ),
    DatasetSpec(
        name="mnist", reader=_read_idx_dataset, default_val=5000,
        classes=tuple(str(d) for d in range(10)),
        files=_idx_files(),
        checksums={"train_images": "6bbc9ace898e44ae57da46a324031adb", "train_labels": "a25bea736e30d166cdddb491f175f624",
                   "test_images": "2646ac647ad5339dbf082846283269ea", "test_labels": "27ae3e4e09519cfbb04c329615203637"},
        remote=_idx_remote("https://ossci-datasets.s3.amazonaws.com/mnist/",
                           "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                           "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        install_hint=f"{_DOWNLOAD_HINT}, or put the four MNIST .gz files in --data-dir",
    ),
    DatasetSpec(
        name="cifar10", reader=_read_cifar_dataset, default_val=5000, aliases=("cifar-10", "cifar_10"),
        files=_cifar_files("cifar-10-batches-py", {
            "meta": cifar.CIFAR10_META, "test": cifar.CIFAR10_TEST, **{f: f for f in cifar.CIFAR10_TRAIN}}),
        remote=Remote(("https://www.cs.toronto.edu/~kriz/",),
                      (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", extract=True),)),
        install_hint=f"{_DOWNLOAD_HINT}, or unpack cifar-10-python.tar.gz in --data-dir",
        params={"label_key": "labels", "names_key": "label_names", "train_roles": cifar.CIFAR10_TRAIN},
    ),
    DatasetSpec(
        name="cifar100", reader=_read_cifar_dataset, default_val=5000, aliases=("cifar-100", "cifar_100"),
        files=_cifar_files("cifar-100-python", {
            "meta": cifar.CIFAR100_META, "test": cifar.CIFAR100_TEST, "train": cifar.CIFAR100_TRAIN}),
        remote=Remote(("https://www.cs.toronto.edu/~kriz/",),
                      (RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", extract=True),)),
        install_hint=f"{_DOWNLOAD_HINT}, or unpack cifar-100-python.tar.gz in --data-dir",
        params={"label_key": "fine_labels", "names_key": "fine_label_names", "train_roles": ("train",)},
    ),
    DatasetSpec(
        name="synthetic", reader=_read_synthetic, default_val=0.1,
        params={"seed": 0, "num_train": 4000, "num_test": 1000, "in_chans": 1, "size": 16, "num_classes": 10},
    ),
    DatasetSpec(
        name="synthetic-rgb", reader=_read_synthetic, default_val=0.1, aliases=("synthetic_rgb",),
        params={"seed": 0, "num_train": 4000, "num_test": 1000, "in_chans": 3, "size": 16, "num_classes": 10},
    ),
)})

_NAMES: Mapping[str, str] = MappingProxyType(
    {alias: spec.name for spec in DATASETS.values() for alias in (spec.name, *spec.aliases)})
FOLDER_PREFIX = "folder:"
FOLDER_DEFAULT_VAL = 0.1


def dataset_names() -> list[str]:
    """The canonical dataset names (image folders come as a path or ``folder:PATH``)."""
    return list(DATASETS)


# --- locating files --------------------------------------------------------------------------


def search_roots(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> list[tuple[Path, bool]]:
    """(folder, whether its dataset-named subfolders count too) in search order."""
    roots = [(Path(r).expanduser(), True) for r in (data_dir, os.environ.get("RESDENSE_DATA") or None)
             if r is not None]
    roots += [(Path(d), False) for d in spec.system_dirs]
    roots.append((cache_dir() / spec.name, False))
    return roots


def search_dirs(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for ``spec``'s files, in order."""
    dirs: list[Path] = []
    for root, subfolders in search_roots(spec, data_dir):
        dirs.append(root)
        if subfolders:
            dirs += [root / n for n in (spec.name, *spec.aliases)]
    return list(dict.fromkeys(dirs))


def _match(spec: DatasetSpec, directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The files of ``spec`` found in ``directory``, and the roles missing there."""
    found, missing = {}, []
    for role, options in spec.files.items():
        path = next((directory / o for o in options if (directory / o).is_file()), None)
        if path is None:
            missing.append(options[0])
        else:
            found[role] = path
    return found, missing


def _unpack_archives(spec: DatasetSpec, directory: Path) -> None:
    """Unpack a downloaded archive of ``spec`` found (verified) in ``directory``."""
    for rf in spec.remote.files if spec.remote else ():
        archive = directory / rf.filename
        if rf.extract and archive.is_file():
            if md5_file(archive) != rf.md5:
                raise DataError(f"{archive}: MD5 differs from the published {rf.md5}; delete it and download it again")
            extract_tar(archive, directory)


def locate(spec: DatasetSpec, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> dict[str, Path]:
    """The paths of ``spec``'s files, from the first search folder that has them all; with
    ``download``, fetch them (into ``data_dir`` or the cache) when no folder does."""
    dirs = search_dirs(spec, data_dir)
    partial = None
    for d in dirs:
        if not d.is_dir():
            continue
        found, missing = _match(spec, d)
        if missing and any((d / rf.filename).is_file() for rf in (spec.remote.files if spec.remote else ())):
            _unpack_archives(spec, d)
            found, missing = _match(spec, d)
        if not missing:
            return found
        if found and partial is None:
            partial = f"{d} lacks {', '.join(missing)}"
    if download and spec.remote is not None:
        target = Path(data_dir).expanduser() if data_dir is not None else cache_dir() / spec.name
        fetch(spec.remote, target, dataset=spec.name)
        found, missing = _match(spec, target)
        if not missing:
            return found
        raise DataError(f"downloaded {spec.name} into {target}, but {', '.join(missing)} is still missing")
    where = ", ".join(f"{r} (or its {spec.name}/ subfolder)" if sub else str(r)
                      for r, sub in search_roots(spec, data_dir))
    note = f" ({partial})" if partial else ""
    raise DataError(f"{spec.name} not found: looked in {where}{note}; {spec.install_hint}")


# --- splitting and statistics ----------------------------------------------------------------


def split_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a seeded random hold-out of ``val_size`` of ``n``; both sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    # A mask instead of torch.sort, which takes ~0.3 s for 55k indices on some CPU builds.
    held_out = np.zeros(n, dtype=bool)
    held_out[perm[:val_size]] = True
    return torch.from_numpy(np.flatnonzero(~held_out)), torch.from_numpy(np.flatnonzero(held_out))


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of uint8 ``images`` (N, C, H, W), in [0, 1] units.

    Exact: per-channel histograms are counted over chunks of images (no float copy of the set),
    then the moments are combined in integer arithmetic and rounded once to float64.
    """
    n, c = images.shape[:2]
    if n == 0:
        raise DataError("cannot compute statistics of an empty training split")
    hist = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, n, chunk):
        block = images[start:start + chunk]
        for ch in range(c):  # a loop over channels; each bincount covers a whole chunk
            hist[ch] += torch.bincount(block[:, ch].reshape(-1), minlength=256)
    means, stds = [], []
    for counts in hist.tolist():
        count = sum(counts)
        s1 = sum(v * k for v, k in enumerate(counts))
        s2 = sum(v * v * k for v, k in enumerate(counts))
        means.append(s1 / (count * 255))
        stds.append(((count * s2 - s1 * s1) / (count * count)) ** 0.5 / 255)
    return tuple(means), tuple(stds)


def _stats(name: str, raw: RawDataset, train: ImageSet, val_key: Any, split_seed: int,
           cache_root: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Train-split statistics, from a small JSON cache keyed by the dataset and split parameters."""
    params = {"version": 1, "dataset": name, "files": raw.fingerprint, "val_size": val_key,
              "split_seed": split_seed, "train_count": len(train), "shape": list(train.images.shape[1:])}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]
    slug = name if name in DATASETS else "folder"
    path = cache_root / "stats" / f"{slug}-{key}.json"
    cached = _read_stats(path, params, train.images.shape[1])
    if cached is not None:
        return cached
    mean, std = channel_stats(train.images)
    try:
        atomic_write_bytes(path, json.dumps({"params": params, "mean": mean, "std": std}, indent=1).encode())
    except OSError as e:
        log.warning("cannot cache dataset statistics in %s (%s)", path, e)
    return mean, std


def _read_stats(path: Path, params: dict, chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        mean, std = tuple(float(v) for v in obj["mean"]), tuple(float(v) for v in obj["std"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if obj.get("params") != params or len(mean) != chans or len(std) != chans:
        return None
    return mean, std


def _check_labels(s: ImageSet, num_classes: int, where: str) -> None:
    if len(s) and (int(s.labels.min()) < 0 or int(s.labels.max()) >= num_classes):
        raise DataError(f"{where}: labels run from {int(s.labels.min())} to {int(s.labels.max())}, outside the "
                        f"{num_classes} classes 0..{num_classes - 1}; the files are corrupt or mismatched")


# --- the entry point -------------------------------------------------------------------------


def _check_data_dir(data_dir: str | os.PathLike | None, download: bool) -> None:
    """A --data-dir that is a file, or missing without --download, is a mistake: looking past it
    in the other search folders would train on data the user did not point at."""
    if data_dir is None:
        return
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder; give the folder that holds the dataset's files")
    if not path.exists() and not download:
        raise DataError(f"--data-dir {data_dir} does not exist; give the folder that holds the dataset's files "
                        "(or add --download to fetch them there)")


def _identify(name: str) -> tuple[DatasetSpec | None, str]:
    """A named dataset's spec and canonical name, or ``(None, path)`` for an image folder; a name
    that is neither a registered dataset, an existing folder nor ``folder:PATH`` is refused."""
    key = str(name).strip()
    canonical = _NAMES.get(key.lower())
    if canonical is not None:
        return DATASETS[canonical], canonical
    path = key[len(FOLDER_PREFIX):] if key.startswith(FOLDER_PREFIX) else key
    if key.startswith(FOLDER_PREFIX) or Path(path).expanduser().is_dir():
        return None, path
    raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(dataset_names())}, "
                    f"or give an image folder (a directory path, or folder:PATH)")


def _resolve(name: str, data_dir: str | os.PathLike | None, download: bool,
             opts: ReadOptions) -> tuple[str, RawDataset, int | float]:
    """(canonical name, raw data, default validation size) for a dataset name or folder."""
    _check_data_dir(data_dir, download)
    spec, where = _identify(name)
    if spec is not None:
        if opts.image_size is not None or opts.test_ratio is not None:
            raise ConfigError(f"image_size and test_ratio apply to image folders only, not to {where}")
        found = locate(spec, data_dir, download=download) if spec.files else {}
        return where, spec.reader(spec, found, opts), spec.default_val
    if opts.test_ratio is None:
        opts = ReadOptions(opts.bad_images, opts.image_size, 0.1, opts.cache_root)
    raw = _read_folder(where, opts)
    return f"{FOLDER_PREFIX}{raw.source}", raw, FOLDER_DEFAULT_VAL


def check_available(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False) -> None:
    """Refuse, in one line, a dataset that cannot be found, reading no image: the check a command
    makes before it writes anything (a study's folder). An image folder is scanned (its class
    folders and files listed) as loading it would be."""
    _check_data_dir(data_dir, download)
    spec, where = _identify(name)
    if spec is None:
        folder.scan_folder(Path(where).expanduser().resolve())
    elif spec.files and not download:
        locate(spec, data_dir)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
                 val_size: int | None = None, split_seed: int = 0, bad_images: str = "error",
                 image_size: int | tuple[int, int] | None = None,
                 test_ratio: float | None = None) -> DatasetSplits:
    """Load a dataset by name: train/val split in memory, statistics, lazy test split.

    ``val_size``: images held out of the training files for validation (default: 5000 for
    MNIST, Fashion-MNIST and CIFAR as in the ResNet paper; 10% for folders and synthetic;
    a folder's own ``val/`` is used when it has one). ``split_seed`` picks the hold-out.
    ``bad_images``, ``image_size`` and ``test_ratio`` apply to image folders (see :mod:`.folder`).
    """
    if bad_images not in folder.BAD_IMAGE_POLICIES:
        raise ConfigError(f"bad_images must be one of {', '.join(folder.BAD_IMAGE_POLICIES)}; got {bad_images!r}")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0):
        raise ConfigError(f"val_size must be a whole number >= 0; got {val_size!r}")
    root = cache_dir()
    opts = ReadOptions(bad_images=bad_images, image_size=image_size, test_ratio=test_ratio, cache_root=root)
    canonical, raw, default_val = _resolve(name, data_dir, download, opts)
    images, labels = raw.train
    n = labels.shape[0]
    if raw.val is not None:
        if val_size is not None:
            raise ConfigError(f"{raw.source} has its own val/ folder; leave val_size unset to use it")
        train, val, val_key = ImageSet(images, labels), ImageSet(*raw.val), "own"
    else:
        n_val = val_size if val_size is not None else (
            default_val if isinstance(default_val, int) else round(default_val * n))
        if n_val >= n:
            raise ConfigError(f"val_size {n_val} leaves no training images: {canonical} has {n} in its training "
                              f"files; choose a smaller val_size")
        train_idx, val_idx = split_indices(n, n_val, split_seed)
        train = ImageSet(images.index_select(0, train_idx), labels[train_idx]) if n_val else ImageSet(images, labels)
        val = ImageSet(images.index_select(0, val_idx), labels[val_idx])
        val_key = n_val
    for part, s in (("training", train), ("validation", val)):
        _check_labels(s, len(raw.classes), f"{canonical} {part} split ({raw.source})")
    mean, std = _stats(canonical, raw, train, val_key, split_seed, root)
    return DatasetSplits(name=canonical, classes=list(raw.classes), train=train, val=val, mean=mean, std=std,
                         source=raw.source, _read_test=raw.read_test)
