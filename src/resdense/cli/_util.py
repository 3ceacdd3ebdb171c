"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import ast
import json
import math
from typing import Any

from ..errors import UserError


def parse_size(text: str) -> tuple[int, int, int]:
    """'3x32x32' -> (3, 32, 32)."""
    try:
        c, h, w = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 3x32x32 (channels x height x width); got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"dimensions must be positive; got {text!r}")
    return c, h, w


def positive_int(text: str) -> int:
    """An argparse type for counts and sizes: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, e.g. 4; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive; got {value}")
    return value


def int_between(low: int, high: int) -> Any:
    """An argparse type for a whole number in [low, high] (every count flag is bounded)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}; got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}; got {value}")
        return value

    parse.__name__ = f"int {low}..{high}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type for rates and factors that must be above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {value}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive; got {value}")
    return value


def int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: an argparse type for lists of distinct integers (seeds, depths)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of integers, e.g. 0,1,2; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"needs at least one integer, e.g. 0,1,2; got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"needs distinct values, e.g. 0,1,2; got {text!r}")
    return values


# Words a user types for the non-finite floats (Python's literal syntax has none): parsed as
# floats, so the setting's own check can say "must be finite" instead of "must be float".
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf,
               "infinity": math.inf, "-infinity": -math.inf}


_BOOLEANS = {"true": True, "false": False}


def parse_overrides(items: list[str] | None, flag: str = "--arg", example: str = "depth=110") -> dict[str, Any]:
    """['depth=110', 'shortcut=B'] -> {'depth': 110, 'shortcut': 'B'} (values as Python literals
    where they parse as one, strings otherwise). ``flag`` and ``example`` are for the messages."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"{flag} must look like key=value (e.g. {flag} {example}); got {item!r}")
        word = value.strip().lower()
        if word in _NON_FINITE:
            out[key] = _NON_FINITE[word]
            continue
        if word in _BOOLEANS:  # as a YAML config file writes them; "none" stays a word (shortcut=none)
            out[key] = _BOOLEANS[word]
            continue
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[key] = value
    return out


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
