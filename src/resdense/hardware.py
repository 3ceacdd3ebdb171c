"""What the machine can do: the device to train on and whether bf16 pays off there."""

from __future__ import annotations

import functools
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


def bf16_supported(device: torch.device | str) -> bool:
    """True where bf16 matrix arithmetic runs natively: CUDA GPUs that support it, and CPUs with
    AMX or AVX512-BF16. Elsewhere PyTorch emulates bf16 and is many times slower than fp32
    (about 12x for ResNet-20 training on an AVX2-only EPYC)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())
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
