"""Weights trained elsewhere, as a resdense model.

resdense's modules carry torchvision's names, so a torchvision or timm ResNet/DenseNet state
dict loads as it is, and the CIFAR ResNets with shortcut option A are laid out like the most
used public CIFAR ResNet checkpoints once their classifier (``linear``) is renamed ``fc``. This
module turns such files into a model:

1. :func:`read_checkpoint` reads the file safely: safetensors, or ``torch.load`` with
   ``weights_only=True`` and ``map_location="cpu"`` (files saved on a GPU load on a CPU-only
   machine); a file that needs pickled code is refused.
2. :func:`find_state_dict` finds the state dict inside a wrapper (``{"state_dict": ...}``,
   ``{"model": ...}`` ...), and :func:`rename_keys` strips ``module.`` / ``_orig_mod.``
   prefixes and applies the layout's renames (data in :data:`LAYOUTS`, not code).
3. :func:`build_from_state_dict` builds the named model with ``num_classes`` and
   ``in_chans`` read from the weights' shapes and loads them strictly: every missing,
   unexpected or mis-shaped key is listed (:func:`mismatch_report`), never a partial load.
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Population statistics of the CIFAR-10 training images (the often-copied 0.2023/0.1994/0.2010
# are the std of per-image means, not of pixels).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_PREFIXES = ("module.", "_orig_mod.")
# Where training scripts nest the weights, in the order they are tried (timm: state_dict, then
# its EMA copy; many scripts: model / model_state_dict / net).
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "net", "module")


@dataclass(frozen=True)
class Layout:
    """How one family of foreign checkpoints differs from resdense's names, and what its weights
    expect at the input (normalisation, image size) and name at the output (classes)."""

    name: str
    description: str
    renames: tuple[tuple[str, str], ...]  # (regex, replacement), applied to every key in order
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    classes: tuple[str, ...] = ()         # default names, used when the head has this many outputs
    data: Optional[str] = None            # the dataset such weights are trained on (eval's default)
    stats: str = "ImageNet's"             # whose mean and std ``mean``/``std`` are, in words


# torchvision < 0.4 DenseNets named the layers inside a dense layer "norm.1", "conv.2" ...;
# torchvision itself renames them on load, so do we.
_OLD_DENSENET = (r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.")

LAYOUTS: Mapping[str, Layout] = {layout.name: layout for layout in (
    Layout("torchvision", "torchvision state dict (ImageNet weights)", (_OLD_DENSENET,),
           IMAGENET_MEAN, IMAGENET_STD, 224),
    Layout("timm", "timm checkpoint (ImageNet weights)", (_OLD_DENSENET,), IMAGENET_MEAN, IMAGENET_STD, 224),
    # The CIFAR-repository layout: `linear` classifier; option-B repositories call the
    # projection shortcut `shortcut` (conv, bn) where resdense (and torchvision) say `downsample`.
    Layout("cifar", "CIFAR-repository checkpoint (CIFAR-10 weights)",
           ((r"^linear\.", "fc."), (r"\.shortcut\.([01])\.", r".downsample.\1.")),
           CIFAR10_MEAN, CIFAR10_STD, 32, CIFAR10_CLASSES, "cifar10", "CIFAR-10's"),
)}
FORMATS = ("auto", "resdense", *LAYOUTS)


# --- the normalisation the weights were trained with, where the source stores it -------------

# (mean, std) names: plain, RobustBench's `mu`/`sigma` buffers, the robustness library's normaliser.
_STAT_NAMES = (("mean", "std"), ("mu", "sigma"), ("new_mean", "new_std"))
# Entries of a checkpoint (or of a config.json beside it) that may hold mean and std: timm's
# pretrained_cfg / data config, training scripts' saved arguments and hyper-parameters.
_STAT_HOLDERS = ("normalization", "normalisation", "normalize", "normalizer", "norm", "pretrained_cfg",
                 "default_cfg", "data_config", "config", "cfg", "args", "hparams", "hyper_parameters")
MAX_CHANNELS = 4  # mean/std of more values than an image has channels are not a normalisation


@dataclass(frozen=True)
class Normalisation:
    """The mean and std the weights' inputs were normalised with, and where they were found."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    where: str


def _stat_values(value: Any) -> Optional[tuple[float, ...]]:
    if isinstance(value, torch.Tensor):
        # A float32 buffer holds 0.4 as 0.4000000059...: keep the 7 digits it carries.
        digits = 16 if value.dtype == torch.float64 else 7
        value = [float(f"{v:.{digits}g}") for v in value.detach().flatten().tolist()] \
            if value.is_floating_point() and value.numel() <= MAX_CHANNELS else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_CHANNELS:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    return tuple(float(v) for v in value)


