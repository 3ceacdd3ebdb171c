"""The ``resdense`` command line: one sub-command module per area, each with ``register``.

A user's mistake (a :class:`~resdense.errors.UserError` or a bad flag) prints one line and
exits with status 2, and so does a disk that refuses a write (full, read-only). A run stopped by
a signal prints how to resume and exits with 128 + the signal's number. Nothing else is caught,
so real bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings
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
    # resdense refuses images above its own, lower pixel limit (resdense.limits) in one line;
    # Pillow's warning about the same images would only be a second, noisier line.
    warnings.filterwarnings("ignore", message=".*decompression bomb", category=Warning)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # commands that re-launch themselves (train --nproc) need the exact words
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"resdense {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # A write the disk refused outside resdense's own writers (a figure, a library's file).
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        from .._io import write_failure

        print(f"resdense {args.command}: error: {write_failure(e, e.filename or '(a file)')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run's TrainingStopped says where it stopped and how to resume
        print(f"resdense {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
