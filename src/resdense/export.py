"""The inference path and model export: BN folding, a fast eval wrapper, ONNX / TorchScript /
safetensors files that are checked against PyTorch before they are published.

Folding finds conv -> BatchNorm pairs from the model's real data flow (recorded during one
forward pass), not from module names, so it is the same code for every family:

* post-activation ResNets, plain nets, stems, projection shortcuts (``Sequential(conv, bn)``)
  and VGG: every BN directly follows a conv and is folded into it;
* pre-activation ResNets and DenseNets are BN-ReLU-conv: the BN at the *start* of a block reads
  the block input (also used by the shortcut, or a concatenation), so it cannot be folded into
  any conv and stays. The BN *inside* a block that reads only the previous conv's output
  (``bn2`` of a pre-activation block, ``norm2`` of a DenseNet-B layer) is folded into that
  preceding conv, which is exact.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._io import write_failure
from .hardware import bf16_supported
from .errors import ConfigError, UserError

EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")
FORMAT_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
# Largest max-abs difference between a reloaded export and PyTorch that still counts as equal,
# for outputs of magnitude <= 1; larger outputs scale it (an untrained deep net's logits reach
# thousands, where fp32 rounding alone exceeds 1e-3).
EXPORT_TOLERANCE = 1e-3


# --- BN folding -------------------------------------------------------------------------------


def _default_example_input(model: nn.Module) -> torch.Tensor:
    """A one-image batch the model accepts, from the common model face (``in_chans``,
    ``min_input_size``). Only the data flow matters, so it is as small as the model allows."""
    if not hasattr(model, "in_chans"):
        raise ConfigError("fold_bn needs example_input for a model without the resdense face (in_chans)")
    size = max(int(getattr(model, "min_input_size", 1)), 8)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(1, model.in_chans, size, size, device=device)


_FOLDABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # same eval-mode function


class _UseCounter(TorchFunctionMode):
    """Counts, for every tensor, the torch ops that computed a tensor from it (reads of
    metadata such as ``.shape`` or ``.dim()`` return no tensor and do not count). Every tensor
    seen is kept alive until the trace ends, so ``id()`` values are never reused."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outs:
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor):
                    self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                    self.keep.append(t)
            self.keep += outs
        return out


