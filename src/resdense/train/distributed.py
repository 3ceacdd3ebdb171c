"""More than one process: torchrun or Slurm's srun + DistributedDataParallel.

``torchrun --nproc-per-node N -m resdense train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
``resdense train --nproc N ...`` starts that for you. Under ``srun --ntasks N resdense train ...``
each task finds its rank in Slurm's environment (:func:`launch_env`). gloo on CPU, nccl on CUDA.
Each rank trains on its slice of every global batch (see TensorLoader); only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Iterator, Mapping, Optional

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


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[03-05,07]`` -> ``gpu03``), as ``scontrol show hostnames``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    if out:
        return out[0]
    head, _, rest = nodelist.partition("[")
    return head + rest.split(",")[0].split("-")[0].rstrip("]") if rest else head.split(",")[0]


def launch_env(env: Optional[Mapping[str, str]] = None) -> Optional[dict[str, Any]]:
    """This process's place in a multi-process run: ``{rank, world_size, local_rank, init_method}``
    from torchrun's variables, else from an ``srun`` step of several tasks (rank SLURM_PROCID, the
    rendezvous on the step's first node, port MASTER_PORT or one derived from the job id), else
    ``None`` (one process)."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", "0")), "init_method": "env://"}
    # SLURM_STEP_NUM_TASKS is set by srun only: a batch script's own shell is one process.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1 or "SLURM_PROCID" not in env:
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES", "1"))
    host = env.get("MASTER_ADDR") or ("127.0.0.1" if nodes == 1 else _first_host(env.get("SLURM_STEP_NODELIST", "")))
    # One port per job step, so two steps (or jobs) on one node do not meet at the same rendezvous.
    port = env.get("MASTER_PORT") or str(20000 + (int(env.get("SLURM_JOB_ID", "0")) * 7
                                                 + int(env.get("SLURM_STEP_ID", "0") or 0)) % 20000)
    return {"rank": int(env["SLURM_PROCID"]), "world_size": tasks, "local_rank": int(env.get("SLURM_LOCALID", "0")),
            "init_method": f"tcp://{host}:{port}"}


@contextlib.contextmanager
def maybe_init_distributed(cfg: Any) -> Iterator[dict[str, Any]]:
    """Join the process group when launched by torchrun or srun; yields ``rank``, ``world_size``, ``device``."""
    place = launch_env()
    if place is None:
        yield {}
        return
    rank, world_size, local_rank = place["rank"], place["world_size"], place["local_rank"]
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        # srun --gpus-per-task gives each task its own GPU (as device 0); torchrun shows them all.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=place["init_method"], rank=rank, world_size=world_size)
    try:
        yield {"rank": rank, "world_size": world_size, "device": device}
        # Every rank leaves together: the others return at once from the final evaluation that rank 0
        # runs alone, and a rank that tore its gloo group down while rank 0 still held the store was
        # seen to abort at exit ("terminate called without an active exception") on a loaded CPU.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run the command ``argv`` (without ``--nproc``) under ``torch.distributed.run``."""
    if launch_env() is not None:
        raise ConfigError("--nproc cannot be used inside torchrun or srun; drop it (they already started the processes)")
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
