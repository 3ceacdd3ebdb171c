"""The folders resdense makes, and the rule that it replaces or deletes nothing else.

Every folder resdense creates to write into (a training run, a multi-seed set, a study, an
evaluation or analysis output) holds a small marker file, ``resdense.json``, naming its kind.
resdense writes only into a new or empty folder (which it then marks) or a folder that carries
its marker; it refuses a non-empty folder it did not make, with or without ``--overwrite``, and
creates nothing in it (not even a lock file). ``--overwrite`` replaces a run by deleting the
entries a run is made of (:attr:`Kind.owns`) and nothing else: a file a user put beside them stays.

Folders written by resdense 0.2, before the marker, are recognised by their structure (a run:
its ``last`` link into ``checkpoints/``; a study: its ``study.json``) and marked when next used.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError, UserError
from .runlock import LOCK_FILE

MARKER = "resdense.json"
_HOUSEKEEPING = {MARKER, LOCK_FILE}


@dataclass(frozen=True)
class Kind:
    """A kind of folder resdense makes: its name (in the marker), what to call it in a message,
    and the entries it writes at its top (glob patterns): all ``--overwrite`` may delete."""

    name: str
    noun: str
    owns: tuple[str, ...] = ()
    into_any: bool = False  # may also go into a folder of any other resdense kind (eval beside a run)


RUN = Kind("run", "a training run", (
    "config.json", "metrics.jsonl", "metrics.csv", "curve.jsonl", "summary.json", "train.log", "last", "best",
    "checkpoints", "tensorboard", "gradients", "analysis", "eval_*.json", "confusion_*.png",
    "model.onnx", "model.pt", "model.safetensors", "failed.json", ".*.tmp"))
SEEDS = Kind("seeds", "a set of runs over seeds (train --seeds)", ("seed[0-9]*", "summary.json"))
STUDY = Kind("study", "a study")
OUTPUT = Kind("output", "evaluation or analysis output", into_any=True)
KINDS = {k.name: k for k in (RUN, SEEDS, STUDY, OUTPUT)}


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name not in _HOUSEKEEPING]


def _legacy_kind(folder: Path) -> Optional[str]:
    """The kind of a folder resdense 0.2 wrote (no marker), from what only resdense puts there."""
    if folder.name == "analysis" and (folder.parent / MARKER).is_file():
        return OUTPUT.name  # `resdense analyze` writes RUN/analysis or STUDY/analysis
    last = folder / "last"
    if last.is_symlink() and (last / "meta.json").is_file() \
            and last.resolve().parent == (folder / "checkpoints").resolve():
        return RUN.name
    try:
        doc = json.loads((folder / "study.json").read_text())
    except (OSError, ValueError):
        return None
    return STUDY.name if isinstance(doc, dict) and {"study", "config"} <= set(doc) else None


def kind_of(folder: str | Path) -> Optional[str]:
    """The kind of resdense folder ``folder`` is, or ``None`` (missing, a file, or not resdense's)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        doc = json.loads((folder / MARKER).read_text())
        name = doc.get("kind") if isinstance(doc, dict) else None
        if name in KINDS:
            return name
    except (OSError, ValueError):
        pass
    return _legacy_kind(folder)


def is_empty(folder: str | Path) -> bool:
    """Missing, or holding nothing but resdense's own lock and marker files."""
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not _entries(folder))


def check_writable(folder: str | Path, kind: Kind, option: str = "--out") -> Optional[str]:
    """Refuse, in one line, a folder resdense may not write into as ``kind``; return its current
    kind (``None`` when it is new or empty). Creates nothing: call it before any write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{option} {folder} is a file, not a folder; choose another {option}")
    if is_empty(folder):
        return None
    found = kind_of(folder)
    if found is None:
        raise UserError(f"{option} {folder} is not empty and was not made by resdense (it has no {MARKER}); "
                        f"resdense never writes into or deletes such a folder: choose a new or empty {option}")
    if found != kind.name and not kind.into_any:
        raise UserError(f"{option} {folder} holds {KINDS[found].noun}, not {kind.noun}; choose another {option}")
    return found


def mark(folder: str | Path, kind: Kind) -> Path:
    """Create ``folder`` if needed and record that resdense made it (idempotent)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if kind_of(folder) != kind.name or not marker.is_file():
        from ._io import atomic_write_text
        from . import __version__

        atomic_write_text(marker, json.dumps({"kind": kind.name, "made_by": "resdense", "version": __version__}))
    return folder


def claim(folder: str | Path, kind: Kind, option: str = "--out") -> Path:
    """:func:`check_writable`, then :func:`mark`: the folder is resdense's to write into."""
    found = check_writable(folder, kind, option)
    return mark(folder, KINDS[found] if found else kind)


def clear(folder: str | Path, kind: Kind) -> list[Path]:
    """Delete the entries of ``kind`` that ``folder`` holds (what ``--overwrite`` replaces) and
    nothing else; returns what was removed. The folder must be of that kind."""
    folder = Path(folder)
    if kind_of(folder) != kind.name:
        raise UserError(f"{folder} does not hold {kind.noun}; resdense deletes only what it made")
    removed = []
    for path in _entries(folder):
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in kind.owns):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def check_new_file(path: str | Path, option: str = "--out", signature: Optional[str] = None) -> None:
    """A single output file: resdense writes it only where nothing is, inside a folder it made, or
    over a file it wrote before (one whose first 4 KiB hold ``signature``, where given)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file path")
    if not path.exists() or kind_of(path.parent) is not None:
        return
    if signature is not None:
        try:
            with open(path, "rb") as f:
                if signature.encode() in f.read(4096):
                    return
        except OSError:
            pass
    raise UserError(f"{option} {path} already exists and resdense did not make it; "
                    f"choose another {option} or move the file away first")
