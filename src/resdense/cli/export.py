"""``resdense export``: a trained checkpoint (or a freshly built model) as ONNX, TorchScript or
safetensors, checked against PyTorch before the file is published."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UserError
from ..outputs import check_new_file
from ._util import human, parse_overrides, parse_size


def register(sub: Any) -> None:
    from ..export import EXPORT_FORMATS

    p = sub.add_parser("export", help="export a checkpoint or model to ONNX, TorchScript or safetensors")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, metavar="RUN_DIR", help="a training run (or checkpoint) to export")
    src.add_argument("--model", metavar="NAME", help="a registered model, freshly initialised (see `resdense list`)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, dest="fmt")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding convolutions first")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="output file (default: RUN_DIR/model.<ext>, or ./<model>.<ext> with --model)")
    p.add_argument("--input", type=parse_size, default=None, metavar="CxHxW",
                   help="with --model: input size (default: the model's, e.g. 3x32x32)")
    p.add_argument("--num-classes", type=int, default=None, help="with --model: number of classes")
    p.add_argument("--arg", "-a", action="append", metavar="KEY=VALUE", help="with --model: builder argument")
    p.add_argument("--batch", type=int, default=2, help="batch of the check input (the ONNX batch axis is dynamic)")
    p.add_argument("--no-check", action="store_true", help="skip reloading the file and comparing outputs")
    p.set_defaults(func=cmd_export)


def _from_checkpoint(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    if args.input is not None or args.arg or args.num_classes is not None:
        raise ConfigError("--input, --arg and --num-classes go with --model; a checkpoint knows its own")
    try:
        from ..train.checkpoint import load_for_inference
    except ImportError:
        raise UserError("loading checkpoints is not available in this build; use --model NAME") from None
    model, meta = load_for_inference(args.checkpoint)
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    return model, dict(meta), run_dir / "model"


def _from_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any], Path]:
    from ..models import create_model, model_entry

    entry = model_entry(args.model)  # unknown names fail before anything is built
    kwargs = parse_overrides(args.arg)
    kwargs["num_classes"] = args.num_classes
    input_size = args.input or entry.input_size
    if args.input is not None:
        kwargs["in_chans"] = args.input[0]
    try:
        model = create_model(args.model, **kwargs)
    except TypeError as e:  # an argument the builder does not take
        raise ConfigError(f"{args.model}: {e}; see `resdense export --help` for -a KEY=VALUE") from None
    meta = {"model": args.model, "model_kwargs": {k: v for k, v in kwargs.items() if v is not None},
            "input_size": list(input_size)}
    return model.eval(), meta, Path(args.model)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ..export import FORMAT_SUFFIX, export_model

    if args.batch < 1:
        raise ConfigError(f"--batch must be a positive integer; got {args.batch}")
    model, meta, default_stem = _from_checkpoint(args) if args.checkpoint is not None else _from_model(args)
    input_size = tuple(meta.get("input_size") or ())
    if len(input_size) != 3:
        raise ConfigError("the checkpoint does not record its input size (C,H,W); export it with --model instead")
    out = args.out or default_stem.with_name(default_stem.name + FORMAT_SUFFIX[args.fmt])
    check_new_file(out)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.randn(args.batch, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    result = export_model(model, out, args.fmt, example_input=example, fold_bn=args.fold_bn,
                          check=not args.no_check, metadata=meta)
    diff = "not checked" if result.max_abs_diff is None else f"max |diff| vs PyTorch {result.max_abs_diff:.2e}"
    folded = f", {result.folded_bn} BN folded" if args.fold_bn else ""
    print(f"wrote {result.path} ({args.fmt}, {human(result.bytes)}B{folded}; {diff})")
    return 0
