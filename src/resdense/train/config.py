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


@dataclass(frozen=True)
class Flag:
    """How a setting appears on ``resdense train``'s command line (see :func:`setting`)."""

    names: tuple[str, ...] = ()      # option strings; default --NAME (booleans switched off: --no-NAME)
    help: Optional[str] = None       # the flag's help where it reads otherwise than the setting's
    positive: bool = False           # numbers: refuse zero and below when parsing
    choices: tuple[str, ...] = ()
    metavar: Optional[str] = None
    group: Optional[str] = None      # a titled section of --help
    switch: str = "on"               # booleans: "on" (--NAME), "off" (--no-NAME) or "both"
    exclusive: Optional[str] = None  # flags with the same word here cannot be given together
    required: bool = False
    pairs: bool = False              # repeatable KEY=VALUE pairs (a mapping such as model_kwargs)


def setting(default: Any = dataclasses.MISSING, help: str = "", flag: Optional[Flag] = None, *,
            factory: Any = dataclasses.MISSING) -> Any:
    """A :class:`TrainConfig` field: its default (or ``factory``), its help line, and its
    command-line ``flag``; without one it is set with ``--set NAME=VALUE`` or a config file (every
    field is, flag or not)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "flag": flag})


IMAGE_FOLDERS, FINE_TUNING = "image folders", "fine-tuning"


@dataclass
class TrainConfig:
    # what to train
    model: str = setting("resnet20", "registered model name (see `resdense list`); default resnet20", Flag())
    model_kwargs: dict[str, Any] = setting(
        help="the model builder's arguments beyond the name's (depth, shortcut ...)", factory=dict,
        flag=Flag(names=("--arg", "-a"), pairs=True, metavar="KEY=VALUE",
                  help="model builder argument, e.g. -a shortcut=B"))
    data: str = setting("fashion-mnist", "fashion-mnist, mnist, cifar10, cifar100, synthetic, or a folder of images",
                        Flag())
    data_dir: Optional[str] = setting(
        None, "where the dataset files are (else $RESDENSE_DATA, system paths, the cache)", Flag())
    download: bool = setting(False, "download the dataset if it is missing", Flag())
    val_size: Optional[int] = setting(
        None, "images held out of training for validation (default: the dataset's own hold-out, 55k/5k, 45k/5k ...)",
        Flag(metavar="N"))
    train_subset: Optional[int] = setting(None, "train on a fixed seeded subset of N images",
                                          Flag(positive=True, metavar="N"))
    image_size: Optional[int] = setting(
        None, "resize every image to PX x PX once (e.g. 224 for ImageNet weights); default: the folder's most "
              "common size", Flag(positive=True, metavar="PX", group=IMAGE_FOLDERS))
    bad_images: str = setting(
        "error", "an image Pillow cannot decode: stop with its name (default) or skip it with a warning",
        Flag(choices=("error", "skip"), group=IMAGE_FOLDERS))
    # how long
    recipe: str = setting("quick", "resnet-cifar-paper, densenet-cifar-paper, finetune or quick (default)", Flag())
    epochs: Optional[int] = setting(None, "training length in epochs (default: the recipe's)",
                                    Flag(positive=True, exclusive="length"))
    iterations: Optional[int] = setting(None, "training length in steps, instead of epochs: the run stops at this "
                                              "step, inside an epoch if need be", Flag(positive=True, exclusive="length"))
    batch_size: int = setting(128, "images per step (over all processes)", Flag(positive=True))
    # optimiser
    lr: float = setting(0.1, "peak learning rate", Flag(positive=True))
    momentum: float = setting(0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = setting(False, "Nesterov momentum")
    weight_decay: float = setting(1e-4, "L2 weight decay", Flag())
    decay_norm_and_bias: bool = setting(True, "decay batch-norm and bias parameters too (the papers decay every "
                                              "parameter)")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss, in [0, 1)")
    grad_clip: Optional[float] = setting(None, "clip the gradient's global L2 norm to this before each step")
    # learning-rate schedule (a pure function of the step; see schedule.py)
    schedule: str = setting("step", "learning-rate schedule: step, cosine or onecycle")
    milestones: list[float] = setting(help="step schedule: where the lr is multiplied by gamma (>= 1: iterations; "
                                           "< 1: fractions of the run)", factory=list)
    gamma: float = setting(0.1, "step schedule: the factor at each milestone")
    warmup: float = setting(0.0, "linear warm-up: iterations (>= 1) or a fraction of the run (< 1)")
    warmup_lr: Optional[float] = setting(None, "a constant lr until the training error is below warmup_until_error "
                                               "(ResNet-110's warm-up)")
    warmup_until_error: Optional[float] = setting(None, "the running training error that ends the warmup_lr warm-up")
    warmup_min_depth: int = setting(0, "warmup_lr applies only to models at least this deep")
    # short runs (see schedule.adapt_short_run): 0 keeps the recipe exactly; `resdense train` sets
    # them when the recipe's lr, warm-up and length are left alone
    short_run_steps: int = setting(0, "runs of fewer steps get a warm-up floor and a lower peak lr (0: the recipe "
                                      "exactly)")
    min_steps: int = setting(0, "a length in epochs is extended to at least this many steps (0: as given)")
    # fine-tuning (see finetune.py)
    init_from: Optional[str] = setting(
        None, "start from these weights (a run, `resdense import`'s output, or a .pth/.safetensors file with --model); "
              "a new classifier when the number of classes differs", Flag(metavar="RUN_DIR|FILE", group=FINE_TUNING))
    freeze_backbone: bool = setting(False, "train the classifier only", Flag(group=FINE_TUNING))
    backbone_lr_factor: float = setting(1.0, "the backbone learns at F times the classifier's lr (e.g. 0.1)",
                                        Flag(metavar="F", group=FINE_TUNING))
    recalibrate_bn: bool = setting(False, "re-estimate the batch-norm statistics on the new training images before "
                                          "the first step (with --init-from; the finetune recipe's default)",
                                   Flag(group=FINE_TUNING, switch="both"))
    # data augmentation and regularisation
    augment: bool = setting(True, "pad-crop and flip the training images", Flag(switch="off", help="no pad-crop / flip"))
    pad: int = setting(4, "pixels of zero padding around an image before its random crop")
    flip: float = setting(0.5, "probability of a horizontal flip")
    drop_rate: Optional[float] = setting(None, "dropout rate given to the model builder (default: the model's)")
    drop_rate_without_augment: Optional[float] = setting(None, "dropout when augmentation is off (DenseNet: 0.2)")
    tta_flip: bool = setting(False, "evaluate on the image and its mirror (averaged softmax)")
    # progressive resizing: training images start at min_scale x their size and grow linearly to
    # full size over the first resize_ramp of the epochs, in multiples of resize_step pixels
    min_scale: float = setting(1.0, "progressive resizing: the first epoch's images at this fraction of their size")
    resize_ramp: float = setting(0.75, "progressive resizing: the fraction of the epochs over which images grow "
                                       "to full size")
    resize_step: int = setting(4, "progressive resizing: image sizes in multiples of this many pixels")
    # machine
    device: str = setting("auto", "auto (default), cpu, cuda, cuda:N", Flag())
    precision: str = setting("auto", "auto: bf16 where the hardware runs it natively (CUDA, AMX/AVX512-BF16 CPUs), "
                                     "else fp32", Flag(choices=("auto", "bf16", "fp32")))
    channels_last: bool = setting(True, "channels-last memory format for the model and its inputs")
    compile: bool = setting(False, "torch.compile the model (opt-in)", Flag())
    cuda_graphs: bool = setting(False, "capture each training step's forward and backward in CUDA graphs (static "
                                       "shapes: full batches, one graph per image size); CUDA only", Flag())
    deterministic: bool = setting(False, "deterministic algorithms only", Flag())
    threads: Optional[int] = setting(None, "CPU threads for PyTorch", Flag(positive=True))
    sync_bn: bool = setting(False, "with several CUDA processes: batch norm over the global batch (default: per "
                                   "process)", Flag())
    # bookkeeping
    seed: int = setting(0, "the run's seed: initialisation, data order, augmentation, training subset", Flag())
    out: Optional[str] = setting(None, "the run directory: checkpoints, metrics, summary",
                                 Flag(metavar="RUN_DIR", required=True))
    eval_batch_size: int = setting(1000, "images per batch in evaluation")
    curve_every: int = setting(50, "steps between points of the training curve (curve.jsonl)")
    checkpoint_every: Optional[int] = setting(
        None, "also write a checkpoint every N steps inside an epoch (long epochs; resume continues there)",
        Flag(positive=True, metavar="N"))
    eval_train: bool = setting(False, "after training: the eval-mode error on the training images")
    test_subset: Optional[int] = setting(None, "the final test on a fixed seeded subset of this many test images")
    record_gradients: bool = setting(False, "store per-layer gradient norms and their figure every epoch", Flag())
    # What a non-finite loss does: "stop" the run with an error (the last good checkpoint is kept),
    # or "finish" it there and evaluate the weights as they are (studies: a net that cannot be
    # trained at the recipe's lr is a result, e.g. a deep plain net without batch norm).
    on_divergence: str = setting("stop", "a non-finite loss: stop with an error (the last good checkpoint kept) or "
                                         "finish the run there and evaluate its weights as they are")
    progress: bool = setting(True, "a progress bar per epoch on a terminal", Flag(switch="off", help="no progress bar"))
    tensorboard: bool = setting(True, "TensorBoard event files in RUN_DIR/tensorboard (default: when the package is "
                                      "installed)", Flag(switch="both"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def help_of(name: str) -> str:
    """The help line of setting ``name``."""
    return FIELDS[name].metadata.get("help", "")


def flag_of(name: str) -> Optional[Flag]:
    """Setting ``name``'s command-line flag; None for a setting given with --set or a config file only."""
    return FIELDS[name].metadata.get("flag")


def default_of(name: str) -> Any:
    """Setting ``name``'s default value."""
    f = FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def value_type(name: str) -> Any:
    """The type of setting ``name``'s values (int for Optional[int], list for list[float] ...)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


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
