"""The bounds on what an input file or a flag can ask of the machine, in one place.

Every reader of the same kind of input applies the same bound (an image in ``train`` and in
``predict``; a config file wherever one is read), and exceeding one is a user's mistake: one line
naming the bound, exit 2. The README lists them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .errors import ConfigError

# An image larger than this is refused from its header, before it is decoded: 8192 x 8192, far
# above any training image, below Pillow's own "decompression bomb" warning (89M pixels), so a
# 12000 x 12000 file that Pillow would only warn about is refused too.
MAX_IMAGE_PIXELS = 8192 * 8192
# A configuration file (--config): its size, and its values once YAML aliases are expanded
# (a nested alias "bomb" of a few hundred bytes expands to billions), and how deep it nests.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32
# A dataset archive or gzip file, unpacked: CIFAR-100's python tarball is 178 MB, Fashion-MNIST's
# training images 47 MB; a file that unpacks to more is refused as it unpacks.
MAX_UNPACKED_BYTES = 4 << 30
MAX_ARCHIVE_MEMBERS = 100_000
# Memory one study worker process may need (torch, a dataset, a small net's activations): what
# bounds --jobs by the memory available.
JOB_MEMORY_BYTES = 1 << 30


def image_too_large(width: int, height: int) -> Optional[str]:
    """Why an image of this size is refused, or ``None``."""
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width}x{height} pixels is {TOO_LARGE}"
    return None


# Also said of an image Pillow itself refuses to open for its size (its "decompression bomb" error).
TOO_LARGE = f"more than resdense decodes ({MAX_IMAGE_PIXELS:,} pixels, 8192x8192); shrink the image first"


def check_config_tree(root: Any, source: str) -> None:
    """Refuse a parsed config whose values, with aliases expanded, exceed :data:`MAX_CONFIG_VALUES`
    or nest deeper than :data:`MAX_CONFIG_DEPTH`. Counted on the object graph with each shared
    object counted once per visit path but memoised, so a bomb is measured without expanding it."""
    sizes: dict[int, int] = {}

    def count(node: Any, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source} nests deeper than {MAX_CONFIG_DEPTH} levels; a training config is flat")
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:  # a YAML alias: the same object again
            return sizes[id(node)]
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += count(child, depth + 1)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(f"{source} expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
                                  "included); a training config has a few dozen")
        sizes[id(node)] = total
        return total

    count(root, 0)


def check_config_size(size: int, source: str) -> None:
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source} is {size:,} bytes, more than a config file may be ({MAX_CONFIG_BYTES:,}); "
                          "a training config is a few hundred bytes")


def available_memory() -> Optional[int]:
    """Bytes of memory available to new processes (``MemAvailable``), or ``None`` where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bound_jobs(requested: int, runs_left: int) -> tuple[int, Optional[str]]:
    """``--jobs`` bounded by the runs left to train, the cores and the memory available; the
    number to use and, when it is smaller than asked, one line saying why."""
    bounds = {"runs left to train": max(runs_left, 1), "CPU cores": usable_cores()}
    memory = available_memory()
    if memory is not None:
        bounds[f"GiB of memory available at {JOB_MEMORY_BYTES >> 30} GiB a job"] = max(1, memory // JOB_MEMORY_BYTES)
    jobs = min(requested, *bounds.values())
    if jobs == requested:
        return jobs, None
    why = ", ".join(f"{n} {what}" for what, n in bounds.items() if n < requested)
    return jobs, f"--jobs {requested}: using {jobs} ({why})"
