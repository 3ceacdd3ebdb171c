"""Datasets: IDX/CIFAR/folder readers, search order, downloads, splits, statistics, laziness.

Every file format is exercised on small files generated here in the official layout; the
real Fashion-MNIST (Debian package dataset-fashion-mnist) is read once when installed.
No network: downloads are served by a local http.server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from PIL import Image

from resdense.data import (
    DATASETS,
    BadImageWarning,
    channel_stats,
    dataset_names,
    load_dataset,
    make_synthetic,
    split_indices,
)
from resdense.data import cifar, datasets, download, folder, idx
from resdense.errors import ConfigError, DataError, UserError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not all((FMNIST_DIR / f).is_file() for f in FMNIST_FILES),
                                  reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Every test gets its own cache and no $RESDENSE_DATA."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("RESDENSE_DATA", raising=False)


# --- generators of files in the official formats ----------------------------------------------


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    magic = (0x800 | arr.ndim) if magic is None else magic
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.tobytes()


def write_idx_dataset(d: Path, n_train: int = 40, n_test: int = 12, gz: bool = True, seed: int = 0) -> dict:
    """The four MNIST-layout files with random 6x5 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 6, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    d.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (d / stem).write_bytes(data)
    return arrays


def patch_spec(monkeypatch, name: str, **changes):
    """Replace registry entry ``name`` for one test (the registry itself is read-only)."""
    spec = dataclasses.replace(datasets.DATASETS[name], **changes)
    monkeypatch.setattr(datasets, "DATASETS", MappingProxyType({**datasets.DATASETS, name: spec}))
    return spec


@pytest.fixture
def fake_mnist(monkeypatch):
    """MNIST without the content checksums, so generated files pass."""
    return patch_spec(monkeypatch, "mnist", checksums={})


