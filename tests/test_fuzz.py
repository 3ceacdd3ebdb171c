"""Property-based fuzzing of every reader of outside bytes: IDX files, CIFAR batches, image folders,
YAML/JSON configs, a checkpoint's meta.json, model.safetensors and state.pt, and -a/--set values.

The property, for each: an input gives a result or one UserError with a one-line message; never
another exception (a traceback), never a hang (hypothesis' deadline), never a write outside the
sandbox folder the reader was given (an audit hook watches every file opened for writing,
created, renamed or removed while a reader runs). Run with ``--hypothesis-show-statistics`` to
see how many inputs each target ran.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resdense.errors import UserError

FAST = settings(max_examples=120, deadline=5000, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class _WriteWatch:
    """An audit hook (they cannot be removed, so it is installed once and switched on per call)
    that records writes outside ``allowed``."""

    EVENTS = {"os.mkdir": 0, "os.rename": 1, "os.remove": 0, "os.rmdir": 0, "os.symlink": 1,
              "shutil.rmtree": 0, "os.truncate": 0, "os.chmod": 0}

    def __init__(self) -> None:
        self.allowed: Path | None = None
        self.violations: list[str] = []

    def __call__(self, event: str, args: tuple) -> None:
        if self.allowed is None:
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if not writing:
                return
        elif event in self.EVENTS:
            path = args[self.EVENTS[event]]
        else:
            return
        if path is None or isinstance(path, int):
            return
        target = Path(os.fsdecode(os.fspath(path))).absolute()
        if not target.is_relative_to(self.allowed):
            self.violations.append(f"{event} {target}")


_WATCH = _WriteWatch()
sys.addaudithook(_WATCH)


def read_outside_bytes(sandbox: Path, fn, *args, **kwargs):
    """Run a reader: a result, or the UserError it raised (with a one-line message)."""
    _WATCH.allowed, _WATCH.violations = sandbox.resolve(), []
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))
        return e
    finally:
        _WATCH.allowed = None
        assert not _WATCH.violations, _WATCH.violations


@pytest.fixture(scope="module")
def sandbox_root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def fresh(root: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=root))
    return d


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    """``data`` with bytes replaced at (position, value) and optionally truncated."""
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[:cut] if cut is not None else buf)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)
CUTS = st.one_of(st.none(), st.integers(0, 4096))


# --- IDX ----------------------------------------------------------------------------------------

@st.composite
def idx_files(draw):
    from resdense.data.idx import IMAGES_MAGIC, LABELS_MAGIC

    kind = draw(st.sampled_from(["random", "structured"]))
    if kind == "random":
        data = draw(st.binary(max_size=300))
    else:
        magic = draw(st.sampled_from([IMAGES_MAGIC, LABELS_MAGIC, 0x0803, 0x00000804, 0x08030000]))
        ndim = draw(st.integers(0, 4))
        dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), min_size=ndim, max_size=ndim))
        payload = draw(st.binary(max_size=200))
        data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload
    if draw(st.booleans()):
        data = mutate(gzip.compress(data), draw(EDITS), draw(CUTS))
    return data, draw(st.sampled_from(["images.gz", "images", "labels-idx1-ubyte"]))


@FAST
@given(idx_files())
def test_fuzz_idx(sandbox_root, case):
    from resdense.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx_images, read_idx_labels, read_idx_pair

    data, name = case
    box = fresh(sandbox_root)
    path = box / name
    path.write_bytes(data)
    images = read_outside_bytes(box, read_idx_images, path)
    if isinstance(images, torch.Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4
    labels = read_outside_bytes(box, read_idx_labels, path)
    assert isinstance(labels, (torch.Tensor, UserError))
    read_outside_bytes(box, read_idx_pair, path, path)
    shutil.rmtree(box)


# --- CIFAR --------------------------------------------------------------------------------------

_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                  st.binary(max_size=8), st.text(max_size=8))


@st.composite
def cifar_pickles(draw):
    n = draw(st.integers(0, 3))
    valid = np.zeros((n, 3072), np.uint8)
    data = draw(st.sampled_from([valid, valid, valid, np.zeros((n, 3071), np.uint8), np.zeros((n, 3072), np.float32),
                                 np.zeros((n,), np.uint8), np.zeros((n, 3072), object), "not an array", None]))
    labels = draw(st.one_of(st.lists(st.integers(-2**70, 2**70) | st.integers(-2, 12), min_size=n, max_size=n),
                            st.lists(_LEAF, min_size=n, max_size=n), st.lists(_LEAF, max_size=4), _LEAF,
                            st.just(np.arange(n, dtype=np.int32)), st.just(np.full(n, 1.5))))
    obj = draw(st.sampled_from(["dict", "list", "leaf"]))
    if obj == "dict":
        value = {b"data": data, draw(st.sampled_from([b"labels", b"labels", b"fine_labels", b"other"])): labels,
                 b"label_names": draw(st.lists(_LEAF, max_size=3))}
    elif obj == "list":
        value = [data, labels]
    else:
        value = draw(_LEAF)
    raw = pickle.dumps(value, protocol=draw(st.integers(0, 5)))
    return mutate(raw, draw(EDITS), draw(CUTS)) if draw(st.booleans()) else raw


@FAST
@given(cifar_pickles())
def test_fuzz_cifar(sandbox_root, raw):
    from resdense.data.cifar import read_batch, read_meta

    box = fresh(sandbox_root)
    path = box / "data_batch_1"
    path.write_bytes(raw)
    out = read_outside_bytes(box, read_batch, path, "labels")
    if isinstance(out, tuple):
        images, labels = out
        assert images.shape[1:] == (3, 32, 32) and labels.shape == images.shape[:1]
        assert len(labels) == 0 or int(labels.min()) >= 0  # a label is a class index
    read_outside_bytes(box, read_meta, path, "label_names")
    shutil.rmtree(box)


# --- image folders ------------------------------------------------------------------------------

def _image_bytes(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def image_files(draw):
    kind = draw(st.sampled_from(["valid", "mutated", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=200)), draw(st.sampled_from([".png", ".jpg", ".bmp", ".webp"]))
    fmt, ext = draw(st.sampled_from([("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("GIF", ".png"),
                                     ("WEBP", ".webp"), ("TIFF", ".png")]))
    mode = draw(st.sampled_from(["L", "RGB"] + (["RGBA", "I;16", "P", "1"] if fmt in ("PNG", "TIFF") else [])))
    data = _image_bytes(fmt, mode, (draw(st.integers(1, 12)), draw(st.integers(1, 12))))
    return (mutate(data, draw(EDITS), draw(CUTS)) if kind == "mutated" else data), ext


@settings(FAST, max_examples=60)
@given(st.lists(image_files(), min_size=2, max_size=4), st.sampled_from(["error", "skip"]))
def test_fuzz_image_folder(sandbox_root, files, policy):
    import warnings

    from resdense.data.folder import load_image_folder

    box = fresh(sandbox_root)
    root = box / "images"
    for i, (data, ext) in enumerate(files):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / f"img{i}{ext}").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skip" warns about each bad image: that is its job
        out = read_outside_bytes(box, load_image_folder, root, cache_root=box / "cache", bad_images=policy)
        if not isinstance(out, UserError):
            images, labels = out.train
            assert images.dtype == torch.uint8 and images.shape[1] == out.in_chans and len(images) == len(labels)
            read_outside_bytes(box, out.read_test)
            # A second load reads the cache it wrote.
            read_outside_bytes(box, load_image_folder, root, cache_root=box / "cache", bad_images=policy)
    shutil.rmtree(box)


# --- configs and -a / --set ---------------------------------------------------------------------

_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(),
                               st.text(max_size=10)),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=10)


def _config_pipeline(values):
    """What happens to a config's values before training starts: typed, validated, saved as JSON."""
    from resdense.train.config import TrainConfig, apply_overrides, validate

    cfg = validate(apply_overrides(TrainConfig(epochs=1), values, "fuzz"))
    json.dumps(cfg.to_dict(), allow_nan=False)
    return cfg


