"""The ``resdense`` command line: one sub-command module per area, each with ``register``.

A user's mistake (a :class:`~resdense.errors.UserError` or a bad flag) prints one line and
exits with status 2; nothing else is caught, so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ..errors import UserError

# Each module defines register(subparsers); a parser it adds sets `func` (args -> exit code).
_COMMAND_MODULES = ("models", "train", "imports", "study", "analyze", "export", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="resdense", description="ResNet and DenseNet exactly as the papers define them: "
                     "models, training, and the experiments that show why shortcuts work.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"resdense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # commands that re-launch themselves (train --nproc) need the exact words
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"resdense {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"resdense {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
