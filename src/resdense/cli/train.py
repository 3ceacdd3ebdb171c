"""``resdense train``, ``resdense eval`` and ``resdense predict``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..train.config import FIELDS, Flag, default_of, flag_of, help_of, value_type
from ..train.recipes import SHORT_RUN_DEFAULTS
from ._util import int_list, parse_overrides, positive_float, positive_int


_NUMBERS = {int: (int, positive_int), float: (float, positive_float)}


def _flag_names(name: str, flag: Flag) -> tuple[str, ...]:
    if flag.names:
        return flag.names
    dashed = name.replace("_", "-")
    return (f"--no-{dashed}",) if flag.switch == "off" else (f"--{dashed}",)


def _flag_options(name: str, flag: Flag) -> dict[str, Any]:
    """add_argument's keywords for setting ``name``: its type, form and help. A flag not given is
    None, so that only what the user typed overrides the recipe and the config file."""
    options: dict[str, Any] = {"dest": name, "default": None, "help": help_of(name).replace("%", "%%")}
    if flag.help:
        options["help"] = flag.help.replace("%", "%%")
    kind = value_type(name)
    if flag.pairs:
        options.update(action="append")
    elif kind is bool:
        options["action"] = {"on": "store_true", "off": "store_false", "both": argparse.BooleanOptionalAction}[flag.switch]
    elif kind in _NUMBERS:
        options["type"] = _NUMBERS[kind][flag.positive]
    for key in ("choices", "metavar", "required"):
        if getattr(flag, key):
            options[key] = getattr(flag, key)
    return options


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """A flag for every TrainConfig setting that has one (see :func:`resdense.train.config.setting`),
    then --config and --set."""
    sections: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for name in FIELDS:
        flag = flag_of(name)
        if flag is None:
            continue
        where = p
        if flag.group:
            if flag.group not in sections:
                sections[flag.group] = p.add_argument_group(flag.group)
            where = sections[flag.group]
        if flag.exclusive:
            if flag.exclusive not in exclusive:
                exclusive[flag.exclusive] = where.add_mutually_exclusive_group()
            where = exclusive[flag.exclusive]
        where.add_argument(*_flag_names(name, flag), **_flag_options(name, flag))
    p.add_argument("--config", help="YAML or JSON file of settings (below flags, above the recipe)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config setting, e.g. --set label_smoothing=0.1")


def settings_without_flags() -> str:
    """--help's closing lines: the settings given only with --set (or a config file), each with its help."""
    names = [name for name in FIELDS if flag_of(name) is None]
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {help_of(name)}; default {default_of(name)!r}" for name in names]
    header = "settings without a flag (--set KEY=VALUE, or a --config file; defaults before the recipe's):"
    return "\n".join([header, *lines])


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (see --recipe)", epilog=settings_without_flags(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--seeds", type=int_list, help="several runs, e.g. 0,1,2: OUT/seed<N> each, mean ± std")
    p.add_argument("--fuse-seeds", action="store_true", help="with --seeds: train the seeds as one model (faster on "
                   "a GPU), written as the separate runs with their results")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR exactly where it stopped")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR")
    p.add_argument("--nproc", type=positive_int, help="train with N processes (DistributedDataParallel)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test error and confusion matrix of a trained model")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR[/best|/last]")
    p.add_argument("--data-dir")
    p.add_argument("--data", help="the dataset to evaluate on (default: the run's; needed for imported weights "
                   "that name none)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--out", help="where to write eval.json and confusion.png (default: the run directory)")
    p.add_argument("--tta-flip", action="store_true", help="average predictions over each image and its mirror")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR[/best|/last]|FILE",
                   help="a run, or a .onnx or .safetensors file written by `resdense export`")
    p.add_argument("--top-k", type=positive_int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_predict)


