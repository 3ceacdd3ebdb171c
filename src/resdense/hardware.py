"""What the machine can do: the device to train on and whether bf16 pays off there."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


# oneDNN instruction sets below its native bf16 ones (ONEDNN_MAX_CPU_ISA names), and ATen's
# capabilities below AVX-512 (ATEN_CPU_CAPABILITY values): a process capped at one of these runs
# bf16 emulated, however new the CPU, so `auto` must not pick it there.
_ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                       "AVX512_CORE_VNNI"})
_ATEN_CAPABILITIES_WITHOUT_BF16 = frozenset({"default", "avx2", "zvector", "vsx"})


def isa_cap() -> str | None:
    """The instruction-set cap this process runs under, as ``ONEDNN_MAX_CPU_ISA`` and
    ``ATEN_CPU_CAPABILITY`` set it (e.g. ``"ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"``), or
    ``None`` when neither is set. Benchmarks record it: it changes every CPU figure."""
    caps = [f"{name}={os.environ[name]}" for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if os.environ.get(name)]
    return " ".join(caps) or None


def _isa_capped_below_bf16() -> bool:
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    return onednn in _ONEDNN_ISAS_WITHOUT_BF16 or aten in _ATEN_CAPABILITIES_WITHOUT_BF16


def bf16_supported(device: torch.device | str) -> bool:
    """True where bf16 matrix arithmetic runs natively: CUDA GPUs that support it, and CPUs with
    AMX or AVX512-BF16, unless the process is capped below them (``ONEDNN_MAX_CPU_ISA=AVX2`` or
    ``ATEN_CPU_CAPABILITY=avx2``, as when one CPU stands in for an older one). Elsewhere PyTorch
    emulates bf16 and is many times slower than fp32 (about 12x for ResNet-20 training on an
    AVX2-only EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags()) and not _isa_capped_below_bf16()
    return False


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (``None`` means plain fp32)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32" or (precision == "auto" and not bf16_supported(device)):
        return None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32' for plain fp32 (``None``), else the dtype's name ('bfloat16')."""
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")
