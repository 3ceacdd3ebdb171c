"""A tensor-resident loader: the whole split lives as uint8 on the training device, and every
batch is gathered, augmented and normalised with a handful of batched tensor operations.

Randomness (the shuffle and the augmentation) comes from a generator seeded by
``(seed, epoch)`` alone, so an epoch is the same wherever it runs: a resumed run sees the
batches the uninterrupted one saw, and ``world_size`` processes each take their slice of the
very batch a single process would have drawn. A run resumed inside an epoch starts that epoch
at batch ``start_batch``: the skipped batches' random draws are still made, so the rest of the
epoch is exactly the uninterrupted run's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """Batched training augmentation: zero-pad by ``pad`` and crop back at a random offset
    (0 disables), then flip horizontally with probability ``flip``.

    The papers' CIFAR augmentation is ``Augment(pad=4, flip=0.5)``."""

    pad: int = 4
    flip: float = 0.5

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random crop offsets (2, n) in [0, 2 * pad] and flip flags (n,), from ``gen`` on the CPU."""
        offsets = (torch.randint(0, 2 * self.pad + 1, (2, n), generator=gen) if self.pad > 0
                   else torch.zeros(2, n, dtype=torch.int64))
        flips = torch.rand(n, generator=gen) < self.flip if self.flip > 0 else torch.zeros(n, dtype=torch.bool)
        return offsets, flips

    def windows(self, images: torch.Tensor) -> torch.Tensor:
        """Every crop of the zero-padded uint8 ``images`` (N, C, H, W), as a view of shape
        (N, C, 2p + 1, 2p + 1, H, W); padding is zeros (black pixels), as torchvision pads."""
        h, w = images.shape[-2:]
        padded = F.pad(images, (self.pad,) * 4) if self.pad > 0 else images  # (N, C, H + 2p, W + 2p)
        return padded.unfold(2, h, 1).unfold(3, w, 1)

    @staticmethod
    def take(windows: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Images ``idx`` cropped at ``offsets`` and flipped where ``flips``: one gather for all of them."""
        x = windows[idx, :, offsets[0], offsets[1]]  # (B, C, H, W), a fresh tensor
        if bool(flips.any()):
            x[flips] = x[flips].flip(3)
        return x

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch ``x`` of shape (B, C, H, W)."""
        offsets, flips = self.draw(len(x), gen)
        return self.take(self.windows(x), torch.arange(len(x), device=x.device), offsets.to(x.device), flips.to(x.device))


class TensorLoader:
    """Iterates over ``(images, labels)`` batches of a uint8 tensor split.

    Args:
        images: uint8 (N, C, H, W); moved to ``device`` once.
        labels: int64 (N,).
        batch_size: the *global* batch; each of ``world_size`` ranks yields ``batch_size // world_size``.
        shuffle: a fresh seeded permutation each epoch (call :meth:`set_epoch`).
        augment: training augmentation, or ``None``.
        mean, std: per-channel normalisation in [0, 1] units.
        channels_last: return batches in channels-last memory format (faster convolutions).
        drop_last: drop the final incomplete batch (training) or keep it (evaluation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
                 augment: Optional[Augment] = None, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 device: torch.device | str = "cpu", channels_last: bool = True, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(f"images must be a uint8 (N, C, H, W) tensor; got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ConfigError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1 or batch_size % world_size:
            raise ConfigError(f"batch size must be a positive multiple of the {world_size} processes; got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.channels_last = channels_last
        chans = images.shape[1]
        mean_t = torch.tensor(_per_channel(mean, chans), device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(_per_channel(std, chans), device=self.device).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift.
        self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        # Padded once here, so a batch is gathered and cropped in a single indexing operation.
        self._windows = augment.windows(self.images) if augment is not None else None
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.start_batch = 0
        self.size: Optional[tuple[int, int]] = None  # resize batches to this (H, W); None: as stored

    def set_epoch(self, epoch: int, size: Optional[Sequence[int]] = None, start_batch: int = 0) -> None:
        """Select the epoch's shuffle and augmentation stream, the batch to start at (a resume
        inside the epoch), and, for progressive resizing, the (H, W) its batches are resized to
        (``None`` or the stored size: no resizing)."""
        if not 0 <= start_batch <= len(self):
            raise ConfigError(f"start_batch must be in [0, {len(self)}]; got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch
        self.size = None if size is None or tuple(size) == tuple(self.images.shape[-2:]) else (int(size[0]), int(size[1]))

    @property
    def epoch_seed(self) -> int:
        """The seed of this epoch's permutation and augmentation stream (saved in a checkpoint taken
        inside the epoch, and checked on resume)."""
        return self.seed * 1_000_003 + self.epoch

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _generator(self) -> torch.Generator:
        # Distinct, reproducible stream per (seed, epoch); independent of the global RNG.
        return torch.Generator().manual_seed(self.epoch_seed)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float32 (B, C, *size), channels-last if configured."""
        # Normalising in NCHW and converting after is faster than normalising channels-last data.
        x = torch.addcmul(self.shift, x.float(), self.scale)
        if self.size is not None:  # antialiased, so a smaller image is a blurred one, not an aliased one
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self._generator()
        n = self.num_samples
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if i < self.start_batch:  # already trained: draw its randomness, build nothing
                if self.augment is not None:
                    self.augment.draw(len(idx), gen)
                continue
            if self.augment is not None:
                # Drawn for the global batch, then sliced: every rank sees what one process would.
                offsets, flips = self.augment.draw(len(idx), gen)
                idx, offsets, flips = self._shard(idx), self._shard(offsets.T).T, self._shard(flips)
                x = self.augment.take(self._windows, idx, offsets.to(self.device), flips.to(self.device))
            else:
                idx = self._shard(idx)
                x = self.images[idx]
            yield self.normalize(x), self.labels[idx]

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (along the first dimension)."""
        if self.world_size == 1:
            return t
        per_rank = math.ceil(len(t) / self.world_size)
        return t[self.rank * per_rank:(self.rank + 1) * per_rank]


def _per_channel(values: Sequence[float], chans: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * chans
    if len(values) != chans:
        raise ConfigError(f"mean/std have {len(values)} values for {chans} channels")
    return values