def config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """defaults < recipe < config file < flags; returns the config and the flag-level overrides."""
    from ..train.config import TrainConfig, apply_overrides, load_config_file
    from ..train.recipes import recipe

    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    flags: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(args, name, None) if flag_of(name) is not None else None
        if value is not None:
            flags[name] = value
    if "model_kwargs" in flags:  # -a KEY=VALUE pairs join the config file's
        flags["model_kwargs"] = {**file_values.get("model_kwargs", {}), **parse_overrides(flags["model_kwargs"])}
    flags.update(parse_overrides(getattr(args, "set", None), "--set", "lr=0.05"))
    if flags.get("epochs") is not None:
        flags.setdefault("iterations", None)  # an explicit length replaces the recipe's
    if flags.get("iterations") is not None:
        flags.setdefault("epochs", None)
    recipe_name = flags.get("recipe") or file_values.get("recipe") or TrainConfig.recipe
    cfg = apply_overrides(TrainConfig(), {**recipe(recipe_name), "recipe": recipe_name}, f"recipe {recipe_name}")
    cfg = apply_overrides(cfg, file_values, str(getattr(args, "config", "")))
    cfg = apply_overrides(cfg, flags, "command line")
    # The command line adapts a recipe to a small dataset (few steps: a warm-up floor, a lower
    # peak lr, more epochs; see schedule.adapt_short_run) unless the user chose the lr, warm-up,
    # schedule or length; library callers and studies get the recipe exactly as written.
    chosen = {**file_values, **flags}
    recipe_values = recipe(recipe_name)  # a recipe may set (or switch off) the adaptation itself
    adapt = {k: v for k, v in SHORT_RUN_DEFAULTS.items() if k not in chosen and k not in recipe_values}
    if {"lr", "warmup", "schedule"} & set(chosen):
        adapt.pop("short_run_steps", None)
    if {"epochs", "iterations"} & set(chosen):
        adapt.pop("min_steps", None)
    return apply_overrides(cfg, adapt, "short-run defaults"), flags


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.runner import train, train_seeds

    from ..train import finetune, tensorboard

    cfg, flags = config_from_args(args)
    if flags.get("recalibrate_bn") and cfg.init_from is None:  # a recipe's default is a no-op without weights
        raise ConfigError("--recalibrate-bn re-estimates the statistics of weights trained elsewhere: give --init-from, "
                          "or drop it")
    if flags.get("tensorboard"):
        tensorboard.require()
    if not args.resume:  # a resumed run keeps its saved model and never reads the init weights again
        from ..train.config import apply_overrides

        cfg = apply_overrides(cfg, finetune.init_model_settings(cfg, "model" in flags), "--init-from")
    if args.nproc and args.nproc > 1:
        from ..train.distributed import launch

        return launch(args.nproc, args.argv)
    if args.fuse_seeds and not args.seeds:
        raise ConfigError("--fuse-seeds trains the runs of --seeds together; add --seeds 0,1,2 (or drop --fuse-seeds)")
    if args.seeds:
        if args.seed is not None:
            raise ConfigError("give --seed or --seeds, not both")
        train_seeds(cfg, args.seeds, resume=args.resume, overwrite=args.overwrite, flag_overrides=flags,
                    fuse=args.fuse_seeds)
    else:
        from ..train.distributed import maybe_init_distributed

        with maybe_init_distributed(cfg) as dist:
            train(cfg, resume=args.resume, overwrite=args.overwrite, flag_overrides=flags, **dist)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_dataset
    from ..data.loader import TensorLoader
    from ..hardware import resolve_device
    from ..outputs import OUTPUT, check_writable, claim
    from ..plots import plot_confusion
    from .._io import atomic_write_text
    from ..train.checkpoint import load_for_inference
    from ..train.engine import evaluate

    model, meta = load_for_inference(args.checkpoint)
    out_dir = Path(args.out) if args.out else Path(meta["checkpoint"]).parent.parent
    check_writable(out_dir, OUTPUT)  # before the evaluation: its cost is not wasted
    device = resolve_device("auto")
    model = model.to(device)
    cfg = meta.get("config", {})
    data_name = args.data or meta.get("data")
    if not data_name:
        raise ConfigError(f"{args.checkpoint} names no dataset (imported weights); pass --data NAME_OR_FOLDER")
    # An image folder is read as in training: same size and the same policy for bad files.
    folder_opts = {"bad_images": cfg.get("bad_images", "error"),
                   **({"image_size": cfg["image_size"]} if cfg.get("image_size") else {})}
    if data_name == meta.get("data"):
        splits = load_dataset(data_name, args.data_dir or cfg.get("data_dir"), val_size=cfg.get("val_size"),
                              **folder_opts)
    else:
        splits = load_dataset(data_name, args.data_dir, bad_images=cfg.get("bad_images", "error"))
    if splits.in_chans != model.in_chans or len(splits.classes) != len(meta["classes"]):
        raise ConfigError(f"{data_name} has {len(splits.classes)} classes of {splits.in_chans}-channel images; the "
                          f"model takes {model.in_chans} channel(s) and has {len(meta['classes'])} classes")
    data = splits.load_test() if args.split == "test" else splits.val
    if len(data.labels) == 0:
        raise DataError(f"the {args.split} split of {meta['data']} is empty")
    loader = TensorLoader(data.images, data.labels, 500, mean=meta["mean"], std=meta["std"], device=device)
    res = evaluate(model, loader, device=device, tta_flip=args.tta_flip, num_classes=len(meta["classes"]))
    claim(out_dir, OUTPUT)
    report = {"checkpoint": meta["checkpoint"], "data": splits.name, "split": args.split, "error": res["error"], "accuracy": 1 - res["error"],
              "loss": res["loss"], "n": res["n"], "classes": meta["classes"], "confusion": res["confusion"]}
    atomic_write_text(out_dir / f"eval_{args.split}.json", json.dumps(report, indent=2))
    png = plot_confusion(torch.tensor(res["confusion"]), meta["classes"], out_dir / f"confusion_{args.split}.png",
                         title=f"{meta['model']} on {splits.name} ({args.split}): error {100 * res['error']:.2f}%")
    print(f"{meta['model']} {args.split} error {100 * res['error']:.2f}% (accuracy {100 * (1 - res['error']):.2f}%) "
          f"on {res['n']} images; confusion matrix: {png}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..predict import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    results = predictor.predict_files(args.images, top_k=args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for item in results:
        guesses = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in item["top"])
        print(f"{item['image']}: {guesses}")
    return 0