def _stat_pair(mapping: Mapping[str, Any], prefix: str = "") -> Optional[tuple[str, str, tuple, tuple]]:
    """The first (mean key, std key, mean, std) of ``mapping`` (keys ``prefix`` + a name pair)."""
    for m, s in _STAT_NAMES:
        mean, std = _stat_values(mapping.get(prefix + m)), _stat_values(mapping.get(prefix + s))
        if mean and std and len(mean) == len(std) and all(v > 0 for v in std):
            return prefix + m, prefix + s, mean, std
    return None


def _in_mapping(obj: Mapping[str, Any], where: str) -> Optional[Normalisation]:
    for holder, inner in [("", obj), *((k, obj[k]) for k in _STAT_HOLDERS if isinstance(obj.get(k), Mapping))]:
        found = _stat_pair(inner)
        if found:
            return Normalisation(found[2], found[3], f"{where}'s {holder!r} entry" if holder else where)
    return None


def _in_buffers(state: Mapping[str, torch.Tensor]) -> tuple[Optional[Normalisation], tuple[str, ...]]:
    """Normalisation stored as buffers of a wrapping module (``normalizer.new_mean`` ...), and their keys."""
    prefixes = sorted({key.rsplit(".", 1)[0] + "." if "." in key else "" for key in state}, key=len)
    for prefix in prefixes:
        found = _stat_pair(state, prefix)
        if found:
            return Normalisation(found[2], found[3], f"its buffers {found[0]}/{found[1]}"), found[:2]
    return None, ()


def _beside(path: Path) -> Optional[Normalisation]:
    """A safetensors header's metadata, else a Hugging Face ``config.json`` beside the file (timm
    keeps mean and std in its ``pretrained_cfg``)."""
    import json

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = dict(f.metadata() or {})
        decoded = {}
        for key, text in header.items():
            try:
                decoded[key] = json.loads(text)
            except ValueError:
                decoded[key] = text
        found = _in_mapping(decoded, "its safetensors header")
        if found is None and isinstance(decoded.get("resdense"), Mapping):
            found = _in_mapping(decoded["resdense"], "its safetensors header")
        if found:
            return found
    config = path.parent / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, ValueError):
        return None  # not the model's config after all: the layout's defaults apply, and are announced
    return _in_mapping(data, str(config)) if isinstance(data, Mapping) else None


def take_normalisation(obj: Any, state: dict[str, torch.Tensor], path: str | Path) -> tuple[
        dict[str, torch.Tensor], Optional[Normalisation]]:
    """The normalisation ``path`` stores (in its wrapper, as buffers of its state dict, in its
    safetensors header or a ``config.json`` beside it), and the state dict without such buffers."""
    wrapped = isinstance(obj, Mapping) and not _is_state_dict(obj)  # a bare state dict's entries are buffers
    found = _in_mapping(obj, "the checkpoint") if wrapped else None
    buffers, keys = _in_buffers(state)
    if buffers is not None:
        state = {k: v for k, v in state.items() if k not in keys}
    return state, found or buffers or _beside(Path(path))


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in ``path`` (safetensors, or a torch file loaded with
    ``weights_only=True`` onto the CPU); pickled code and unreadable files are CheckpointErrors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        return weights_only_load(path)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} needs pickled code{what} to load and resdense refuses to run it; save only the weights "
            "(torch.save(model.state_dict(), ...)) or convert them to safetensors") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or not a PyTorch file ({_first_line(e)})") from None


