"""Predict the classes of image files with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from .errors import DataError
from .limits import TOO_LARGE, image_too_large


class Predictor:
    """A trained model on its fast inference path, with the preprocessing it was trained with."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], device: torch.device | str = "cpu") -> None:
        from .export import inference_model

        self.device = torch.device(device)
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.in_chans, self.height, self.width = (int(v) for v in meta["input_size"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
        # BN folded into the convolutions, channels-last: the same outputs, less work.
        self.model = inference_model(model.to(self.device), fold=True, channels_last=True)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> "Predictor":
        from .train.checkpoint import load_for_inference

        model, meta = load_for_inference(path)
        return cls(model, meta, device)

    def load_image(self, path: str | Path) -> torch.Tensor:
        """An image file as uint8 (C, H, W) in the model's channels and size (grayscale <-> RGB converted)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                too_large = image_too_large(*img.size)
                if too_large:
                    raise DataError(f"image {path}: {too_large}")
                img = img.convert("L" if self.in_chans == 1 else "RGB")
                if img.size != (self.width, self.height):
                    img = img.resize((self.width, self.height), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
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
        if arr.ndim == 2:
            arr = arr[:, :, None]
        chans = np.broadcast_to(arr, (*arr.shape[:2], self.in_chans)) if arr.shape[2] != self.in_chans else arr
        return torch.from_numpy(np.array(chans)).permute(2, 0, 1)  # (H, W, C) -> (C, H, W); a writable copy

    @torch.no_grad()
    def predict(self, images: torch.Tensor, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """Top-k (class, probability) for a uint8 batch (N, C, H, W)."""
        x = (images.float() / 255 - self.mean) / self.std
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        probs = self.model(x).float().softmax(1).cpu()
        k = min(top_k, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]

    def predict_files(self, paths: Sequence[str | Path], top_k: int = 3) -> list[dict[str, Any]]:
        batch = torch.stack([self.load_image(p) for p in paths])
        return [{"image": str(p), "top": [{"class": c, "probability": v} for c, v in top]}
                for p, top in zip(paths, self.predict(batch, top_k))]
