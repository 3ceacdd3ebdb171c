"""The data pipeline alone: augmented training batches per second, resdense vs the usual way.

* ``resdense``: :class:`resdense.data.TensorLoader` over a uint8 tensor; each batch is gathered,
  pad-4-cropped, flipped and normalised by a handful of batched tensor operations and returned
  channels-last.
* ``usual, N workers``: what a torchvision training script does, written out here without
  torchvision (:class:`UsualDataset`): per sample, uint8 array -> PIL image -> zero-pad 4 and
  random crop -> random horizontal flip -> float CHW tensor / 255 -> normalise; batched by
  ``torch.utils.data.DataLoader`` (batch 128, shuffled) with 0 and 2 worker processes.

The data: 10,000 random uint8 3x32x32 images (CIFAR-shaped; the pixel values do not change the
work), and the real Fashion-MNIST 1x28x28 training split when it is installed. Rates are medians
over timed windows of consecutive batches, after warm-up batches (which also start the workers).
The goal (the "speed and scale" issue): resdense >= 20x the usual way's best.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from ..data import Augment, TensorLoader, channel_stats, load_dataset
from ..data.loader import _per_channel
from ..errors import UserError
from ..hardware import resolve_device
from ._common import BenchOptions, Row, format_table, median, say, sync, with_threads, write_rows

PIPELINE_GOAL = 20.0  # resdense batches/s over the usual way's best, at least
BATCH = 128
WORKERS = (0, 2)
PAPER_AUGMENT = Augment(pad=4, flip=0.5)  # frozen: safe as a shared default
CPU = torch.device("cpu")


class UsualDataset(Dataset):
    """A per-sample map-style dataset doing what torchvision's ``RandomCrop(size, padding=pad)``,
    ``RandomHorizontalFlip(flip)``, ``ToTensor()`` and ``Normalize(mean, std)`` do, on images
    kept as a uint8 numpy array the way torchvision's CIFAR and MNIST datasets keep them.

    Args:
        images: uint8 (N, C, H, W) tensor; stored as (N, H, W, C) numpy, or (N, H, W) for one channel.
        labels: (N,) integer labels.
        mean, std: per-channel normalisation in [0, 1] units.
        augment: pad-crop and flip settings (``None``: no augmentation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Optional[Augment] = PAPER_AUGMENT) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        hwc = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
        self.data = hwc[..., 0].copy() if hwc.shape[-1] == 1 else hwc  # PIL wants (H, W) for grey images
        self.targets = [int(t) for t in labels]
        chans = images.shape[1]
        self.mean = torch.tensor(_per_channel(mean, chans)).view(-1, 1, 1)
        self.std = torch.tensor(_per_channel(std, chans)).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.data[index])
        aug = self.augment
        if aug is not None and aug.pad > 0:
            # Offsets drawn like torchvision's RandomCrop.get_params: uniform in [0, 2 * pad].
            top = int(torch.randint(0, 2 * aug.pad + 1, size=(1,)).item())
            left = int(torch.randint(0, 2 * aug.pad + 1, size=(1,)).item())
            img = pad_crop(img, aug.pad, top, left)
        if aug is not None and aug.flip > 0 and torch.rand(1).item() < aug.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = to_tensor(img)
        return (x - self.mean) / self.std, self.targets[index]