def write_cifar_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_cifar_pickle(d / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_cifar_pickle(d / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                      b"filenames": [b"x.png"] * per_batch})
        out[name] = (data, labels)
    return out


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine = [f"class_{i:02d}".encode() for i in range(100)]
    write_cifar_pickle(d / "meta", {b"fine_label_names": fine, b"coarse_label_names": [b"c"] * 20})
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, n)]
        write_cifar_pickle(d / name, {b"fine_labels": labels, b"coarse_labels": [v // 5 for v in labels],
                                      b"data": data})
        out[name] = (data, labels)
    return out


def write_image(path: Path, size=(8, 8), mode="L", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    w, h = size
    arr = rng.integers(0, 256, (h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)


def write_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, ext: str = ".png") -> Path:
    for c in classes:
        for i in range(per_class):
            write_image(root / c / f"{i:03d}{ext}", value=hash((c, i)) % 1000)
    return root


# --- IDX ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    """The real Fashion-MNIST, loaded once with its own cache."""
    if not all((FMNIST_DIR / f).is_file() for f in FMNIST_FILES):
        pytest.skip("Fashion-MNIST not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("fm-cache")))
        mp.delenv("RESDENSE_DATA", raising=False)
        yield load_dataset("fashion-mnist")


@needs_fmnist
def test_real_fashion_mnist_idx_and_checksums():
    spec = DATASETS["fashion-mnist"]
    images, labels = idx.read_idx_pair(FMNIST_DIR / "train-images-idx3-ubyte.gz", FMNIST_DIR / "train-labels-idx1-ubyte.gz",
                                       images_md5=spec.checksums["train_images"], labels_md5=spec.checksums["train_labels"])
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.bincount().tolist() == [6000] * 10
    test_x, test_y = idx.read_idx_pair(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert test_x.shape == (10000, 1, 28, 28) and test_y.bincount().tolist() == [1000] * 10
    # The content checksums in the registry are those of the installed files' decompressed bytes.
    for role, name in zip(("train_images", "train_labels", "test_images", "test_labels"), FMNIST_FILES):
        content = gzip.decompress((FMNIST_DIR / name).read_bytes())
        assert hashlib.md5(content).hexdigest() == spec.checksums[role]
    with pytest.raises(DataError, match="contents differ from the published file"):
        idx.read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", idx.LABELS_MAGIC, md5="0" * 32)


@needs_fmnist
def test_real_fashion_mnist_dataset(fmnist):
    assert fmnist.name == "fashion-mnist" and fmnist.source == str(FMNIST_DIR)
    assert (len(fmnist.train), len(fmnist.val)) == (55000, 5000)
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.classes[9] == "Ankle boot" and fmnist.num_classes == 10
    assert fmnist.in_chans == 1 and fmnist.image_size == (28, 28)
    # Known statistics of the Fashion-MNIST training images (mean 0.2860, std 0.3530 over 60k).
    assert fmnist.mean[0] == pytest.approx(0.2860, abs=2e-3) and fmnist.std[0] == pytest.approx(0.3530, abs=2e-3)
    assert fmnist.test_reads == 0
    test = fmnist.load_test()
    assert len(test) == 10000 and fmnist.test_reads == 1
    assert int(test.labels.min()) == 0 and int(test.labels.max()) == 9


def test_idx_reads_raw_and_gzip(tmp_path):
    arrays = write_idx_dataset(tmp_path / "gz", gz=True)
    write_idx_dataset(tmp_path / "raw", gz=False)
    x_gz, y_gz = idx.read_idx_pair(tmp_path / "gz/train-images-idx3-ubyte.gz", tmp_path / "gz/train-labels-idx1-ubyte.gz")
    x_raw, y_raw = idx.read_idx_pair(tmp_path / "raw/train-images-idx3-ubyte", tmp_path / "raw/train-labels-idx1-ubyte")
    assert x_gz.shape == (40, 1, 6, 5)
    assert torch.equal(x_gz, x_raw) and torch.equal(y_gz, y_raw)
    assert torch.equal(x_gz[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


@pytest.mark.parametrize("case, pattern", [
    ("bad_gzip", "not a valid gzip file"),
    ("cut_gzip", "not a valid gzip file"),
    ("wrong_magic", "wrong IDX magic number 0x00000801, expected 0x00000803"),
    ("truncated", "truncated"),
    ("trailing", "count mismatch"),
    ("count_mismatch", "count mismatch"),
])
def test_idx_corruption_names_the_file(tmp_path, case, pattern):
    images = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    img_path, lbl_path = tmp_path / "imgs.gz", tmp_path / "lbls.gz"
    data = idx_bytes(images)
    lbl = gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8)))
    if case == "bad_gzip":
        blob = b"this is not gzip at all"
    elif case == "cut_gzip":
        blob = gzip.compress(data)[:-30]
    elif case == "wrong_magic":  # a label file where the images should be
        blob = gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8)))
    elif case == "truncated":
        blob = gzip.compress(data[:-7])
    elif case == "trailing":
        blob = gzip.compress(data + b"\0\0\0")
    else:
        blob = gzip.compress(data)
        lbl = gzip.compress(idx_bytes(np.arange(3, dtype=np.uint8)))
    img_path.write_bytes(blob)
    lbl_path.write_bytes(lbl)
    with pytest.raises(DataError, match=pattern) as err:
        idx.read_idx_pair(img_path, lbl_path)
    assert str(img_path) in str(err.value) and "\n" not in str(err.value)


# --- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_reader(tmp_path):
    batches = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, val_size=10, split_seed=3)
    assert ds.name == "cifar10" and ds.classes[:2] == ["airplane", "automobile"] and ds.num_classes == 10
    assert (len(ds.train), len(ds.val)) == (90, 10) and ds.in_chans == 3 and ds.image_size == (32, 32)
    # Reassemble the training files through the split indices: the reader keeps file order.
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    train_idx, val_idx = split_indices(100, 10, 3)
    full = torch.from_numpy(data).reshape(100, 3, 32, 32)
    assert torch.equal(ds.train.images, full[train_idx]) and torch.equal(ds.val.images, full[val_idx])
    assert ds.train.labels.tolist() == [labels[i] for i in train_idx.tolist()]
    # Pixel (channel c, row y, column x) of an image is byte c*1024 + y*32 + x of its row.
    k = int(train_idx[0])
    assert int(ds.train.images[0, 2, 5, 7]) == int(data[k, 2 * 1024 + 5 * 32 + 7])
    assert ds.test_reads == 0
    test = ds.load_test()
    assert torch.equal(test.images.reshape(20, -1), torch.from_numpy(batches["test_batch"][0]))
    assert test.labels.tolist() == batches["test_batch"][1] and ds.test_reads == 1


def test_cifar100_reader(tmp_path):
    files = write_cifar100(tmp_path)
    ds = load_dataset("cifar-100", tmp_path / "cifar-100-python", val_size=5)
    assert ds.name == "cifar100" and ds.num_classes == 100 and ds.classes[42] == "class_42"
    assert (len(ds.train), len(ds.val)) == (25, 5)
    merged = torch.cat([ds.train.labels, ds.val.labels]).sort().values
    assert merged.tolist() == sorted(files["train"][1])
    test = ds.load_test()
    assert test.labels.tolist() == files["test"][1]


