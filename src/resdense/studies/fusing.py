"""A study's runs trained fused: the runs of one arm differ only in their seed, so they train as
one model (:mod:`resdense.train.fused`) and are written as the ordinary run folders a study
reads. Whether a study fuses: ``--fuse-seeds`` / ``--no-fuse-seeds``; by default where it pays,
on a CUDA device (many small runs there are bound by kernel launches, which fusing divides by K);
on a CPU the runs train one after the other as before.

A process fuses the runs of a group it can lock; those that stand at one resume point train
together, the rest (a run another process started, or resumed alone) one by one, as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional

from ..outputs import RUN, claim
from ..runlock import RunLock
from ..train import checkpoint as ckpt
from ..train.fused import CPU_NOTE, fuse_key, fuse_refusal
from .engine import Log, _train_run, _with_machine, finished, gave_up
from .spec import RunSpec


def resolve_fuse(fuse: Optional[bool], runs: list[RunSpec], log: Log) -> bool:
    """Whether a study fuses: as asked, else where its runs train on CUDA. Says so in one line
    where it is asked to fuse on a CPU."""
    from ..hardware import resolve_device

    if not runs:
        return False
    on_cuda = resolve_device(runs[0].config.device).type == "cuda"
    if fuse and not on_cuda:
        log(CPU_NOTE)
    return on_cuda if fuse is None else fuse


def fuse_groups(runs: list[RunSpec]) -> list[list[RunSpec]]:
    """The runs grouped by what they train apart from the seed, in the order they first appear."""
    groups: dict[str, list[RunSpec]] = {}
    for run in runs:
        groups.setdefault(fuse_key(run.config), []).append(run)
    return list(groups.values())


def _resume_step(run_dir: Path) -> int:
    """The step a run resumes from (0: from the start)."""
    point = ckpt.find_resume_point(run_dir)
    return int(ckpt.read_meta(point).get("step", 0)) if point is not None else 0


class _Tee:
    """Writes to every file of ``files`` (a fused group's train.log files)."""

    def __init__(self, files: list[Any]) -> None:
        self.files = files

    def write(self, text: str) -> int:
        for f in self.files:
            f.write(text)
        return len(text)

    def flush(self) -> None:
        for f in self.files:
            f.flush()


def _train_fused(group: list[tuple[RunSpec, RunLock]], quiet: bool) -> None:
    from ..train.fused import train_fused

    dirs = [claim(run.config.out, RUN) for run, _ in group]
    with contextlib.ExitStack() as stack:
        if quiet:  # a worker of --jobs N: every run's own log holds the fused group's lines
            files = [stack.enter_context(open(d / "train.log", "a")) for d in dirs]
            stack.enter_context(contextlib.redirect_stdout(_Tee(files)))  # type: ignore[type-var]
        train_fused([run.config for run, _ in group], resume=True, locks=[lock for _, lock in group])


def work_fused(group: list[RunSpec], log: Log, quiet: bool = False, threads: Optional[int] = None,
               device: Optional[str] = None) -> list[str]:
    """Train the unfinished runs of ``group`` (runs that differ only in their seed) this process
    can lock: fused where at least two stand at one resume point, else one by one."""
    taken: list[tuple[RunSpec, RunLock]] = []
    try:
        for run in group:
            run_dir = Path(run.config.out)
            lock = RunLock(run_dir)
            if finished(run_dir) or gave_up(run_dir) or not lock.try_acquire():
                continue
            if finished(run_dir) or gave_up(run_dir):  # finished (or given up) between our look and our lock
                lock.release()
                continue
            taken.append((_with_machine(run, threads, device), lock))
        refusal = fuse_refusal(taken[0][0].config) if len(taken) > 1 else None
        if refusal:
            log(f"{taken[0][0].config.model}: not fused ({refusal})")
        at: dict[int, list[tuple[RunSpec, RunLock]]] = {}
        for run, lock in taken:
            at.setdefault(-1 if refusal else _resume_step(Path(run.config.out)), []).append((run, lock))
        for step, part in at.items():
            if len(part) > 1 and step >= 0:
                names = ", ".join(run.name for run, _ in part)
                log(f"{names}: {'resuming' if step else 'training'} fused (pid {os.getpid()})")
                _train_fused(part, quiet)
                continue
            for run, lock in part:
                resuming = (Path(run.config.out) / "config.json").is_file()
                log(f"{run.name}: {'resuming' if resuming else 'training'} (pid {os.getpid()})")
                _train_run(run, lock, quiet)
        return [run.name for run, _ in taken]
    finally:
        for _, lock in taken:
            lock.release()
