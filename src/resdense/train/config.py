"""The training configuration: one typed dataclass, resolved from
defaults < recipe < config file (YAML or JSON) < command-line flags, and saved with every run
and inside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ConfigError
from ..limits import check_config_size, check_config_tree


@dataclass
class TrainConfig:
    # what to train
    model: str = "resnet20"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    download: bool = False
    val_size: Optional[int] = None          # None: the dataset's default hold-out (55k/5k, 45k/5k ...)
    train_subset: Optional[int] = None      # train on a fixed, seeded subset of this many images
    image_size: Optional[int] = None        # image folders: resize every image to this square size once
    bad_images: str = "error"               # image folders: error | skip files Pillow cannot decode
    # how long
    recipe: str = "quick"
    epochs: Optional[int] = None
    iterations: Optional[int] = None        # overrides epochs; the run stops mid-epoch at this step
    batch_size: int = 128
    # optimiser
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True        # the papers decay every parameter
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None       # clip the gradient's global L2 norm to this before each step
    # learning-rate schedule (a pure function of the step; see schedule.py)
    schedule: str = "step"                  # step | cosine | onecycle
    milestones: list[float] = field(default_factory=list)  # >= 1: iterations; < 1: fractions of the run
    gamma: float = 0.1
    warmup: float = 0.0                     # linear warm-up: iterations (>= 1) or fraction of the run
    warmup_lr: Optional[float] = None       # constant lr until training error < warmup_until_error ...
    warmup_until_error: Optional[float] = None
    warmup_min_depth: int = 0               # ... applied only to models at least this deep (ResNet-110)
    # short runs (see schedule.adapt_short_run): 0 keeps the recipe exactly; `resdense train` sets
    # them when the recipe's lr, warm-up and length are left alone
    short_run_steps: int = 0                # below this many steps: warm-up floor, lr scaled down
    min_steps: int = 0                      # epochs (not iterations) extended to at least this many steps
    # fine-tuning (see finetune.py)
    init_from: Optional[str] = None         # a run directory or a weights file to start from
    freeze_backbone: bool = False           # train the classifier only
    backbone_lr_factor: float = 1.0         # the backbone's lr is this times the classifier's
    # data augmentation and regularisation
    augment: bool = True
    pad: int = 4
    flip: float = 0.5
    drop_rate: Optional[float] = None
    drop_rate_without_augment: Optional[float] = None  # DenseNet: 0.2 when augmentation is off
    tta_flip: bool = False                  # evaluate on the image and its mirror (averaged softmax)
    # progressive resizing: training images start at min_scale x their size and grow linearly to
    # full size over the first resize_ramp of the epochs, in multiples of resize_step pixels
    min_scale: float = 1.0
    resize_ramp: float = 0.75
    resize_step: int = 4
    # machine
    device: str = "auto"
    precision: str = "auto"                 # auto (bf16 where the hardware has it) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    threads: Optional[int] = None
    sync_bn: bool = False                   # several processes: one BN over the global batch (CUDA)
    # bookkeeping
    seed: int = 0
    out: Optional[str] = None
    eval_batch_size: int = 1000
    curve_every: int = 50                   # steps between points of the training curve (curve.jsonl)
    checkpoint_every: Optional[int] = None  # also checkpoint every N steps inside an epoch (long epochs)
    eval_train: bool = False                # after training: eval-mode error on the training images
    test_subset: Optional[int] = None       # final test on a fixed seeded subset of this many test images
    record_gradients: bool = False
    # What a non-finite loss does: "stop" the run with an error (the last good checkpoint is kept),
    # or "finish" it there and evaluate the weights as they are (studies: a net that cannot be
    # trained at the recipe's lr is a result, e.g. a deep plain net without batch norm).
    on_divergence: str = "stop"
    progress: bool = True
    tensorboard: bool = True                # event files in RUN/tensorboard/ when the package is installed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any) -> Any:
    """Coerce ``value`` to the field's type where that is lossless (int -> float), else refuse."""
    hint = _HINTS[name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    base = origin or hint
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list and isinstance(value, (list, tuple)):
        inner = args[0] if args else object
        return [_coerce_scalar(name, inner, v) for v in value]
    if base is dict and isinstance(value, dict):
        return _json_mapping(name, value)
    if base in (int, float, str, bool) and type(value) is base:
        return value
    raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)}; got {value!r}")