def weights_only_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU. PyTorch warns about the pickle protocol of a
    file it may be about to refuse; the caller tells the user in its own words, so that warning is
    dropped; any other warning of a load that succeeded is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    for w in caught:
        if not str(w.message).startswith("Detected pickle protocol"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return loaded


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``obj`` and the wrapper key it was under (``""``: ``obj`` itself)."""
    if _is_state_dict(obj):
        return dict(obj), ""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key]), key
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(f"{source} holds no state dict of tensors (its top-level keys: {keys}); "
                              f"save model.state_dict() or wrap it as {{'state_dict': ...}}")
    raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")


def strip_prefixes(key: str) -> str:
    """A key without the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def rename_keys(state: Mapping[str, torch.Tensor], layout: Optional[Layout]) -> dict[str, torch.Tensor]:
    """Keys without wrapper prefixes, renamed by ``layout``'s rules; two keys that land on one
    name are an error rather than one silently winning."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = strip_prefixes(key)
        for pattern, repl in (layout.renames if layout else ()):
            new = re.sub(pattern, repl, new)
        if new in out:
            raise CheckpointError(f"two keys of the checkpoint map to {new!r} (one is {key!r}); it mixes two layouts")
        out[new] = value
    return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """The CIFAR-repository layout when a key (prefixes stripped) starts with ``linear.``;
    else torchvision's names (timm uses the same for ResNet and DenseNet)."""
    if any(strip_prefixes(k).startswith("linear.") for k in state):
        return LAYOUTS["cifar"]
    return LAYOUTS["torchvision"]


# --- a strict fit, with every mismatch listed -------------------------------------------------


def fold_keys(keys: set[str], universe: set[str]) -> list[str]:
    """``keys`` written compactly and losslessly: a module all of whose entries (in ``universe``)
    are in ``keys`` becomes ``module.*``, and numbered siblings become ``layer1.{3-8}.*``."""
    tree: dict[str, Any] = {}
    for key in universe | keys:
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})

    def covered(node: dict[str, Any], prefix: str) -> bool:
        return all(covered(child, f"{prefix}.{name}") for name, child in node.items()) if node else prefix in keys

    def walk(node: dict[str, Any], prefix: str) -> list[str]:
        out: list[str] = []
        full = [name for name, child in node.items() if covered(child, f"{prefix}{name}")]
        for name, child in node.items():
            if name not in full:
                out += walk(child, f"{prefix}{name}.")
        numbered = sorted((int(n) for n in full if n.isdigit()))
        for start, end in _runs(numbered):
            label = str(start) if start == end else f"{{{start}-{end}}}"
            out.append(f"{prefix}{label}" + (".*" if node[str(start)] else ""))
        for name in sorted(n for n in full if not n.isdigit()):
            out.append(f"{prefix}{name}" + (".*" if node[name] else ""))
        return out

    return sorted(walk(tree, ""), key=_natural)


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def _natural(text: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def mismatch_report(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """None when ``state`` fits ``own`` key for key and shape for shape; else one line listing
    every missing, unexpected and mis-shaped key, grouped by module."""
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = sorted((k for k in set(own) & set(state) if own[k].shape != state[k].shape), key=_natural)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(fold_keys(missing, set(own)))}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {', '.join(fold_keys(unexpected, set(state)))}")
    if shapes:
        listed = ", ".join(f"{k} (file {_shape(state[k])}, model {_shape(own[k])})" for k in shapes)
        parts.append(f"wrong shape {len(shapes)}: {listed}")
    return "; ".join(parts) or None


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _fill_bn_counters(own: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    # Checkpoints from PyTorch < 0.4.1 predate BatchNorm's num_batches_tracked; PyTorch's own
    # loader fills it with 0 for them, and so do we (only where the BN's statistics are there).
    for key in own:
        if key.endswith(".num_batches_tracked") and key not in state and \
                key.replace("num_batches_tracked", "running_mean") in state:
            state[key] = torch.zeros((), dtype=torch.long)


def first_conv_key(model: nn.Module) -> str:
    """The name of the first 4-D weight in the model: its input channels are ``in_chans``."""
    return next(k for k, v in model.state_dict().items() if v.ndim == 4)


def build_from_state_dict(name: str, state: dict[str, torch.Tensor], *, source: str = "checkpoint",
                          **kwargs: Any) -> nn.Module:
    """Model ``name`` (extra builder ``kwargs``) with ``num_classes``/``in_chans`` from the
    weights' shapes, loaded strictly with ``state`` (already renamed); eval mode."""
    from ._registry import create_model

    model = create_model(name, **kwargs)
    head, conv = f"{model.head_name}.weight", first_conv_key(model)
    shaped = dict(kwargs)
    if head in state and state[head].ndim == 2:
        shaped.setdefault("num_classes", int(state[head].shape[0]))
    if conv in state and state[conv].ndim == 4:
        shaped.setdefault("in_chans", int(state[conv].shape[1]))
    if (shaped.get("num_classes", model.num_classes), shaped.get("in_chans", model.in_chans)) != \
            (model.num_classes, model.in_chans):
        model = create_model(name, **shaped)  # the first build only told where the shapes are
    own = model.state_dict()
    _fill_bn_counters(own, state)
    problem = mismatch_report(own, state)
    if problem:
        raise CheckpointError(f"{source} does not fit {name} ({problem}); was it saved for another model, "
                              f"or does it need another --format ({', '.join(LAYOUTS)})?")
    model.load_state_dict(state, strict=True)
    return model.eval()
