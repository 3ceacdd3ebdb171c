"""``resdense list`` and ``resdense info``: the model zoo at a glance."""

from __future__ import annotations

import argparse
from typing import Any

from ..analysis.complexity import ModelInfo, model_info
from ..errors import ConfigError, UserError
from ..models import list_models, model_description, model_entry
from ._util import human, parse_overrides, parse_size, print_json


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'resnet*'; plain text matches anywhere in the name")
    p.add_argument("--info", action="store_true", help="also show params and MACs at each model's default input")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="parameters, MACs and a per-stage table of a model")
    p.add_argument("model")
    p.add_argument("--input", type=parse_size, default=None, metavar="CxHxW",
                   help="input size (default: the model's, e.g. 3x32x32 for CIFAR nets)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--arg", "-a", action="append", metavar="KEY=VALUE",
                   help="builder argument, e.g. -a depth=110 -a shortcut=B (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise UserError(f"no model matches {args.pattern!r}; run `resdense list` for all of them")
    if not args.info:
        for name in names:
            print(f"{name:22s} {model_description(name)}")
        return 0
    print(f"{'model':22s} {'input':>10s} {'params':>12s} {'MACs':>9s}")
    for name in names:
        info = model_info(name)
        print(f"{name:22s} {'x'.join(map(str, info.input_size)):>10s} {info.params:>12,} {human(info.macs):>9s}")
    return 0


def format_info(info: ModelInfo) -> str:
    lines = [f"{info.name}  (input {'x'.join(map(str, info.input_size))})",
             f"{'stage':24s} {'output':>12s} {'params':>12s} {'MACs':>10s}"]
    for r in info.rows:
        lines.append(f"{r.name:24s} {'x'.join(map(str, r.output_shape)):>12s} {r.params:>12,} {human(r.macs):>10s}")
    lines.append(f"{'total':24s} {'':>12s} {info.params:>12,} {human(info.macs):>10s}")
    paper = info.paper
    if paper is not None:
        parts = []
        if paper.params is not None:
            parts.append(f"params {paper.params / 1e6:.2f}M (ours {info.params / 1e6:.2f}M)")
        if paper.macs is not None:
            ours = info.paper_comparable_macs or info.macs
            parts.append(f"FLOPs (multiply-adds) {human(paper.macs)} (ours {human(ours)})")
        if paper.error is not None:
            parts.append(f"{paper.error_label} {paper.error}")
        lines.append(f"paper ({paper.source}): " + "; ".join(parts))
    lines += [f"note: {n}" for n in info.notes]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    kwargs = parse_overrides(args.arg)
    kwargs["num_classes"] = args.num_classes
    if args.input is not None:
        kwargs["in_chans"] = args.input[0]
    model_entry(args.model)  # unknown names fail before anything is built
    try:
        info = model_info(args.model, args.input, **kwargs)
    except TypeError as e:  # an argument the builder does not take
        raise ConfigError(f"{args.model}: {e}; see `resdense info --help` for -a KEY=VALUE") from None
    if args.json:
        print_json(info.to_dict())
    else:
        print(format_info(info))
    return 0
