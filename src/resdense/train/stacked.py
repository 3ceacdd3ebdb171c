"""K copies of one net as one model: their parameters and buffers stacked along a new first
dimension, run with ``torch.func.functional_call`` under ``vmap``, and stepped by an SGD that
acts on the stacked tensors.

``vmap`` batches every operation per copy (a convolution over K copies becomes one grouped
convolution), so option A's channel padding, DenseNet's concatenations and batch norm's batch
statistics stay per copy; the buffers are stacked too, so each copy's running statistics are
its own and are updated in place as its separate run updates them. The stacked SGD is PyTorch's
SGD (momentum, Nesterov, weight decay per parameter group, the group's ``lr_scale``) written
with the same operations on stacked tensors, each copy at its own learning rate; gradient
clipping and the gradient norm are per copy (the global norm of that copy's gradients).

A copy moves between the stack and an ordinary module and optimiser (:meth:`StackedNet.write`,
:meth:`StackedSGD.write`): that is how each copy is validated, checkpointed and resumed exactly
as its separate run.
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from . import graphs


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class StackedNet:
    """K copies of one architecture (``models``: same class and settings, any weights) as stacked
    tensors. ``__call__`` maps inputs (K, N, C, H, W) to logits (K, N, classes) in train mode."""

    def __init__(self, models: Sequence[nn.Module], cuda_graphs: bool = False) -> None:
        # The structure functional_call runs: on the meta device, so it holds no memory of its own.
        self.base = copy.deepcopy(models[0]).to("meta").train()
        named = [dict(m.named_parameters()) for m in models]
        self.params = {n: _stack([d[n] for d in named]).requires_grad_(p.requires_grad)
                       for n, p in named[0].items()}
        buffers = [dict(m.named_buffers()) for m in models]
        self.buffers = {n: _stack([d[n] for d in buffers]) for n in buffers[0]}
        self._forward = vmap(self._one, randomness="error")  # dropout is never fused (see fused.py)
        self.cuda_graphs = cuda_graphs
        if cuda_graphs:
            self._forward = graphs.capture(self._forward)
            graphs.mark_static([*self.params.values(), *self.buffers.values()])

    def _one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            # vmap runs adaptive pooling of channels-last maps through its slower per-copy
            # fallback and says so; the result is exact, and the user can do nothing about it.
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self._forward(self.params, self.buffers, x)

    @property
    def copies(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def trained(self) -> dict[str, torch.Tensor]:
        """The parameters the optimiser steps (those that require a gradient), by name."""
        return {n: p for n, p in self.params.items() if p.requires_grad}

    @torch.no_grad()
    def write(self, index: int, model: nn.Module) -> None:
        """Copy copy ``index``'s weights and buffers into ``model`` (an ordinary module of the same net)."""
        for n, t in model.named_parameters():
            t.copy_(self.params[n][index])
        for n, t in model.named_buffers():
            t.copy_(self.buffers[n][index])

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only copies ``indices`` (in that order): a copy that left (diverged) is dropped."""
        idx = torch.tensor(list(indices), device=next(iter(self.params.values())).device)
        self.params = {n: p.detach().index_select(0, idx).requires_grad_(p.requires_grad) for n, p in self.params.items()}
        self.buffers = {n: b.index_select(0, idx) for n, b in self.buffers.items()}
        if self.cuda_graphs:  # new tensors: captured anew
            graphs.mark_static([*self.params.values(), *self.buffers.values()])


def copy_norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each copy's global L2 norm over ``grads`` (stacked (K, ...) tensors): shape (K,)."""
    per_tensor = [torch.linalg.vector_norm(g.float().flatten(1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(per_tensor, dim=1), dim=1)


def clip_copies(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each copy's gradients to global norm ``max_norm`` as ``clip_grad_norm_`` clips one
    run's; returns the norms before clipping (K,)."""
    norms = copy_norms(grads)
    scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


class StackedSGD:
    """PyTorch's SGD over a :class:`StackedNet`'s parameters, with the parameter groups of a
    separate run's optimiser (``template``: its weight decay, momentum, Nesterov and ``lr_scale``
    per group, matched to the stack by parameter name through ``model``)."""

    def __init__(self, net: StackedNet, template: torch.optim.Optimizer, model: nn.Module) -> None:
        self.net = net
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [{"names": [names[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"],
                        "momentum": g["momentum"], "nesterov": g["nesterov"], "dampening": g["dampening"],
                        "lr_scale": g.get("lr_scale", 1.0)} for g in template.param_groups]
        self.momentum: dict[str, torch.Tensor] = {}  # stacked buffers, made at the first step (as SGD makes them)

    @classmethod
    def gather(cls, net: StackedNet, optimizers: Sequence[torch.optim.Optimizer],
               models: Sequence[nn.Module]) -> "StackedSGD":
        """The stacked optimiser of the copies' own optimisers (their momentum buffers, if any)."""
        opt = cls(net, optimizers[0], models[0])
        for name, param in models[0].named_parameters():
            bufs = [o.state.get(dict(m.named_parameters())[name], {}).get("momentum_buffer")
                    for o, m in zip(optimizers, models)]
            if all(b is not None for b in bufs):
                opt.momentum[name] = _stack(bufs)
        return opt

    def write(self, index: int, optimizer: torch.optim.Optimizer, model: nn.Module, lr: float) -> None:
        """Give copy ``index``'s momentum buffers and ``lr`` to ``optimizer`` (of ``model``), so it
        saves (and resumes) as the copy's separate run would."""
        params = dict(model.named_parameters())
        for name, buf in self.momentum.items():
            optimizer.state[params[name]]["momentum_buffer"] = buf[index].clone()
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def keep(self, indices: Sequence[int]) -> None:
        idx = torch.tensor(list(indices), device=next(iter(self.net.params.values())).device)
        self.momentum = {n: b.index_select(0, idx) for n, b in self.momentum.items()}

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One SGD step, copy k at learning rate ``lrs[k]`` (times each group's ``lr_scale``)."""
        params = self.net.params
        for group in self.groups:
            names = [n for n in group["names"] if params[n].grad is not None]  # SGD skips a parameter without one
            if not names:
                continue
            ps, grads = [params[n] for n in names], [params[n].grad for n in names]
            if group["weight_decay"] != 0:
                grads = torch._foreach_add(grads, ps, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                grads = self._momentum(names, grads, group)
            self._apply(ps, grads, [lr * group["lr_scale"] for lr in lrs])

    def _momentum(self, names: list[str], grads: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        mu = group["momentum"]
        if names[0] not in self.momentum:  # the first step: the buffer is the gradient
            for n, g in zip(names, grads):
                self.momentum[n] = torch.clone(g).detach()
        else:
            bufs = [self.momentum[n] for n in names]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads, alpha=1 - group["dampening"])
        bufs = [self.momentum[n] for n in names]
        return torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs

    @staticmethod
    def _apply(ps: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[float]) -> None:
        if len(set(lrs)) == 1:  # the usual case: one update of every stacked tensor
            torch._foreach_add_(ps, grads, alpha=-lrs[0])
            return
        # Copies in different warm-up phases (ResNet-110's warm-up ends by each copy's error).
        for k, lr in enumerate(lrs):
            torch._foreach_add_([p[k] for p in ps], [g[k] for g in grads], alpha=-lr)


def per_copy_losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Each copy's mean cross-entropy on its own batch: (K,). One loss per copy, as its separate
    run computes it, so that the sum's gradient for each copy is its separate run's gradient."""
    return torch.stack([F.cross_entropy(logits[k], y[k], label_smoothing=label_smoothing)
                        for k in range(logits.shape[0])])