def test_cifar_corrupt_missing_and_unsafe_files(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_dataset("cifar10", tmp_path)
    assert str(batch) in str(err.value)

    batch.unlink()
    with pytest.raises(DataError, match="cifar10 not found") as err:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_2" in str(err.value)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load global") as err:
        cifar.read_batch(evil, "labels")
    assert str(evil) in str(err.value) and not marker.exists()


# --- downloads ------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        self.server.hits.append(self.path)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(folder served, its base URL, list of requested paths) from a local HTTP server."""
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/", server.hits
    server.shutdown()
    server.server_close()


def test_download_verifies_checksums(http_root, monkeypatch, tmp_path):
    www, base, hits = http_root
    write_idx_dataset(www, n_train=30, n_test=10)
    md5s = [download.md5_file(www / n) for n in FMNIST_FILES]
    spec = patch_spec(monkeypatch, "mnist", checksums={}, remote=datasets._idx_remote(base, *md5s))

    dest = tmp_path / "dl"
    ds = load_dataset("mnist", dest, download=True, val_size=5)
    assert (len(ds.train), len(ds.val)) == (25, 5) and len(ds.load_test()) == 10
    assert sorted(p.name for p in dest.iterdir()) == sorted(FMNIST_FILES)  # no temporary files left
    n_hits = len(hits)
    assert n_hits == 4
    load_dataset("mnist", dest, download=True, val_size=5)
    assert len(hits) == n_hits  # present and verified: nothing fetched again

    patch_spec(monkeypatch, "mnist", remote=datasets._idx_remote(base, md5s[0], "0" * 32, *md5s[2:]))
    dest2 = tmp_path / "dl2"
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz .*has MD5 .*published checksum"):
        load_dataset("mnist", dest2, download=True, val_size=5)
    assert sorted(p.name for p in dest2.iterdir()) == [FMNIST_FILES[0]]  # the bad file never took its name

    # Without data_dir the download lands in the user cache.
    patch_spec(monkeypatch, "mnist", remote=spec.remote)
    load_dataset("mnist", download=True, val_size=5)
    assert (tmp_path / "xdg-cache" / "resdense" / "mnist" / FMNIST_FILES[0]).is_file()


def test_download_failures(http_root, tmp_path):
    www, base, _ = http_root
    remote = download.Remote((base + "nowhere/", base), (download.RemoteFile("a.bin", hashlib.md5(b"abc").hexdigest()),))
    (www / "a.bin").write_bytes(b"abc")
    # The first mirror answers 404; the second has the file.
    assert download.fetch(remote, tmp_path / "d", dataset="test") == [tmp_path / "d" / "a.bin"]
    dead = download.Remote((base + "nowhere/",), remote.files)
    with pytest.raises(DataError, match="could not download test file a.bin"):
        download.fetch(dead, tmp_path / "e", dataset="test")


def test_download_and_unpack_cifar10(http_root, monkeypatch, tmp_path):
    www, base, _ = http_root
    src = tmp_path / "src"
    write_cifar10(src, per_batch=4)
    with tarfile.open(www / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    rf = download.RemoteFile("cifar-10-python.tar.gz", download.md5_file(www / "cifar-10-python.tar.gz"), extract=True)
    patch_spec(monkeypatch, "cifar10", remote=download.Remote((base,), (rf,)))
    ds = load_dataset("cifar10", tmp_path / "dl", download=True, val_size=2)
    assert len(ds.train) == 18 and (tmp_path / "dl" / "cifar-10-batches-py" / "test_batch").is_file()


def test_unsafe_tar_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="cannot unpack") as err:
        download.extract_tar(archive, tmp_path / "out")
    assert str(archive) in str(err.value) and not (tmp_path / "escaped.txt").exists()


# --- search order and messages --------------------------------------------------------------


def test_search_order_and_aliases(tmp_path, monkeypatch, fake_mnist):
    write_idx_dataset(tmp_path / "env" / "mnist", seed=1)
    monkeypatch.setenv("RESDENSE_DATA", str(tmp_path / "env"))
    ds = load_dataset("MNIST", val_size=0)
    assert ds.source == str(tmp_path / "env" / "mnist") and len(ds.val) == 0 and len(ds.train) == 40

    write_idx_dataset(tmp_path / "given", seed=2)
    assert load_dataset("mnist", tmp_path / "given", val_size=4).source == str(tmp_path / "given")

    patch_spec(monkeypatch, "fashion-mnist", checksums={}, system_dirs=(str(tmp_path / "env" / "mnist"),))
    monkeypatch.delenv("RESDENSE_DATA")
    for alias in ("fashion-mnist", "fashion_mnist", "fmnist", "Fashion-MNIST"):
        assert load_dataset(alias, val_size=4).name == "fashion-mnist"


