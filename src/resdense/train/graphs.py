"""Graph-captured training steps (``cuda_graphs``, ``--cuda-graphs``): a small net on a GPU is
bound by the host launching its kernels (about 1,000 per ResNet-56 step), so its forward and
backward passes are captured in CUDA graphs and replayed, one launch each.

The capture is ``torch.compile(mode="reduce-overhead")`` of the stepped model (or of a fused
group's stacked forward): it compiles the forward and backward graphs and records them as CUDA
graphs. A graph needs static shapes: training batches are all full (the loader drops the last
partial batch), and ``dynamic=False`` gives each training image size its own graph, so
progressive resizing captures one graph per size (:func:`static_shapes`). The optimiser step
stays eager (a few multi-tensor kernels), and the loss is still checked before it, so a
non-finite loss leaves the weights as they were. Evaluation is not captured.

On a CPU the setting is refused in one line (:func:`check_device`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import TrainConfig
from .schedule import train_image_size

# torch.compile keeps this many graphs per function before it falls back to eager code
# (torch._dynamo.config.cache_size_limit's default): a plan needing more is refused.
MAX_GRAPHS = 8


def check_device(cfg: TrainConfig, device: torch.device, world_size: int = 1) -> None:
    """Refuse ``cuda_graphs`` where it cannot run: off CUDA, or with several processes."""
    if not cfg.cuda_graphs:
        return
    if device.type != "cuda":
        raise ConfigError(f"--cuda-graphs captures training steps in CUDA graphs and needs a CUDA device (this run "
                          f"is on {device.type}); drop --cuda-graphs")
    if world_size > 1:
        raise ConfigError("--cuda-graphs trains in one process; drop --cuda-graphs or --nproc")


def static_shapes(cfg: TrainConfig, image_size: Sequence[int], in_chans: int, total_epochs: int,
                  min_scale: float, world_size: int = 1) -> list[tuple[int, int, int, int]]:
    """The input shapes (N, C, H, W) the run's training steps take, one graph each, in the order
    the epochs reach them: every batch is full, and progressive resizing gives each size its own."""
    batch = cfg.batch_size // world_size
    sizes = dict.fromkeys(train_image_size(epoch, total_epochs, tuple(image_size), min_scale, cfg.resize_ramp,
                                           cfg.resize_step) for epoch in range(total_epochs))
    shapes = [(batch, in_chans, int(h), int(w)) for h, w in sizes]
    if cfg.cuda_graphs and len(shapes) > MAX_GRAPHS:
        raise ConfigError(f"--cuda-graphs would capture {len(shapes)} graphs (one per image size of progressive "
                          f"resizing), more than {MAX_GRAPHS}; raise --set resize_step or drop --cuda-graphs")
    return shapes


def describe(shapes: Sequence[tuple[int, ...]]) -> str:
    """'CUDA graphs: one per image size, batch 128: 24x24, 28x28, 32x32 (the last partial batch is dropped)'."""
    sizes = ", ".join(f"{h}x{w}" for _, _, h, w in shapes)
    return f"CUDA graphs: one per image size, batch {shapes[0][0]}: {sizes} (the last partial batch is dropped)"


class GraphStep(nn.Module):
    """``model`` compiled with CUDA graphs; each call begins a new step for the graph trees (the
    previous step's outputs, already read, may be overwritten)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model  # the name DDP uses: checkpoint.unwrap finds the model inside
        self.compiled = capture(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x)


def capture(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled for CUDA-graph replay with static shapes."""
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)


def mark_static(tensors: Sequence[torch.Tensor]) -> None:
    """Tensors passed to a captured function that keep their storage from step to step (a fused
    group's stacked weights and buffers, updated in place): read where they are, not copied in."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)