def find_conv_bn_pairs(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm2d whose input is the output of a Conv2d that
    no other op reads: exactly the BNs that folding leaves the model's function unchanged.

    The data flow is recorded from one eval-mode forward pass on ``example_input`` (default: a
    tiny batch built from the model's ``in_chans`` / ``min_input_size``): module hooks name the
    conv outputs and BN inputs, a torch function mode counts every op that reads a tensor. A
    module called more than once (shared weights) is never folded, nor a BN without running
    statistics (it normalises with batch statistics even in eval).
    """
    x = _default_example_input(model) if example_input is None else example_input
    counter = _UseCounter()
    conv_out: dict[int, str] = {}
    bn_in: list[tuple[str, int]] = []
    calls: dict[str, int] = {}

    def on_conv(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            conv_out[id(output)] = name
            calls[name] = calls.get(name, 0) + 1
            counter.keep.append(output)
        return hook

    def on_bn(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            bn_in.append((name, id(inputs[0])))
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = []
    for name, m in model.named_modules():
        # Exact types: a subclass may compute something else (weight standardisation, ...).
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(on_conv(name)))
        elif type(m) in _FOLDABLE_NORMS and m.running_mean is not None and m.running_var is not None:
            handles.append(m.register_forward_pre_hook(on_bn(name)))
    was_training = model.training
    try:
        with torch.no_grad(), counter:
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [(conv_out[src], bn) for bn, src in bn_in
            if src in conv_out and counter.uses.get(src) == 1 and calls[bn] == 1 and calls[conv_out[src]] == 1]


@torch.no_grad()
def fold_conv_bn_(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place: ``bn(conv(x)) == conv'(x)``.

    With ``s = gamma / sqrt(var + eps)``: ``W' = W * s`` (per output channel) and
    ``b' = (b - mean) * s + beta``. Computed in float64 so the fold adds no rounding of its own.
    """
    w = conv.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    new_w = w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))  # (out, in/groups, kh, kw) * (out, 1, 1, 1)
    conv.weight.copy_(new_w.to(w.dtype))
    new_b = ((bias - mean) * scale + beta).to(dtype=w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_b)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def fold_bn(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """An eval-mode deep copy of ``model`` with every foldable BatchNorm2d folded into the
    convolution before it and replaced by ``nn.Identity`` (see :func:`find_conv_bn_pairs`).

    The original is untouched. The copy records what was folded in ``folded_bn`` (a list of
    ``(conv, bn)`` names).
    """
    folded = copy.deepcopy(model).eval()
    pairs = find_conv_bn_pairs(folded, example_input)
    for conv_name, bn_name in pairs:
        fold_conv_bn_(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        _set_submodule(folded, bn_name, nn.Identity())
    folded.folded_bn = pairs
    return folded


_fold_bn = fold_bn  # export_model's `fold_bn` flag shadows the function inside it


# --- the fast inference path ------------------------------------------------------------------


class InferenceModel(nn.Module):
    """Eval-only wrapper: channels_last input, optional autocast, fp32 logits, no autograd."""

    def __init__(self, model: nn.Module, channels_last: bool, autocast_dtype: Optional[torch.dtype]) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast(x.device):
            out = self.model(x)
        return out.float()


def inference_model(model: nn.Module, *, fold: bool = True, channels_last: bool = True,
                    dtype: Optional[torch.dtype] = None, compile: bool = False,
                    example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """The fast inference path: BN folded, eval mode, channels_last, bf16 autocast where the
    hardware runs it fast (``dtype=None`` decides with :func:`bf16_supported`; pass
    ``torch.float32`` to force fp32 or a half type to force autocast), optionally compiled.

    Returns a new module; ``model`` is untouched. Outputs are always fp32.
    """
    net = fold_bn(model, example_input) if fold else copy.deepcopy(model).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        autocast_dtype = torch.bfloat16 if bf16_supported(device) else None
    elif dtype == torch.float32:
        autocast_dtype = None
    elif dtype in (torch.bfloat16, torch.float16):
        autocast_dtype = dtype
    else:
        raise ConfigError(f"inference dtype must be float32, bfloat16 or float16; got {dtype}")
    wrapped: nn.Module = InferenceModel(net, channels_last, autocast_dtype)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


# --- export -----------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how closely the reloaded file matches PyTorch."""

    path: str
    format: str
    bytes: int
    input_shape: tuple[int, ...]
    folded_bn: int
    max_abs_diff: Optional[float]
    tolerance: float
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it is fsynced and renamed onto ``path``,
    on any error removed, so a reader never sees a half-written or unchecked file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, but created by the writer itself so the file gets the usual permissions
    # (mkstemp's are 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if tmp.exists():  # first, so the message counts the space it frees
            tmp.unlink()
        failure = write_failure(e, path)  # a full disk or a read-only folder: one line, not a traceback
        if failure is not None and failure is not e:
            raise failure from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def export_tolerance(reference: torch.Tensor) -> float:
    """The max-abs difference allowed against ``reference``: 1e-3 times its magnitude (at least 1)."""
    return EXPORT_TOLERANCE * max(1.0, float(reference.detach().abs().max()))


def _check(diff: float, tolerance: float, fmt: str, path: Path) -> None:
    if not math.isfinite(diff) or diff > tolerance:
        raise RuntimeError(f"{fmt} export of {path.name} differs from PyTorch by {diff:.3g} "
                           f"(tolerance {tolerance:.3g}); the file was not written")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tracer chatter: the model's shape checks are Python branches that tracing freezes
    into constants (intended: exported graphs trust their inputs, see ClassifierModel.forward)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def require_onnxruntime() -> Any:
    """Import onnxruntime or say how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'resdense[onnx]'") from None
    return onnxruntime


def onnx_session(path: Union[str, Path], threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session for ``path`` (``threads`` intra-op threads, default torch's)."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def spatial_size_is_free(model: nn.Module) -> bool:
    """Whether ``model`` takes any height and width: every adaptive pooling pools to 1x1 (a
    pooling to a fixed grid, as VGG's ImageNet head, is exported for one input size only)."""
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    return all(m.output_size in (1, (1, 1)) for m in model.modules() if isinstance(m, pools))


def onnx_metadata(meta: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> dict[str, str]:
    """The metadata_props of an exported ONNX file: what ``resdense predict`` needs (model name,
    class names, mean, std, input size; JSON values). A freshly built model has no classes or
    normalisation of its own: its outputs are numbered and its inputs taken as they are."""
    chans = int(input_shape[0])
    props = {"model": meta.get("model"), "input_size": list(meta.get("input_size") or input_shape),
             "classes": meta.get("classes") or [str(i) for i in range(num_classes)],
             "mean": meta.get("mean") or [0.0] * chans, "std": meta.get("std") or [1.0] * chans}
    return {k: json.dumps(v) for k, v in props.items()}


def _export_onnx(model: nn.Module, x: torch.Tensor, tmp: Path, reference: torch.Tensor, check: bool,
                 metadata: dict[str, str]) -> Optional[float]:
    require_onnxruntime()
    import onnx

    free = spatial_size_is_free(model)
    axes = {0: "batch", 2: "height", 3: "width"} if free else {0: "batch"}
    with _quiet():
        # The TorchScript-based exporter needs no extra packages; the dynamo one needs onnxscript.
        torch.onnx.export(model, (x,), str(tmp), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": axes, "logits": {0: "batch"}}, opset_version=17)
    graph = onnx.load(str(tmp))
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(tmp))
    if not check:
        return None
    sess = onnx_session(tmp)
    out = sess.run(["logits"], {"input": x.detach().cpu().numpy()})[0]
    diff = _max_abs_diff(torch.from_numpy(out), reference)
    if free:  # the dynamic height and width must really be free: check another size too
        other = torch.randn(1, x.shape[1], x.shape[2] + 8, x.shape[3] + 4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(other.to(x.device))
        got = torch.from_numpy(sess.run(["logits"], {"input": other.numpy()})[0])
        # Held to its own output's tolerance, stated on the scale of the first check's.
        diff = max(diff, _max_abs_diff(got, expected) * export_tolerance(reference) / export_tolerance(expected))
    return diff


def _export_torchscript(model: nn.Module, x: torch.Tensor, tmp: Path, reference: torch.Tensor,
                        check: bool) -> Optional[float]:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        torch.jit.save(traced, str(tmp))
    if not check:
        return None
    with _quiet(), torch.no_grad():
        loaded = torch.jit.load(str(tmp), map_location=x.device)
        return _max_abs_diff(loaded(x), reference)


def _export_safetensors(model: nn.Module, x: torch.Tensor, tmp: Path, reference: torch.Tensor, check: bool,
                        metadata: dict[str, Any]) -> Optional[float]:
    from safetensors.torch import load_file, save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"format": "pt", "resdense": json.dumps(metadata, default=str)})
    if not check:
        return None
    # Poison a copy's every tensor, then load the file strictly: the output can only match if the
    # file holds every weight and buffer.
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(clone.parameters()) + list(clone.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else 0)
        clone.load_state_dict(load_file(str(tmp), device=str(x.device)), strict=True)
        return _max_abs_diff(clone(x), reference)


def export_model(model: nn.Module, path: Union[str, Path], fmt: str, *, example_input: torch.Tensor,
                 fold_bn: bool = False, check: bool = True, metadata: Optional[dict[str, Any]] = None) -> ExportResult:
    """Write ``model`` to ``path`` as ``fmt`` (``"onnx"``, ``"torchscript"`` or ``"safetensors"``).

    The file is written to a temporary name, reloaded (onnxruntime for ONNX) and run on
    ``example_input``; only if it matches the original eval model (max abs difference at most
    1e-3, times the output's magnitude where that exceeds 1) is it renamed onto ``path``. ONNX
    files have a dynamic batch axis (input ``input``, output ``logits``), dynamic height and width
    where the model takes any (:func:`spatial_size_is_free`; checked at a second size), and the
    model name, class names, mean, std and input size in their metadata (:func:`onnx_metadata`).
    ``fold_bn`` exports the BN-folded model (a safetensors file then holds the folded weights,
    without BN entries). ``metadata`` (JSON-able) is stored in a safetensors header under
    ``"resdense"``, with the model's name added when known.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    path = Path(path)
    start = time.perf_counter()
    was_training = model.training
    try:
        with torch.no_grad():
            reference = model.eval()(example_input)
    finally:
        model.train(was_training)
    tolerance = export_tolerance(reference)
    net = _fold_bn(model, example_input[:1]) if fold_bn else copy.deepcopy(model).eval()
    n_folded = len(getattr(net, "folded_bn", []))
    meta = {"model": getattr(model, "model_name", type(model).__name__), "folded_bn": bool(fold_bn),
            "input_shape": list(example_input.shape[1:]), **(metadata or {})}

    with _atomic_path(path) as tmp:
        if fmt == "onnx":
            props = onnx_metadata(meta, tuple(example_input.shape[1:]), int(reference.shape[1]))
            diff = _export_onnx(net, example_input, tmp, reference, check, props)
        elif fmt == "torchscript":
            diff = _export_torchscript(net, example_input, tmp, reference, check)
        else:
            diff = _export_safetensors(net, example_input, tmp, reference, check, meta)
        if diff is not None:
            _check(diff, tolerance, fmt, path)
    return ExportResult(path=str(path), format=fmt, bytes=path.stat().st_size,
                        input_shape=tuple(example_input.shape), folded_bn=n_folded, max_abs_diff=diff,
                        tolerance=tolerance, seconds=time.perf_counter() - start, metadata=meta)