def test_missing_dataset_message(tmp_path, monkeypatch):
    patch_spec(monkeypatch, "fashion-mnist", system_dirs=(str(tmp_path / "nothing-here"),))
    partial = tmp_path / "partial"
    write_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", partial)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("fashion-mnist not found")
    for part in (str(partial), str(tmp_path / "nothing-here"), "sudo apt-get install dataset-fashion-mnist",
                 "--download", str(tmp_path / "xdg-cache" / "resdense" / "fashion-mnist"),
                 "lacks t10k-labels-idx1-ubyte.gz"):
        assert part in msg


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet-9000'") as err:
        load_dataset("imagenet-9000")
    for name in dataset_names():
        assert name in str(err.value)
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic"} <= set(dataset_names())
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="val_size"):
        load_dataset("synthetic", val_size=-1)
    with pytest.raises(ConfigError, match="leaves no training images"):
        load_dataset("synthetic", val_size=4000)
    with pytest.raises(ConfigError, match="bad_images"):
        load_dataset("synthetic", bad_images="ignore")
    with pytest.raises(ConfigError, match="image folders only"):
        load_dataset("synthetic", image_size=8)
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)


# --- splits, laziness, statistics -----------------------------------------------------------


def test_split_indices_disjoint_and_seeded():
    tr, va = split_indices(1000, 100, seed=5)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist()) and set(tr.tolist()) | set(va.tolist()) == set(range(1000))
    tr2, va2 = split_indices(1000, 100, seed=5)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(split_indices(1000, 100, seed=6)[1], va)


def test_dataset_split_sizes_disjoint_and_seeded():
    full_x, full_y = make_synthetic(4000, seed=0)
    a = load_dataset("synthetic", split_seed=1)
    assert (len(a.train), len(a.val)) == (3600, 400)  # 10% default
    tr, va = split_indices(4000, 400, 1)
    assert torch.equal(a.train.images, full_x[tr]) and torch.equal(a.val.images, full_x[va])
    assert torch.equal(a.val.labels, full_y[va])
    b = load_dataset("synthetic", split_seed=1)
    c = load_dataset("synthetic", split_seed=2)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)


def test_load_test_is_lazy(tmp_path, fake_mnist):
    write_idx_dataset(tmp_path)
    test_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = test_file.read_bytes()
    test_file.write_bytes(b"garbage")  # loading must not touch it
    ds = load_dataset("mnist", tmp_path, val_size=4)
    assert ds.test_reads == 0
    with pytest.raises(DataError, match="not a valid gzip file") as err:
        ds.load_test()
    assert str(test_file) in str(err.value) and ds.test_reads == 0
    test_file.write_bytes(good)
    assert len(ds.load_test()) == 12 and ds.test_reads == 1
    ds.load_test()
    assert ds.test_reads == 2


def test_stats_recomputed_equal_cached(monkeypatch, tmp_path):
    ds = load_dataset("synthetic-rgb", val_size=300)
    x = ds.train.images.double() / 255
    assert ds.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-12)
    assert ds.std == pytest.approx(tuple(x.std((0, 2, 3), unbiased=False).tolist()), abs=1e-12)
    cached = list((tmp_path / "xdg-cache" / "resdense" / "stats").glob("synthetic-rgb-*.json"))
    assert len(cached) == 1
    # A second load takes the numbers from the cache: computing them again would fail here.
    with monkeypatch.context() as mp:
        mp.setattr(datasets, "channel_stats", None)
        again = load_dataset("synthetic-rgb", val_size=300)
    assert again.mean == ds.mean and again.std == ds.std
    assert channel_stats(ds.train.images, chunk=7) == channel_stats(ds.train.images)
    # Another split is another key.
    assert load_dataset("synthetic-rgb", val_size=200).mean != ds.mean


