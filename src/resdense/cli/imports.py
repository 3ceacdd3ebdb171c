"""``resdense import``: weights trained elsewhere (torchvision, timm, CIFAR repositories, a bare
state dict, resdense's own) as a resdense run directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._util import parse_overrides


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def _class_names(text: str) -> list[str]:
    """A file of names (one per line) when such a file exists, else a comma-separated list."""
    path = Path(text)
    if path.is_file():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --classes file {path}: {e}") from None
        names = [n for n in names if n]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--classes {text!r} names no classes; give a file with one name per line or a,b,c")
    return names


def register(sub: Any) -> None:
    from ..models.importers import FORMATS

    p = sub.add_parser("import", help="turn a checkpoint trained elsewhere into a resdense run directory",
                       description="Reads torchvision and timm state dicts (.pth, .safetensors), CIFAR-repository "
                                   "checkpoints ({'state_dict': ...}, module. prefixes, `linear` classifier), bare "
                                   "state dicts and resdense runs; only weights, never pickled code. The output "
                                   "works with eval, predict, export, analyze and train --init-from.")
    p.add_argument("file", metavar="FILE", help="the checkpoint (.pth, .pt, .safetensors) or a resdense run directory")
    p.add_argument("--model", metavar="NAME", help="the resdense model the weights are for (see `resdense list`)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--format", choices=FORMATS, default="auto", dest="fmt",
                   help="auto (default): a `linear` classifier means a CIFAR repository, else torchvision names")
    p.add_argument("--classes", metavar="FILE|a,b,c", help="class names in output order (default: CIFAR-10's for "
                   "CIFAR layouts with 10 outputs, else 0..N-1)")
    p.add_argument("--mean", type=_floats, metavar="M,M,M", help="input normalisation the weights were trained with "
                   "(default: what the file stores (its wrapper, normalisation buffers, safetensors header, a "
                   "config.json beside it), else ImageNet's for torchvision/timm and CIFAR-10's for CIFAR layouts, "
                   "said in one line)")
    p.add_argument("--std", type=_floats, metavar="S,S,S")
    p.add_argument("--input-size", type=int, metavar="PX", help="the image size the weights were trained at "
                   "(default: 224 for torchvision/timm, 32 for CIFAR layouts); predict resizes to it")
    p.add_argument("--data", help="the dataset the weights belong to, for eval and analyze (default: cifar10 for "
                   "CIFAR layouts)")
    p.add_argument("--arg", "-a", action="append", metavar="KEY=VALUE", help="model builder argument, e.g. -a shortcut=B")
    p.add_argument("--overwrite", action="store_true", help="replace what RUN_DIR holds")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from ..train.import_run import ImportRequest, import_checkpoint

    if (args.mean is None) != (args.std is None):
        raise ConfigError("give --mean and --std together (the normalisation needs both)")
    if args.input_size is not None and args.input_size < 1:
        raise ConfigError(f"--input-size must be positive; got {args.input_size}")
    kwargs = parse_overrides(args.arg)
    req = ImportRequest(path=args.file, model=args.model, out=args.out, fmt=args.fmt,
                        classes=_class_names(args.classes) if args.classes else None, mean=args.mean, std=args.std,
                        input_size=args.input_size, data=args.data, model_kwargs=kwargs, overwrite=args.overwrite)
    done = import_checkpoint(req)
    meta = done.meta
    source = meta["imported"]["normalisation"]
    if done.assumed:
        print(done.assumed)
    elif source != "given":
        print(f"normalisation from {source}: mean {','.join(f'{v:g}' for v in meta['mean'])}, "
              f"std {','.join(f'{v:g}' for v in meta['std'])}")
    n = len(meta["classes"])
    print(f"imported {meta['imported']['format']} weights of {meta['model']} ({n} classes, "
          f"{meta['model_kwargs']['in_chans']} input channels) into {args.out}; checkpoint {done.checkpoint}")
    return 0
