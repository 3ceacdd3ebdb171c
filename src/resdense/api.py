"""The Python face of resdense: trained models, training runs and studies as Python objects.

* :func:`load` — a trained, imported or exported model that knows its classes, normalisation
  and input size, ready to :meth:`~TrainedModel.predict`;
* :func:`pretrained_weights` — what ``create_model(name, pretrained=...)`` loads;
* :func:`train` and :func:`run_study` — the command line's ``train`` and ``study``, returning
  :class:`TrainResult` and :class:`StudyResult`.

Every mistake raises a :class:`~resdense.errors.UserError` subclass with a one-line message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError
from .predict import ImageInput, image_batch, normalise, top_classes

PathLike = Union[str, Path]


class TrainedModel(nn.Module):
    """A trained network with what it was trained on: class names, mean/std, input size.

    ``model(x)`` gives logits for a normalised float batch, as the network alone would;
    :meth:`predict` takes images (files, PIL images, uint8 or 0..1 float tensors) and gives
    named probabilities. ``meta`` is the checkpoint's metadata (``model``, ``config`` ...).
    """

    def __init__(self, net: nn.Module, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.meta = dict(meta)
        self.classes: list[str] = list(meta["classes"])
        self.input_size: tuple[int, int, int] = tuple(int(v) for v in meta["input_size"])  # type: ignore[assignment]
        self.register_buffer("mean", torch.tensor(meta["mean"], dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(meta["std"], dtype=torch.float32), persistent=False)
        self.eval()

    @property
    def model_name(self) -> str:
        return str(self.meta["model"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """``images`` as the network's input batch: files and PIL images resized to the input
        size, every image scaled to 0..1 and normalised with the training mean and std."""
        c, h, w = self.input_size
        return normalise(image_batch(images, c, h, w), self.mean.cpu(), self.std.cpu()).to(self.mean.device)

    @torch.no_grad()
    def predict(self, images: ImageInput, top_k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, its ``top_k`` (class name, probability), most likely first."""
        if top_k < 1:
            raise ConfigError(f"top_k must be a positive integer; got {top_k}")
        was_training = self.training
        try:
            return top_classes(self.eval()(self.preprocess(images)), self.classes, top_k)
        finally:
            self.train(was_training)

    def extra_repr(self) -> str:
        return f"model={self.model_name}, classes={len(self.classes)}, input_size={self.input_size}"


def _safetensors_meta(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None
    if "resdense" not in header:
        raise CheckpointError(f"{path} holds weights only (no resdense metadata); import it first: "
                              f"resdense import {path} --model NAME --out RUN_DIR")
    from .train.checkpoint import check_meta

    try:
        meta = json.loads(header["resdense"])
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: its resdense metadata is damaged") from None
    return check_meta(meta, path)


def _load_export(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A ``resdense export --format safetensors`` file: the model (BN-folded where it was
    exported folded) and the metadata of the checkpoint it came from."""
    from .export import fold_bn
    from .train.checkpoint import build_model_from_meta, load_weights

    meta = _safetensors_meta(path)
    for key in ("classes", "mean", "std", "input_size"):
        if not meta.get(key):
            raise CheckpointError(f"{path} records no {key} (exported from an untrained --model?); "
                                  "export a trained run: resdense export --checkpoint RUN_DIR --format safetensors")
    model = build_model_from_meta(meta)
    if meta.get("folded_bn"):  # the same structure as the exported module: BNs replaced by identities
        model = fold_bn(model, torch.zeros(1, *meta["input_size"]))
    load_weights(model, _read_safetensors(path), source=str(path))
    return model.eval(), meta


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable ({str(e).splitlines()[0][:100]})") from None


def load_checkpoint(source: PathLike, prefer: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The network (eval mode) and metadata of a run or checkpoint directory (trained or made by
    ``resdense import``) or of a ``.safetensors`` file written by ``resdense export``."""
    from .train.checkpoint import load_for_inference

    path = Path(source)
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path} is an ONNX file, not a PyTorch model; predict with it by "
                              f"`resdense predict --checkpoint {path} IMAGE` or onnxruntime")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return _load_export(path)
    if path.is_file():
        raise CheckpointError(f"{path} is not a resdense run; import it first: "
                              f"resdense import {path} --model NAME --out RUN_DIR")
    return load_for_inference(path, prefer)


def load(source: PathLike, *, prefer: str = "best", device: Union[str, torch.device] = "cpu") -> TrainedModel:
    """A trained model from a run directory (its ``best`` checkpoint, or ``prefer="last"``), a
    checkpoint directory, an ``import`` output or an exported ``.safetensors`` file."""
    if prefer not in ("best", "last"):
        raise ConfigError(f"prefer must be 'best' or 'last'; got {prefer!r}")
    net, meta = load_checkpoint(source, prefer)
    return TrainedModel(net, meta).to(device)