def test_synthetic_is_deterministic_and_learnable():
    x1, y1 = make_synthetic(500, seed=3, in_chans=3)
    x2, y2 = make_synthetic(500, seed=3, in_chans=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (500, 3, 16, 16)
    assert not torch.equal(make_synthetic(500, seed=4, in_chans=3)[0], x1)
    ds = load_dataset("synthetic")
    test = ds.load_test()
    assert len(test) == 1000 and not torch.equal(test.images[:100], ds.train.images[:100])
    # A fixed phase-invariant feature (|FFT|) with nearest class centroids separates the classes.
    def spectrum(images):
        g = images.double().mean(1)
        return torch.fft.fft2(g - g.mean((1, 2), keepdim=True)).abs().flatten(1)
    feats = spectrum(ds.train.images)
    centroids = torch.stack([feats[ds.train.labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(spectrum(test.images), centroids).argmin(1) == test.labels).double().mean()
    assert accuracy > 0.9


# --- image folders --------------------------------------------------------------------------


def test_flat_folder_split_resize_and_channels(tmp_path):
    root = write_folder(tmp_path / "imgs")
    write_image(root / "dog" / "wide.png", size=(12, 6), value=7)   # resized to the common 8x8
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(root))
    assert ds.name == f"folder:{root.resolve()}" and ds.classes == ["cat", "dog", "fox"]
    assert ds.in_chans == 1 and ds.image_size == (8, 8)
    test = ds.load_test()
    # 31 images; round(10% of 10 or 11) = 1 per class held out for test, then 10% of 28 for val.
    assert len(test) == 3 and sorted(test.labels.tolist()) == [0, 1, 2]
    assert (len(ds.train), len(ds.val)) == (25, 3)
    assert len(load_dataset(f"folder:{root}", image_size=(4, 6), test_ratio=0.2, val_size=0).train) == 25
    assert load_dataset(f"folder:{root}", image_size=(4, 6)).image_size == (4, 6)
    write_image(root / "fox" / "colour.png", mode="RGB", value=9)
    assert load_dataset(f"folder:{root}").in_chans == 3


def test_nested_folder(tmp_path):
    root = tmp_path / "nested"
    write_folder(root / "train", per_class=6)
    write_folder(root / "val", per_class=2)
    write_folder(root / "test", classes=("cat", "dog"), per_class=3)
    ds = load_dataset(f"folder:{root}")
    assert (len(ds.train), len(ds.val)) == (18, 6) and ds.test_reads == 0
    test = ds.load_test()
    assert len(test) == 6 and set(test.labels.tolist()) == {0, 1}
    with pytest.raises(ConfigError, match="own val/ folder"):
        load_dataset(f"folder:{root}", val_size=3)
    # A pixel survives decoding and caching unchanged.
    arr = np.array(Image.open(root / "train" / "cat" / "000.png"))
    assert torch.equal(ds.train.images[0, 0], torch.from_numpy(arr))


def test_folder_bad_images(tmp_path):
    root = write_folder(tmp_path / "imgs")
    junk = root / "dog" / "junk.png"
    junk.write_bytes(b"definitely not a png")
    cut = root / "fox" / "cut.png"
    write_image(cut, value=3)
    cut.write_bytes(cut.read_bytes()[:60])  # a valid header, truncated pixel data
    with pytest.raises(DataError, match="cannot decode image") as err:
        load_dataset(str(root))
    assert str(junk.resolve()) in str(err.value)
    junk.unlink()
    with pytest.raises(DataError, match="cannot decode image") as err:
        load_dataset(str(root), test_ratio=0.0)
    assert str(cut.resolve()) in str(err.value)
    junk.write_bytes(b"definitely not a png")
    with pytest.warns(BadImageWarning) as record:
        ds = load_dataset(str(root), test_ratio=0.0, val_size=0, bad_images="skip")
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert any(str(junk.resolve()) in m for m in messages) and any(str(cut.resolve()) in m for m in messages)
    assert len(ds.train) == 30


def test_folder_cache_hit_and_invalidation(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs")
    first = load_dataset(str(root))
    assert list((tmp_path / "xdg-cache" / "resdense" / "folders").iterdir())
    first_test = first.load_test()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    with monkeypatch.context() as mp:
        mp.setattr(folder.Image, "open", no_decoding)
        second = load_dataset(str(root))
        second_test = second.load_test()
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.labels, second.val.labels)
    assert torch.equal(first_test.images, second_test.images)
    cached = next((tmp_path / "xdg-cache" / "resdense" / "folders").glob("*/train.pt"))
    assert set(torch.load(cached, weights_only=True)) == {"images", "labels"}

    # A changed file changes the key: decoding happens again.
    write_image(root / "cat" / "000.png", value=999)
    os.utime(root / "cat" / "000.png", ns=(1, 1))
    calls = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        calls.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(folder.Image, "open", counting_open)
    load_dataset(str(root))
    assert calls