def _json_mapping(name: str, value: dict) -> dict:
    """A copy of ``value`` if it can be saved as JSON with every run (string keys; strings, numbers,
    booleans, None, lists and mappings of them): a set or a complex number would only fail later,
    when config.json is written, as a traceback."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = None
    if text is None or any(not isinstance(k, str) for k in value):
        raise ConfigError(f"{name} must map names to plain values (numbers, strings, true/false, lists); got {value!r:.120}")
    return json.loads(text)


def _coerce_scalar(name: str, kind: Any, value: Any) -> Any:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is object or isinstance(value, kind):
        return value
    raise ConfigError(f"{name} must be a list of {kind.__name__}; got {value!r}")


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied; unknown keys and wrong types are refused."""
    unknown = sorted(map(str, set(overrides) - set(FIELDS)))  # a YAML key may be a number
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}; valid ones are listed by `resdense train --help`")
    values = {k: _check_type(k, v) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML or JSON file (a mapping of TrainConfig fields)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must be YAML (.yaml, .yml) or JSON (.json), by its name; "
                          f"got {suffix or 'no extension'}")
    try:
        check_config_size(path.stat().st_size, f"config file {path}")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML or JSON") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: either way the file is malformed
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config file {path} is not valid {suffix.lstrip('.').upper()}: {detail}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    check_config_tree(data, f"config file {path}")  # before anything walks it: an alias bomb stays unexpanded
    return data


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse values no run can use; messages name the flag."""
    floats = {f: getattr(cfg, f) for f, hint in _HINTS.items() if hint in (float, Optional[float])}
    for name, value in floats.items():
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number; got {value}")
    if not all(math.isfinite(m) for m in cfg.milestones):
        raise ConfigError(f"milestones must be finite numbers; got {cfg.milestones}")
    checks = [
        (cfg.lr > 0, f"--lr must be positive; got {cfg.lr}"),
        (cfg.batch_size > 0, f"--batch-size must be positive; got {cfg.batch_size}"),
        (cfg.eval_batch_size > 0, f"eval_batch_size must be positive; got {cfg.eval_batch_size}"),
        (cfg.epochs is None or cfg.epochs > 0, f"--epochs must be positive; got {cfg.epochs}"),
        (cfg.iterations is None or cfg.iterations > 0, f"--iterations must be positive; got {cfg.iterations}"),
        (cfg.epochs is not None or cfg.iterations is not None, "give --epochs or --iterations (or a --recipe that sets one)"),
        (cfg.weight_decay >= 0, f"weight_decay must be >= 0; got {cfg.weight_decay}"),
        (0 <= cfg.momentum < 1, f"momentum must be in [0, 1); got {cfg.momentum}"),
        (0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1); got {cfg.label_smoothing}"),
        (cfg.train_subset is None or cfg.train_subset > 0, f"--train-subset must be positive; got {cfg.train_subset}"),
        (cfg.test_subset is None or cfg.test_subset > 0, f"test_subset must be positive; got {cfg.test_subset}"),
        (cfg.pad >= 0 and 0 <= cfg.flip <= 1, "pad must be >= 0 and flip a probability"),
        (cfg.warmup >= 0, f"warmup must be >= 0; got {cfg.warmup}"),
        (cfg.threads is None or cfg.threads > 0, f"--threads must be positive; got {cfg.threads}"),
        (cfg.curve_every > 0, f"curve_every must be positive; got {cfg.curve_every}"),
        (cfg.checkpoint_every is None or cfg.checkpoint_every > 0,
         f"--checkpoint-every must be positive; got {cfg.checkpoint_every}"),
        (0 < cfg.min_scale <= 1, f"min_scale must be in (0, 1]; got {cfg.min_scale}"),
        (0 < cfg.resize_ramp <= 1, f"resize_ramp must be in (0, 1]; got {cfg.resize_ramp}"),
        (cfg.resize_step > 0, f"resize_step must be positive; got {cfg.resize_step}"),
        (cfg.image_size is None or cfg.image_size > 0, f"--image-size must be positive; got {cfg.image_size}"),
        (cfg.bad_images in ("error", "skip"), f"--bad-images must be error or skip; got {cfg.bad_images!r}"),
        (cfg.short_run_steps >= 0 and cfg.min_steps >= 0, "short_run_steps and min_steps must be >= 0"),
        (cfg.on_divergence in ("stop", "finish"), f"on_divergence must be stop or finish; got {cfg.on_divergence!r}"),
        (cfg.grad_clip is None or cfg.grad_clip > 0, f"grad_clip must be positive; got {cfg.grad_clip}"),
        (cfg.backbone_lr_factor >= 0, f"--backbone-lr-factor must be >= 0; got {cfg.backbone_lr_factor}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
