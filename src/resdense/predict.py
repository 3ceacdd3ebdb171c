"""Predict the classes of images with a trained checkpoint or an exported ONNX file.

Images come as files, PIL images or tensors (:func:`image_batch`); files and PIL images are
converted to the model's channels and resized to its input size, tensors are taken as they are
(uint8 0..255 or float 0..1). :func:`top_classes` turns logits into named probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, DataError, InputError
from .limits import TOO_LARGE, image_too_large

# One image (a file, a PIL image, a (C, H, W) tensor), a list of them, or an (N, C, H, W) batch.
ImageInput = Union[str, Path, torch.Tensor, Any, Sequence[Any]]
# What an ONNX file exported by resdense carries in its metadata_props (JSON values).
ONNX_META_KEYS = ("model", "classes", "mean", "std", "input_size")


def pil_to_tensor(img: Any, in_chans: int, height: int, width: int) -> torch.Tensor:
    """A PIL image as uint8 (C, H, W) in ``in_chans`` channels (grayscale <-> RGB converted),
    resized to ``height`` x ``width``."""
    from PIL import Image

    too_large = image_too_large(*img.size)
    if too_large:
        raise DataError(f"image {getattr(img, 'filename', '') or 'given'}: {too_large}")
    img = img.convert("L" if in_chans == 1 else "RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    chans = np.broadcast_to(arr, (*arr.shape[:2], in_chans)) if arr.shape[2] != in_chans else arr
    return torch.from_numpy(np.array(chans)).permute(2, 0, 1)  # (H, W, C) -> (C, H, W); a writable copy


def read_image(path: str | Path, in_chans: int, height: int, width: int) -> torch.Tensor:
    """An image file as :func:`pil_to_tensor` gives it; a missing or undecodable file is a DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return pil_to_tensor(img, in_chans, height, width)
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is {TOO_LARGE}") from None
    except FileNotFoundError:
        raise DataError(f"no such image: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not an image file; give image files") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {path}: {str(e).splitlines()[0][:100]}") from None


def _one_image(item: Any, in_chans: int, height: int, width: int) -> torch.Tensor:
    if isinstance(item, (str, Path)):
        return read_image(item, in_chans, height, width)
    if isinstance(item, torch.Tensor):
        if item.dim() != 3:
            raise InputError(f"an image tensor is (C, H, W); got shape {tuple(item.shape)}")
        return item
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image, without importing PIL here
        return pil_to_tensor(item, in_chans, height, width)
    raise InputError(f"cannot read an image from a {type(item).__name__}; give a path, a PIL image or a tensor")


def image_batch(images: ImageInput, in_chans: int, height: int, width: int) -> torch.Tensor:
    """``images`` as one (N, C, H, W) batch: uint8 where they were files or PIL images."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = images
    else:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise InputError("no images given")
        tensors = [_one_image(item, in_chans, height, width) for item in items]
        if len({t.shape for t in tensors}) > 1:
            raise InputError("image tensors of different sizes cannot share a batch; give files or PIL images "
                             "(resized to the model's input size) or tensors of one size")
        if any(t.dtype != torch.uint8 for t in tensors):  # one scale for all: floats in 0..1
            tensors = [t.float() / 255 if t.dtype == torch.uint8 else t.float() for t in tensors]
        batch = torch.stack(tensors)
    if batch.shape[1] != in_chans:
        raise InputError(f"the model takes {in_chans} channel(s); the images have {batch.shape[1]}")
    return batch


def normalise(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A uint8 (0..255) or float (0..1) batch as the model's input: scaled, minus mean, over std."""
    x = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def top_classes(logits: torch.Tensor, classes: Sequence[str], top_k: int) -> list[list[tuple[str, float]]]:
    """The ``top_k`` (class name, probability) of each row of ``logits``, most likely first."""
    probs = logits.float().softmax(1).cpu()
    values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
    return [[(classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]


class _OnnxLogits:
    """An onnxruntime session as a function from an input batch to logits."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["logits"], {"input": x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def read_onnx_meta(path: str | Path, session: Any) -> dict[str, Any]:
    """The classes, normalisation and input size resdense stored in an ONNX file's metadata."""
    props = session.get_modelmeta().custom_metadata_map
    missing = [k for k in ONNX_META_KEYS if k not in props]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)} in its metadata; export it again with "
                              "`resdense export --checkpoint RUN_DIR --format onnx`")
    try:
        return {k: json.loads(props[k]) for k in ONNX_META_KEYS}
    except ValueError:
        raise CheckpointError(f"{path}: the resdense metadata is damaged") from None


class Predictor:
    """A trained model on its fast inference path, with the preprocessing it was trained with."""

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any],
                 device: torch.device | str = "cpu", *, prepared: bool = False) -> None:
        from .export import inference_model

        self.device = torch.device(device)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.in_chans, self.height, self.width = (int(v) for v in meta["input_size"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)
        # BN folded into the convolutions, channels-last: the same outputs, less work. A prepared
        # model (an ONNX session) is used as it is.
        self.model = model if prepared else inference_model(model.to(self.device), fold=True, channels_last=True)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> "Predictor":
        """From a run or checkpoint directory, or a .onnx or .safetensors file exported by resdense."""
        if Path(path).suffix.lower() == ".onnx":
            return cls.from_onnx(path)
        from .api import load_checkpoint

        model, meta = load_checkpoint(path)
        return cls(model, meta, device)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "Predictor":
        """From an ONNX file exported by resdense (onnxruntime on the CPU)."""
        from .export import onnx_session

        if not Path(path).is_file():
            raise CheckpointError(f"no such ONNX file: {path}")
        try:
            session = onnx_session(path)
        except Exception as e:  # onnxruntime raises its own exception types for a damaged file
            if getattr(e, "exit_code", None):
                raise
            raise CheckpointError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0][:100]})") from None
        return cls(_OnnxLogits(session), read_onnx_meta(path, session), "cpu", prepared=True)

    def load_image(self, path: str | Path) -> torch.Tensor:
        """An image file as uint8 (C, H, W) in the model's channels and size (grayscale <-> RGB converted)."""
        return read_image(path, self.in_chans, self.height, self.width)

    @torch.no_grad()
    def predict(self, images: ImageInput, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) of each image (see :func:`image_batch` for what ``images`` may be)."""
        batch = image_batch(images, self.in_chans, self.height, self.width)
        x = normalise(batch, self.mean, self.std).to(self.device).contiguous(memory_format=torch.channels_last)
        return top_classes(self.model(x), self.classes, top_k)

    def predict_files(self, paths: Sequence[str | Path], top_k: int = 3) -> list[dict[str, Any]]:
        return [{"image": str(p), "top": [{"class": c, "probability": v} for c, v in top]}
                for p, top in zip(paths, self.predict(list(paths), top_k))]
