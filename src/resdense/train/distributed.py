"""More than one process: torchrun + DistributedDataParallel.

``torchrun --nproc-per-node N -m resdense train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
``resdense train --nproc N ...`` starts that for you. gloo on CPU, nccl on CUDA. Each rank
trains on its slice of every global batch (see TensorLoader); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..hardware import resolve_device


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    """Print ``msg`` (flushed) from the main process only."""
    if is_main_process():
        print(msg, flush=True)


@contextlib.contextmanager
def maybe_init_distributed(cfg: Any) -> Iterator[dict[str, Any]]:
    """Join the process group when launched by torchrun; yields ``rank``, ``world_size``, ``device``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield {}
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        yield {"rank": rank, "world_size": world_size, "device": device}
    finally:
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run the command ``argv`` (without ``--nproc``) under ``torch.distributed.run``."""
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc cannot be used inside torchrun; drop it (torchrun already set the processes)")
    cleaned: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--nproc":
            next(words, None)  # and its value
        elif not word.startswith("--nproc="):
            cleaned.append(word)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "resdense", *cleaned]
    return subprocess.call(cmd)
