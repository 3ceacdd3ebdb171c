"""A study on a Slurm cluster: one ``sbatch`` job array whose tasks are ordinary study workers.

:func:`submit` checks and claims the study's folder exactly as a local ``resdense study`` does,
writes ``STUDY/slurm.sbatch`` (kept: a user can read it and resubmit it with ``sbatch``) and
submits it. Each array task runs the same ``resdense study`` command on the shared folder; the
run locks split the runs between the tasks (see :mod:`.engine`). The worker replaces the batch
shell (``exec``), so it is the process Slurm signals. SIGUSR1 (``--signal=B:USR1@N``, N seconds
before the time limit): it checkpoints its run at the step and requeues its task itself
(:func:`requeue_self`). SIGTERM (``scancel``, a preemption, ``scontrol requeue``): it checkpoints
and leaves the rest to Slurm, which requeues a preempted or requeued task and ends a cancelled one.
Either way the task's next start continues that run from the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .._io import atomic_write_text
from ..errors import ConfigError
from .engine import Log, finished, gave_up, start_study
from .spec import StudyConfig

SCRIPT = "slurm.sbatch"
SUBMISSIONS = "slurm.json"
LOGS = "slurm-logs"
HEADER = "# written by `resdense study --slurm`"
# Bounds of the flags (a typo of 100000 tasks or a 5-minute warning of 5 days is refused).
MAX_TASKS = 10_000
MAX_CPUS = 1024
MAX_GPUS = 16
MAX_SBATCH_ARGS = 32
SIGNAL_LEAD_S = (10, 3600)
_TIME = re.compile(r"(\d{1,3}-)?\d{1,5}(:\d{1,2}){0,2}|UNLIMITED|INFINITE", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9_.,-]{1,128}")


@dataclass(frozen=True)
class SlurmOptions:
    """What ``--slurm`` asks of ``sbatch`` (``None``: Slurm's default or resdense's)."""

    partition: Optional[str] = None
    time: Optional[str] = None              # the task's time limit, in Slurm's formats (D-HH:MM:SS, MM, ...)
    cpus_per_task: int = 1
    gpus_per_task: int = 0
    tasks: Optional[int] = None             # array size; default one per unfinished run
    throttle: int = 16                      # at most this many tasks at once (--array=...%N)
    signal_lead: int = 120                  # SIGUSR1 this many seconds before the time limit
    retries: int = 2                        # a failed run is retried this many times, then reported
    sbatch_args: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        """Refuse, in one line, a value ``sbatch`` would refuse later or a mistake in its size."""
        if self.partition is not None and not _NAME.fullmatch(self.partition):
            raise ConfigError(f"--partition must be a Slurm partition name (letters, digits, _ . , -); "
                              f"got {self.partition!r}")
        if self.time is not None and not _TIME.fullmatch(self.time):
            raise ConfigError(f"--time must be a Slurm time limit (MINUTES, HH:MM:SS or D-HH:MM:SS, e.g. 4:00:00); "
                              f"got {self.time!r}")
        bounds = {"--cpus-per-task": (self.cpus_per_task, 1, MAX_CPUS), "--gpus-per-task": (self.gpus_per_task, 0, MAX_GPUS),
                  "--array-size": (self.tasks, 1, MAX_TASKS), "--throttle": (self.throttle, 1, MAX_TASKS),
                  "--signal-lead": (self.signal_lead, *SIGNAL_LEAD_S), "--retries": (self.retries, 0, 10)}
        for flag, (value, low, high) in bounds.items():
            if value is not None and not low <= value <= high:
                raise ConfigError(f"{flag} must be between {low} and {high}; got {value}")
        if len(self.sbatch_args) > MAX_SBATCH_ARGS:
            raise ConfigError(f"--sbatch-arg is given {len(self.sbatch_args)} times; at most {MAX_SBATCH_ARGS}")
        for arg in self.sbatch_args:
            if not arg.startswith("-") or len(arg) > 200 or "\n" in arg:
                raise ConfigError(f"--sbatch-arg takes one sbatch option with '=' (e.g. --sbatch-arg=--account=abc); "
                                  f"got {arg!r}")


def worker_command(study: StudyConfig, option_flags: list[str], jobs: int, retries: int) -> list[str]:
    """The ``resdense study`` command every array task runs: this study, absolute paths, retries."""
    words = [sys.executable, "-m", "resdense", "study", study.study, "--data", study.data]
    if study.data_dir:
        words += ["--data-dir", str(Path(study.data_dir).resolve())]
    words += ["--seeds", ",".join(map(str, study.seeds)), "--preset", study.preset, *option_flags]
    for key, value in study.overrides.items():
        words += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    return [*words, "--jobs", str(jobs), "--retries", str(retries), "--slurm-worker",
            "--out", str(Path(study.out).resolve())]


def script_text(study: StudyConfig, opts: SlurmOptions, command: list[str], tasks: int) -> str:
    """The sbatch script: Slurm's options, then the worker replacing the shell."""
    out = Path(study.out).resolve()
    lines = ["#!/bin/bash", f"{HEADER}: the tasks of this job array are study workers",
             f"# sharing {out}. Resubmit with `sbatch {out / SCRIPT}`: finished runs are",
             "# skipped, interrupted ones continue from their checkpoints.",
             f"#SBATCH --job-name=resdense-{study.study}",
             f"#SBATCH --array=0-{tasks - 1}%{min(opts.throttle, tasks)}",
             f"#SBATCH --output={out / LOGS}/%A_%a.out",
             "#SBATCH --open-mode=append",
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{opts.signal_lead}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --cpus-per-task={opts.cpus_per_task}"]
    lines += [f"#SBATCH --partition={opts.partition}"] * (opts.partition is not None)
    lines += [f"#SBATCH --time={opts.time}"] * (opts.time is not None)
    lines += [f"#SBATCH --gpus-per-task={opts.gpus_per_task}"] * (opts.gpus_per_task > 0)
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    lines += ["", "# exec: the worker is the batch shell's process, the one Slurm signals: on USR1 (the time",
              "# limit is near) it checkpoints its run at the step and requeues this task; on TERM",
              "# (scancel, preemption, scontrol requeue) it checkpoints and Slurm decides.",
              "exec " + " ".join(shlex.quote(w) for w in command), ""]
    return "\n".join(lines)


def submit(study: StudyConfig, opts: SlurmOptions, option_flags: list[str], jobs: int = 1,
           log: Log = print) -> Optional[str]:
    """Check and claim the study's folder, write its sbatch script and submit it; return the job id
    (``None`` when every run is already finished: nothing to submit)."""
    opts.check()
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError("--slurm needs Slurm's sbatch on PATH: run this on the cluster's login node")
    _, runs, out = start_study(study, log)
    left = [r for r in runs if not finished(Path(r.config.out)) and not gave_up(Path(r.config.out))]
    if not left:
        log(f"every run of {out} is finished or failed: nothing to submit (`resdense study status {out}`)")
        return None
    tasks = opts.tasks or len(left)
    study = StudyConfig(**{**study.to_dict(), "out": str(out)})
    script = out / SCRIPT
    atomic_write_text(script, script_text(study, opts, worker_command(study, option_flags, jobs, opts.retries), tasks))
    (out / LOGS).mkdir(exist_ok=True)
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"sbatch refused {script}: {why}; fix the Slurm flags and submit again")
    job = proc.stdout.strip().split(";")[0]
    _record_submission(out, job, tasks)
    throttle = min(opts.throttle, tasks)
    log(f"submitted Slurm job {job}: {tasks} task{'s' * (tasks > 1)} ({throttle} at a time) for the "
        f"{len(left)} unfinished runs of {out}")
    log(f"script: {script} (resubmit: sbatch {script})")
    log(f"follow: resdense study status {out}  |  squeue -r -j {job}  |  tail -f {out / LOGS}/{job}_*.out")
    return job


def _record_submission(out: Path, job: str, tasks: int) -> None:
    path = out / SUBMISSIONS
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        done = []
    done = done if isinstance(done, list) else []
    done.append({"job": job, "tasks": tasks, "submitted": time.time(), "script": str(out / SCRIPT)})
    atomic_write_text(path, json.dumps(done, indent=2))


def submissions(out: Path) -> list[dict]:
    """The jobs ``--slurm`` submitted for the study in ``out``, oldest first."""
    try:
        done = json.loads((out / SUBMISSIONS).read_text())
    except (OSError, ValueError):
        return []
    return [d for d in done if isinstance(d, dict)] if isinstance(done, list) else []


def requeue_self(log: Log) -> None:
    """Inside a Slurm job stopped by its time-limit warning (SIGUSR1): put this task back in the
    queue so that it continues its run; a refusal is said and left to Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not job or scontrol is None:
        return
    proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        log(f"requeued Slurm job {job}: its next start continues from the checkpoint")
    else:
        log(f"not requeued by resdense ({(proc.stderr.strip().splitlines() or ['-'])[-1]}): Slurm decides")