@st.composite
def config_files(draw):
    from resdense.train.config import FIELDS

    suffix = draw(st.sampled_from([".yaml", ".yml", ".json"]))
    kind = draw(st.sampled_from(["fields", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), suffix
    if kind == "text":
        return draw(st.text(max_size=200)).encode(), suffix
    value = draw(st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6) | st.integers(), _JSON,
                                 max_size=4))
    if suffix == ".json":
        text = json.dumps({str(k) if draw(st.booleans()) else k: v for k, v in value.items()}
                          if all(isinstance(k, str) for k in value) else {str(k): v for k, v in value.items()})
    else:
        import yaml

        text = yaml.safe_dump(value)
    return mutate(text.encode(), draw(EDITS), draw(CUTS)) if draw(st.booleans()) else text.encode(), suffix


@settings(FAST, max_examples=200)
@given(config_files())
def test_fuzz_config_files(sandbox_root, case):
    from resdense.train.config import load_config_file

    data, suffix = case
    box = fresh(sandbox_root)
    path = box / f"config{suffix}"
    path.write_bytes(data)

    def load():
        return _config_pipeline(load_config_file(path))

    read_outside_bytes(box, load)
    shutil.rmtree(box)


_LITERALS = st.one_of(_JSON.map(repr), st.text(max_size=30),
                      st.sampled_from(["1e999", "-1e999", "nan", "(" * 300 + ")" * 300, "-" * 500 + "1",
                                       "{1, 2}", "1j", "b'x'", "[1, 'a']", "{1: 2}", "9" * 5000, "None", "()"]))


@settings(FAST, max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["lr", "epochs", "milestones", "model_kwargs", "threads", "seed",
                                           "precision", "checkpoint_every", "batch_size", "depth", "shortcut"])
                          | st.text(max_size=6), _LITERALS), max_size=3),
       st.booleans())
