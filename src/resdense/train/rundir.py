"""A run directory's policy: who may write in it (one process, by lock), what ``--resume`` and
``--overwrite`` do with what is there, which saved settings a resume keeps, and what to tell the
user when a run stops early."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError, UserError
from ..outputs import RUN, check_writable, clear, is_empty, kind_of, mark
from ..runlock import RunLock, RunLockedError, describe_owner, owner
from . import checkpoint as ckpt
from .config import TrainConfig, apply_overrides

# What a resume may change: how long the run is and how it runs, not what is trained.
RESUME_MAY_CHANGE = frozenset({"epochs", "iterations", "progress", "threads", "out", "device", "eval_batch_size",
                               "compile", "cuda_graphs", "checkpoint_every"})


def _holds_a_run(run_dir: Path) -> bool:
    return kind_of(run_dir) == RUN.name and not is_empty(run_dir)


def check_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool, lock: Optional[RunLock] = None) -> Path:
    """Check ``--out`` against ``--resume``/``--overwrite`` and its owner, reading only: a folder
    resdense did not make, a run without either flag, or a folder another process holds is
    refused before anything is written (see :mod:`resdense.outputs`). Returns the directory."""
    if cfg.out is None:
        raise ConfigError("--out RUN_DIR is required: where the run's checkpoints and metrics go")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pick one")
    run_dir = Path(cfg.out)
    check_writable(run_dir, RUN)
    if _holds_a_run(run_dir) and not resume and not overwrite:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to replace it")
    if (lock is None or not lock.held) and owner(run_dir) is not None:
        raise RunLockedError(f"{run_dir} is in use by {describe_owner(run_dir)}; wait for it to finish (or stop it), "
                             "or use another --out")
    return run_dir


def take_run_dir(run_dir: Path, overwrite: bool, lock: Optional[RunLock] = None) -> RunLock:
    """Lock ``run_dir`` for this process (a second process is refused with the first one's id),
    mark it as a run and, with ``overwrite``, delete what the previous run was made of. Returns
    the held lock. Call it once the run's inputs are known to be good."""
    lock = lock or RunLock(run_dir)
    lock.acquire()
    ckpt.remove_stale_temporaries(run_dir)  # a killed writer's leftovers: ours to clean now we hold the lock
    mark(run_dir, RUN)
    if overwrite:
        clear(run_dir, RUN)
    return lock


def prepare_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool, lock: Optional[RunLock] = None) -> tuple[Path, RunLock]:
    """:func:`check_run_dir`, then :func:`take_run_dir`: the directory and the held lock."""
    run_dir = check_run_dir(cfg, resume, overwrite, lock)
    return run_dir, take_run_dir(run_dir, overwrite, lock)


def _same_setting(saved: Any, given: Any) -> bool:
    # The saved model_kwargs also hold what the run filled in (num_classes, in_chans ...): the
    # same -a flags as the first time agree with them when every key given matches.
    if isinstance(saved, dict) and isinstance(given, dict):
        return all(k in saved and saved[k] == v for k, v in given.items())
    return saved == given


def resolve_resume_config(cfg: TrainConfig, run_dir: Path, flag_overrides: dict[str, Any]) -> TrainConfig:
    """On resume the run's saved config wins; flags may extend the run (epochs, iterations) or
    change how it runs (progress, threads), not what is trained."""
    saved = run_dir / "config.json"
    if not saved.is_file():
        return cfg
    saved_cfg = apply_overrides(TrainConfig(), json.loads(saved.read_text()), str(saved))
    changed = {k: v for k, v in flag_overrides.items()
               if k not in RESUME_MAY_CHANGE and not _same_setting(getattr(saved_cfg, k), v)}
    for key in ("model", "data"):
        if key in changed:
            raise ConfigError(f"{run_dir} was trained with {key}={getattr(saved_cfg, key)!r}, not {changed[key]!r}; "
                              "use another --out or drop --resume")
    if changed:
        raise ConfigError(f"--resume keeps the run's settings; these differ from {saved}: {', '.join(sorted(changed))}")
    return apply_overrides(saved_cfg, {k: v for k, v in flag_overrides.items() if k in RESUME_MAY_CHANGE}, "flags")


def resume_hint(run_dir: Path) -> str:
    """What is safe in ``run_dir`` and how to continue: said after a failed write or a hard stop."""
    return (f"{ckpt.describe_resume_point(run_dir)}; continue with the same command plus --resume "
            f"(resdense train --out {run_dir} --resume ...)")