def pad_crop(img: Image.Image, pad: int, top: int, left: int) -> Image.Image:
    """Zero-pad ``img`` by ``pad`` on every side, then crop its original size at (top, left) of
    the padded image (what ``RandomCrop(padding=pad)`` does once it has drawn the offsets)."""
    w, h = img.size
    padded = ImageOps.expand(img, border=pad, fill=0)
    return padded.crop((left, top, left + w, top + h))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A uint8 PIL image as float32 (C, H, W) in [0, 1] (what ``ToTensor`` does)."""
    arr = np.array(img, dtype=np.uint8, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div(255.0)  # (H, W, C) -> (C, H, W)


def usual_loader(images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 batch_size: int = BATCH, num_workers: int = 0, augment: Optional[Augment] = PAPER_AUGMENT,
                 seed: int = 0) -> DataLoader:
    """The usual way end to end: :class:`UsualDataset` in a shuffling, batch-dropping DataLoader.
    Workers persist across epochs, as in a training script that sets ``persistent_workers``."""
    return DataLoader(UsualDataset(images, labels, mean, std, augment), batch_size=batch_size, shuffle=True,
                      drop_last=True, num_workers=num_workers, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def endless(loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader`` epoch after epoch (calling ``set_epoch`` where the loader has it)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


@dataclass(frozen=True)
class PipelineData:
    """One data set to push through both pipelines."""

    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str


def random_images(n: int, shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uniformly random uint8 images and labels (only the shape matters to a pipeline's speed)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
            torch.randint(0, num_classes, (n,), generator=g))


def _datasets(quick: bool) -> list[PipelineData]:
    n = 1024 if quick else 10_000
    images, labels = random_images(n)
    mean, std = channel_stats(images)
    out = [PipelineData("random 3x32x32", images, labels, mean, std,
                        f"{n} random uint8 CIFAR-shaped images (generated, not CIFAR)")]
    try:
        fm = load_dataset("fashion-mnist")
    except (UserError, OSError) as e:
        out.append(PipelineData("fashion-mnist", torch.empty(0, 1, 28, 28, dtype=torch.uint8),
                                torch.empty(0, dtype=torch.int64), (0.0,), (1.0,),
                                f"skipped: {str(e).splitlines()[0][:120]}"))
        return out
    n_fm = 2048 if quick else len(fm.train)
    out.append(PipelineData("fashion-mnist", fm.train.images[:n_fm], fm.train.labels[:n_fm], fm.mean, fm.std,
                            f"real Fashion-MNIST training split, {n_fm} images"))
    return out


def batch_rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], warmup: int, windows: int, per_window: int,
               device: torch.device = CPU) -> list[float]:
    """Seconds per batch in each of ``windows`` windows of ``per_window`` consecutive batches,
    after ``warmup`` untimed ones. Each batch is moved to ``device`` (a no-op on the CPU)."""
    def take(k: int) -> None:
        for x, y in itertools.islice(batches, k):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)

    take(warmup)
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        take(per_window)
        times.append((time.perf_counter() - start) / per_window)
    return times


def _loader(data: PipelineData, workers: Optional[int], device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """The resdense loader (``workers=None``) or the usual one with ``workers`` processes."""
    if workers is None:
        return TensorLoader(data.images, data.labels, BATCH, shuffle=True, augment=PAPER_AUGMENT, mean=data.mean,
                            std=data.std, device=device, channels_last=True, drop_last=True)
    return usual_loader(data.images, data.labels, data.mean, data.std, num_workers=workers)


def _measure(data: PipelineData, opts: BenchOptions, device: torch.device) -> list[Row]:
    warmup, windows, per_window = (2, 2, 2) if opts.quick else (4, 5, 10)
    base: dict[str, Any] = {"data": data.name, "shape": "x".join(map(str, data.images.shape[1:])), "batch": BATCH,
                            "images": len(data.images), "timed_batches": windows * per_window}
    rows = []
    for workers in (None, *WORKERS):
        name = "resdense" if workers is None else f"usual, {workers} workers"
        batches = endless(_loader(data, workers, device))
        try:
            times = batch_rate(batches, warmup, windows, per_window, device)
        finally:
            batches.close()  # drops the loader, which ends its persistent workers
            del batches
        s = median(times)
        rows.append({**base, "pipeline": name, "workers": workers or 0, "batches_per_s": 1.0 / s,
                     "images_per_s": BATCH / s, "batch_times_s": times})
        say(opts, f"   {data.name} {name}: {1.0 / s:.1f} batches/s")
    resdense = rows[0]
    for r in rows[1:]:
        r["resdense_speedup"] = resdense["batches_per_s"] / r["batches_per_s"]
    best = max(rows[1:], key=lambda r: r["batches_per_s"])
    resdense["vs_best_usual"] = resdense["batches_per_s"] / best["batches_per_s"]
    resdense["goal_met"] = resdense["vs_best_usual"] >= PIPELINE_GOAL
    return rows


COLUMNS = [("data", "data", "s"), ("pipeline", "pipeline", "s"), ("batches_per_s", "batches/s", ".1f"),
           ("images_per_s", "images/s", ",.0f"), ("resdense_speedup", "resdense x", ".1f"),
           ("vs_best_usual", "x best usual", ".1f"), ("goal_met", "goal", "")]


@with_threads
def run(opts: BenchOptions) -> list[Row]:
    """Measure both pipelines on every data set, print the table, write ``pipeline.json``."""
    device = resolve_device(opts.device)
    say(opts, f"== pipeline: augmented batches/s, resdense TensorLoader vs per-sample Dataset + DataLoader, "
              f"batch {BATCH}, {device.type}, {torch.get_num_threads()} threads")
    rows: list[Row] = []
    notes = []
    for data in _datasets(opts.quick):
        say(opts, f"   data: {data.name}: {data.note}")
        notes.append({"data": data.name, "note": data.note})
        if len(data.images) >= BATCH:
            rows += _measure(data, opts, device)
    say(opts, format_table(rows, COLUMNS))
    say(opts, f"goal: resdense >= {PIPELINE_GOAL:g}x the batches/s of the usual way's best (pad-4 crop, flip, "
              "normalise in both; resdense batches are channels-last and already on the device)")
    write_rows("pipeline", rows, opts, device, {"goal": {"vs_best_usual": PIPELINE_GOAL}, "data": notes})
    return rows