def test_fuzz_arg_and_set_values(sandbox_root, items, as_model_args):
    from resdense.cli._util import parse_overrides

    words = [f"{k}={v}" for k, v in items]

    def parse():
        values = parse_overrides(words)
        return _config_pipeline({"model_kwargs": values} if as_model_args else values)

    read_outside_bytes(sandbox_root, parse)


# --- checkpoints: meta.json, model.safetensors, state.pt ----------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real resdense checkpoint (one epoch of a tiny run) and a run context to resume it into."""
    from resdense.train.config import TrainConfig, apply_overrides
    from resdense.train.runner import build_context, train

    run = tmp_path_factory.mktemp("fuzzckpt") / "run"
    cfg = apply_overrides(TrainConfig(), dict(model="cifar_resnet", model_kwargs={"depth": 8}, data="synthetic",
                                              epochs=1, batch_size=64, train_subset=128, eval_batch_size=256,
                                              progress=False, precision="fp32", out=str(run)), "test")
    train(cfg)
    point = (run / "last").resolve()
    return point, build_context(cfg)


def _fuzzed_checkpoint(root: Path, point: Path, name: str, data: bytes) -> Path:
    box = fresh(root)
    shutil.copytree(point, box / "ckpt")
    (box / "ckpt" / name).write_bytes(data)
    return box


@settings(FAST, max_examples=120)
@given(st.data())
def test_fuzz_meta_json(sandbox_root, checkpoint, data):
    from resdense.train.checkpoint import META_FILE, load_for_inference

    point, _ = checkpoint
    real = (point / META_FILE).read_bytes()
    meta = json.loads(real)
    kind = data.draw(st.sampled_from(["bytes", "values", "json"]))
    if kind == "bytes":
        raw = mutate(real, data.draw(EDITS), data.draw(CUTS))
    elif kind == "values":
        key = data.draw(st.sampled_from(["model", "model_kwargs", "classes", "input_size", "mean", "std"]))
        raw = json.dumps({**meta, key: data.draw(_JSON)}).encode()
    else:
        raw = json.dumps(data.draw(_JSON)).encode()
    box = _fuzzed_checkpoint(sandbox_root, point, META_FILE, raw)
    read_outside_bytes(box, load_for_inference, box / "ckpt")
    shutil.rmtree(box)


@settings(FAST, max_examples=120)
@given(st.data())
def test_fuzz_safetensors(sandbox_root, checkpoint, data):
    from resdense.train.checkpoint import MODEL_FILE, load_for_inference

    point, _ = checkpoint
    real = (point / MODEL_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", real[:8])
    kind = data.draw(st.sampled_from(["header", "anywhere", "random", "json"]))
    if kind == "header":  # the JSON header is where a parser can go wrong
        edits = [(p % (header_len + 8), v) for p, v in data.draw(EDITS)]
        raw = mutate(real, edits, data.draw(CUTS))
    elif kind == "anywhere":
        raw = mutate(real, data.draw(EDITS), data.draw(st.one_of(st.none(), st.integers(0, len(real)))))
    elif kind == "random":
        raw = data.draw(st.binary(max_size=64))
    else:
        header = json.dumps(data.draw(_JSON)).encode()
        raw = struct.pack("<Q", len(header)) + header + data.draw(st.binary(max_size=64))
    box = _fuzzed_checkpoint(sandbox_root, point, MODEL_FILE, raw)
    read_outside_bytes(box, load_for_inference, box / "ckpt")
    shutil.rmtree(box)


@settings(FAST, max_examples=120)
@given(st.data())
def test_fuzz_state_pt(sandbox_root, checkpoint, data):
    from resdense.train.checkpoint import STATE_FILE, read_state
    from resdense.train.runner import _restore

    point, ctx = checkpoint
    real = (point / STATE_FILE).read_bytes()
    kind = data.draw(st.sampled_from(["bytes", "fields", "random"]))
    if kind == "bytes":
        raw = mutate(real, data.draw(EDITS), data.draw(CUTS))
    elif kind == "random":
        raw = data.draw(st.binary(max_size=200))
    else:  # a well-formed file whose fields are wrong
        state = torch.load(point / STATE_FILE, weights_only=True)
        key = data.draw(st.sampled_from(sorted(state) + ["position"]))
        value = data.draw(st.one_of(_JSON, st.just(torch.zeros(3)), st.just({"torch": torch.zeros(4, dtype=torch.uint8)}),
                                    st.just({"epoch": state["epoch"], "batch": 1, "epoch_seed": 1, "progress": {},
                                             "epoch_time": 0.0, "wall_time": 0.0})))
        buf = io.BytesIO()
        torch.save({**state, key: value}, buf)
        raw = buf.getvalue()
    box = _fuzzed_checkpoint(sandbox_root, point, STATE_FILE, raw)
    read_outside_bytes(box, read_state, box / "ckpt")
    model_before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    read_outside_bytes(box, _restore, ctx, box / "ckpt")
    ctx.model.load_state_dict(model_before)
    shutil.rmtree(box)