def pretrained_weights(name: str, source: Any, kwargs: Mapping[str, Any]) -> tuple[
        dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """For ``create_model(name, pretrained=source, **kwargs)``: the builder arguments (the
    checkpoint's, then ``kwargs``), the weights and the metadata; refused in one line when the
    checkpoint holds another model."""
    if not isinstance(source, (str, Path)):  # pretrained=True: there are no bundled weights to mean
        raise ConfigError(f"pretrained= takes a run directory or an exported .safetensors file, not {source!r}; "
                          "resdense ships no weights (resdense import turns published ones into a run)")
    net, meta = load_checkpoint(source)
    if meta["model"] != name:
        raise CheckpointError(f"{source} holds {meta['model']} weights, not {name}; "
                              f"use create_model({meta['model']!r}, pretrained=...) or resdense.load({str(source)!r})")
    if meta.get("folded_bn"):
        raise CheckpointError(f"{source} holds weights with batch norm folded into the convolutions, which "
                              f"{name} cannot take; use resdense.load({str(source)!r}) or export without --fold-bn")
    return {**meta.get("model_kwargs", {}), **kwargs}, dict(net.state_dict()), meta


# --- training runs and studies ----------------------------------------------------------------


@dataclass
class TrainResult:
    """One finished training run: its folder, resolved settings and summary (``summary.json``)."""

    run_dir: Path
    config: Any  # TrainConfig
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def test_error(self) -> Optional[float]:
        """The final model's test error (0..1), where the run measured one."""
        return self.summary.get("test_error_last")

    def load(self, prefer: str = "best") -> TrainedModel:
        """The run's trained model (see :func:`load`)."""
        return load(self.run_dir, prefer=prefer)


def train_config(config: Any = None, **settings: Any) -> Any:
    """A :class:`~resdense.train.config.TrainConfig` from ``config`` (a TrainConfig, a mapping of
    its fields, or a YAML/JSON file) and ``settings`` over it: defaults < recipe < config < settings."""
    return _resolve(config, settings)[0]


def _resolve(config: Any, settings: Mapping[str, Any]) -> tuple[Any, set[str]]:
    """The config of :func:`train_config`, and the names of the settings the caller chose."""
    from .train.config import FIELDS, TrainConfig, apply_overrides, load_config_file
    from .train.recipes import recipe

    if isinstance(config, TrainConfig):  # every field chosen: a TrainConfig is complete
        return apply_overrides(config, dict(settings), "train()"), set(FIELDS)
    if isinstance(config, (str, Path)):
        values, source = load_config_file(config), str(config)
    elif config is None or isinstance(config, Mapping):
        values, source = dict(config or {}), "config"
    else:
        raise ConfigError(f"train() takes a TrainConfig, a mapping or a config file; got a {type(config).__name__}")
    name = settings.get("recipe") or values.get("recipe") or TrainConfig.recipe
    cfg = apply_overrides(TrainConfig(), {**recipe(name), "recipe": name}, f"recipe {name}")
    return apply_overrides(apply_overrides(cfg, values, source), dict(settings), "train()"), {*values, *settings}


def train(config: Any = None, *, resume: bool = False, overwrite: bool = False, **settings: Any) -> TrainResult:
    """Train one run, as ``resdense train`` does, and return it as a :class:`TrainResult`.

    ``config`` and ``settings`` are :class:`~resdense.train.config.TrainConfig` fields (see
    :func:`train_config`); ``out`` names the run directory. The recipe is used as written (the
    command line's short-run adaptation is not applied)."""
    from .train import finetune
    from .train.config import apply_overrides
    from .train.runner import train as run_training

    cfg, chosen = _resolve(config, settings)
    if cfg.out is None:
        raise ConfigError("train() needs out=RUN_DIR: the folder the run is written to")
    if not resume:  # as the command line: a fine-tune takes its model from init_from unless one is named
        cfg = apply_overrides(cfg, finetune.init_model_settings(cfg, "model" in chosen), "init_from")
    summary = run_training(cfg, resume=resume, overwrite=overwrite, flag_overrides=settings)
    return TrainResult(Path(cfg.out), cfg, dict(summary or {}))


@dataclass
class StudyResult:
    """A study's folder, whether every run is finished, the runs this call trained, and its
    report (the table, the decided claims ...; None until every run is finished)."""

    out: Path
    complete: bool
    trained: list[str]
    report: Optional[dict[str, Any]]

    @property
    def verdicts(self) -> list[Any]:
        """The claims' decisions (empty while the study is incomplete)."""
        return list((self.report or {}).get("verdicts", []))


def run_study(study: str = "degradation", *, out: PathLike, preset: str = "quick", seeds: tuple[int, ...] = (0, 1, 2),
              data: str = "fashion-mnist", data_dir: Optional[str] = None, options: Optional[Mapping[str, Any]] = None,
              overrides: Optional[Mapping[str, Any]] = None, jobs: int = 1, quiet: bool = False) -> StudyResult:
    """Run (or continue) study ``study`` into ``out``, as ``resdense study`` does: ``options`` are
    the study's own (``depths`` ...; its defaults where not given), ``overrides`` reach every run's
    settings (``--set``). Progress lines are printed unless ``quiet``."""
    from .studies import StudyConfig, get_study
    from .studies import run_study as run
    from .studies.engine import silent

    spec = get_study(study)
    unknown = sorted(set(options or {}) - set(spec.default_options))
    if unknown:
        raise ConfigError(f"study {study} has no option {', '.join(unknown)}; its options are "
                          f"{', '.join(spec.default_options) or 'none'}")
    cfg = StudyConfig(study=spec.name, data=data, data_dir=data_dir, seeds=[int(s) for s in seeds], preset=preset,
                      out=str(out), options={**spec.default_options, **(options or {})}, overrides=dict(overrides or {}))
    result = run(cfg, jobs=jobs, log=silent if quiet else print)
    return StudyResult(Path(out), bool(result["complete"]), list(result["trained"]), result["report"])
