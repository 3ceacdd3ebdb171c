"""Training a study's runs: locked, resumable, in parallel, and cooperating across processes.

Every run is an ordinary resdense run directory inside the study folder. A process trains a run
only while it holds the run's lock (:mod:`resdense.runlock`), so any number of processes of the
same study command (``--jobs N`` on one machine, a Slurm job array, a loop over hosts sharing the
folder) split the runs between them: finished runs are skipped, runs another process holds are
left to it, and an interrupted run continues from its last checkpoint. The process that finds
every run finished writes ``results.jsonl`` and the report. With ``retries`` a run that fails is
recorded (``RUN/failed.json``), retried up to that many times by whichever process comes next,
then left as failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Optional

from .._io import atomic_write_text
from ..data import check_available
from ..errors import ConfigError, UserError, WriteError
from ..limits import bound_jobs
from ..outputs import RUN, STUDY, claim
from ..runlock import RunLock, check_locking, owner, owner_info
from ..train.config import validate
from .spec import RunSpec, StudyConfig, StudySpec, get_study

Log = Callable[[str], None]
PROGRESS_EVERY_S = 30.0


FAILED_FILE = "failed.json"
MAX_RETRIES = 10


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def failures(run_dir: Path) -> dict[str, Any]:
    """``RUN/failed.json``: ``{"attempts", "retries", "error", "host", ...}``; empty if it never failed."""
    try:
        doc = json.loads((run_dir / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def gave_up(run_dir: Path) -> bool:
    """Failed more often than the retries it was allowed: left as failed."""
    doc = failures(run_dir)
    return bool(doc) and int(doc.get("attempts", 0)) > int(doc.get("retries", 0))


def _record_failure(run_dir: Path, error: BaseException, retries: int) -> int:
    attempts = int(failures(run_dir).get("attempts", 0)) + 1
    doc = {**owner_info(), "attempts": attempts, "retries": retries,
           "error": f"{type(error).__name__}: {error}".splitlines()[0][:500]}
    atomic_write_text(run_dir / FAILED_FILE, json.dumps(doc))
    return attempts


def settings_changes(saved: dict[str, Any], study: StudyConfig) -> list[str]:
    """'key: saved -> now' for every study setting that differs from the saved study.json."""
    now = study.to_dict()
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in ("out", "verdicts", "seeds"):  # more seeds extend a study; they change nothing saved
            continue
        if saved.get(key) != now.get(key):
            changes.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes


def write_study_file(out: Path, study: StudyConfig, log: Log) -> None:
    """Save the study's settings; warn in one line when they differ from the saved ones."""
    path = out / "study.json"
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            saved = json.loads(path.read_text()).get("config", {})
            changes = settings_changes(saved, study)
            if changes:
                log(f"warning: {out} was started with other settings ({'; '.join(changes)}); runs finished "
                    "with the old settings are kept, unfinished ones continue with theirs — use another --out "
                    "to train everything with the new ones")
                return  # the folder keeps describing what its runs were trained with
    atomic_write_text(path, json.dumps({"study": study.study, "config": study.to_dict()}, indent=2))


def _train_run(run: RunSpec, lock: RunLock, quiet: bool) -> None:
    from ..train.runner import train

    run_dir = claim(run.config.out, RUN)  # before its train.log: the folder is a run's from the start
    # A worker of --jobs N: the run's own log goes beside it, the screen shows progress.
    with open(run_dir / "train.log", "a") if quiet else contextlib.nullcontext() as f:
        with contextlib.redirect_stdout(f) if f is not None else contextlib.nullcontext():
            # resume=True: an interrupted run continues from its last checkpoint, a new one starts.
            train(run.config, resume=True, lock=lock)


def _with_machine(run: RunSpec, threads: Optional[int], device: Optional[str]) -> RunSpec:
    """The run on this process's share of the machine (``threads``, ``device``), if given."""
    import dataclasses

    if not (threads or device):
        return run
    return dataclasses.replace(run, config=dataclasses.replace(
        run.config, **({"threads": threads} if threads else {}), **({"device": device} if device else {})))


def work(runs: list[RunSpec], log: Log = print, quiet: bool = False, threads: Optional[int] = None,
         device: Optional[str] = None, retries: Optional[int] = None, fuse: bool = False) -> list[str]:
    """Train every run of ``runs`` that is unfinished and not held by another process; return
    the names of the runs this call trained. ``retries``: a run that raises is recorded as failed
    and skipped (``None``: the error stops the caller, as a bug should when nobody retries). With
    ``fuse``, the runs that differ only in their seed train fused (see :func:`.fusing.work_fused`;
    a fused group's error stops the caller: retries are for runs trained one by one)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if fuse:
        from .fusing import fuse_groups, work_fused

        return [name for group in fuse_groups(runs) for name in work_fused(group, log, quiet, threads, device)]
    trained = []
    for run in runs:
        run_dir = Path(run.config.out)
        if finished(run_dir) or gave_up(run_dir):
            continue
        lock = RunLock(run_dir)
        if not lock.try_acquire():
            continue  # another process trains it
        try:
            if finished(run_dir) or gave_up(run_dir):  # finished (or given up) between our look and our lock
                continue
            run = _with_machine(run, threads, device)
            log(f"{run.name}: {'resuming' if (run_dir / 'config.json').is_file() else 'training'} (pid {os.getpid()})")
            try:
                _train_run(run, lock, quiet)
            except UserError:
                raise  # the same mistake in every run: retrying cannot help
            except Exception as e:  # noqa: BLE001 - recorded, retried, then reported as failed
                if retries is None:
                    raise
                attempts = _record_failure(run_dir, e, retries)
                log(f"{run.name}: failed ({type(e).__name__}: {e}); attempt {attempts} of {retries + 1}")
                continue
            trained.append(run.name)
        finally:
            lock.release()
    return trained


class StudyStopped(KeyboardInterrupt):
    """A study stopped by a signal: its runs keep their checkpoints; the same command continues."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.exit_code)


def _stopped(out: Path, exc: BaseException) -> StudyStopped:
    code = getattr(exc, "exit_code", 130)
    # A run's own message ends with how to resume that run alone; a study resumes as a whole.
    what = (str(exc) or "interrupted").split("; continue with")[0]
    return StudyStopped(f"{what}; every run keeps its last checkpoint: run the same `resdense study` command "
                        f"again to continue {out}", code)


def _worker(study_dict: dict[str, Any], index: int, threads: int, device: Optional[str],
            retries: Optional[int] = None, fuse: bool = False) -> list[str]:
    """One process of ``--jobs N``: the same claim loop over the same runs, longest first (so the
    short ones fill the gaps at the end instead of a long one running alone), started at a
    different place so the jobs take different runs first."""
    study = StudyConfig(**study_dict)
    runs = get_study(study.study).runs(study)
    runs = sorted(runs, key=WorkCost(), reverse=True)
    order = runs[index:] + runs[:index]
    return work(order, log=silent, quiet=True, threads=threads, device=device, retries=retries, fuse=fuse)


def silent(message: str) -> None:
    """A log that drops its lines: a worker's (its runs log to their own train.log; the parent
    prints the progress) and ``resdense.run_study(quiet=True)``'s."""


class WorkCost:
    """A run's work in multiply-adds: steps x batch x its model's MACs per image (each distinct
    model measured once)."""

    def __init__(self) -> None:
        self._macs: dict[str, float] = {}

    def per_step(self, run: RunSpec) -> float:
        key = json.dumps([run.config.model, run.config.model_kwargs], sort_keys=True, default=str)
        if key not in self._macs:
            from ..analysis.complexity import model_info

            try:
                self._macs[key] = float(model_info(run.config.model, **run.config.model_kwargs).macs)
            except Exception:  # noqa: BLE001 - a cost estimate must never stop the study
                self._macs[key] = 1.0
        return self._macs[key] * run.config.batch_size

    def __call__(self, run: RunSpec) -> float:
        return self.per_step(run) * _total_steps(run)


def last_epoch(run_dir: Path) -> dict[str, Any]:
    """A run's last epoch record (the last line of its metrics.jsonl); empty before its first epoch."""
    path = run_dir / "metrics.jsonl"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


class Progress:
    """Runs done / running / waiting, time elapsed, and an estimate of the time left.

    Work is counted in multiply-adds (a run's steps x batch x its model's MACs per image); the
    estimate divides the work left by the rate this study has achieved since it started (all its
    processes together, everything included: evaluation, checkpoints, start-up).
    """

    def __init__(self, runs: list[RunSpec], jobs: int) -> None:
        self.runs, self.jobs = runs, max(jobs, 1)
        self.start = time.perf_counter()
        self._cost = WorkCost()
        self._done_at_start = self._count()[3]

    @staticmethod
    def _steps_done(run_dir: Path) -> int:
        return int(last_epoch(run_dir).get("step", 0))

    def _count(self) -> tuple[int, int, int, float, float]:
        """(done, running, waiting, work done, work left)."""
        done = running = waiting = 0
        work_done = work_left = 0.0
        for run in self.runs:
            run_dir = Path(run.config.out)
            unit, total = self._cost.per_step(run), _total_steps(run)
            if finished(run_dir):
                done += 1
                work_done += unit * total
                continue
            running += owner(run_dir) is not None
            waiting += owner(run_dir) is None
            steps = min(self._steps_done(run_dir), total)
            work_done += unit * steps
            work_left += unit * (total - steps)
        return done, running, waiting, work_done, work_left

    def line(self) -> str:
        done, running, waiting, work_done, work_left = self._count()
        elapsed = time.perf_counter() - self.start
        progress = work_done - self._done_at_start
        eta = f", about {_clock(work_left * elapsed / progress)} left" if progress > 0 and work_left > 0 else ""
        return (f"study: {done}/{len(self.runs)} runs done, {running} running, {waiting} waiting; "
                f"{_clock(elapsed)} elapsed{eta}")


def _total_steps(run: RunSpec) -> int:
    cfg = run.config
    if cfg.iterations is not None:
        return cfg.iterations
    images = cfg.train_subset or 50_000
    return (cfg.epochs or 1) * max(images // cfg.batch_size, 1)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _device_for(index: int) -> Optional[str]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{index % count}" if count > 1 else None


def start_study(study: StudyConfig, log: Log = print) -> tuple[StudySpec, list[RunSpec], Path]:
    """Check everything a study needs before anything is written (its runs' settings, models, data),
    then claim its folder, check that file locks work there and save ``study.json``."""
    spec = get_study(study.study)
    runs = spec.runs(study)  # a bad preset or option fails here, before anything is written
    for run in runs:
        validate(run.config)  # a bad --set value too (lr=nan), before the study's folder exists
    check_models(runs)
    check_available(study.data, study.data_dir)
    out = claim(study.out, STUDY)
    check_locking(out)  # the run locks are what keeps two processes out of one run
    write_study_file(out, study, log)
    return spec, runs, out


def run_study(study: StudyConfig, jobs: int = 1, log: Log = print, retries: Optional[int] = None,
              threads: Optional[int] = None, report_once: bool = False, fuse: Optional[bool] = None) -> dict[str, Any]:
    """Train (this process's share of) the study's runs; when every run is finished, write
    ``results.jsonl`` and the report. Returns ``{"complete": bool, "trained": [...], "report": ...,
    "failed": [...]}``. ``retries``: see :func:`work`; ``threads``: torch threads of each run;
    ``report_once``: leave a report newer than every run as it is (the tasks of a job array that
    end together write it once); ``fuse``: train the runs that differ only in their seed fused (None:
    where that pays, on CUDA; see :mod:`.fusing`)."""
    from .report import build_report

    if jobs < 1:
        raise ConfigError(f"--jobs must be positive; got {jobs}")
    if retries is not None and not 0 <= retries <= MAX_RETRIES:
        raise ConfigError(f"--retries must be between 0 and {MAX_RETRIES}; got {retries}")
    spec, runs, out = start_study(study, log)
    jobs, bounded = bound_jobs(jobs, sum(not finished(Path(r.config.out)) for r in runs))
    if bounded:
        log(bounded)
    progress = Progress(runs, jobs)
    from .fusing import resolve_fuse

    fuse = resolve_fuse(fuse, runs, log)
    log(f"{spec.name}: {len(runs)} runs in {out}, {jobs} at a time" + (", seeds fused" if fuse else "")
        + _skip_note(runs))
    try:
        if jobs == 1:
            trained = _serial(runs, progress, log, retries, threads, fuse)
        else:
            trained = _parallel(study, runs, jobs, progress, log, retries, fuse)
    except StudyStopped:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM (a run's TrainingStopped): say how to continue
        raise _stopped(out, e) from None
    except WriteError as e:  # a full disk: the run's message tells how to resume that run alone
        what = str(e).split("; continue with")[0]
        raise WriteError(f"{what}; free some space, then run the same `resdense study` command again to continue "
                         f"{out}", e.errno, e.filename) from None
    log(progress.line())
    failed = [r.name for r in runs if gave_up(Path(r.config.out)) and not finished(Path(r.config.out))]
    unfinished = [r for r in runs if not finished(Path(r.config.out)) and r.name not in failed]
    if unfinished:
        holders = sorted({str((owner(Path(r.config.out)) or {}).get("pid")) for r in unfinished})
        log(f"{len(unfinished)} run(s) are still being trained by other processes (pid {', '.join(holders)}); "
            "the last one to finish writes the report")
    if unfinished or failed:
        return {"complete": False, "trained": trained, "report": None, "failed": failed}
    lock = RunLock(out)  # held only while the report is written: one writer at a time
    if not lock.try_acquire():
        log("every run is finished; another process is writing the report")
        return {"complete": True, "trained": trained, "report": None, "failed": []}
    try:
        if report_once and _report_up_to_date(out, runs):
            log(f"every run is finished; another process wrote the report: {out}/report.html")
            return {"complete": True, "trained": trained, "report": None, "failed": []}
        report = build_report(out)
    finally:
        lock.release()
    return {"complete": True, "trained": trained, "report": report, "failed": []}


def _report_up_to_date(out: Path, runs: list[RunSpec]) -> bool:
    report = out / "report.html"
    newest = max((Path(r.config.out) / "summary.json").stat().st_mtime for r in runs)
    return report.is_file() and report.stat().st_mtime >= newest


def _free(run: RunSpec) -> bool:
    """Unfinished, not given up, and held by no process: this process may take it."""
    run_dir = Path(run.config.out)
    return not finished(run_dir) and not gave_up(run_dir) and owner(run_dir) is None


def _serial(runs: list[RunSpec], progress: Progress, log: Log, retries: Optional[int],
            threads: Optional[int], fuse: bool = False) -> list[str]:
    """Pass over the runs until none is free. Another pass picks up a run that a process holding it
    left unfinished meanwhile (preempted, killed) and a failed run with retries left. With ``fuse``,
    the free runs that differ only in their seed are taken as one unit."""
    from .fusing import fuse_groups

    trained: list[str] = []
    for _ in range(len(runs) * (MAX_RETRIES + 2)):  # each pass finishes, fails or leaves a run to its holder
        free = [run for run in runs if _free(run)]
        if not free:
            break
        for unit in (fuse_groups(free) if fuse else [[run] for run in free]):
            if any(_free(run) for run in unit):
                log(progress.line())
                trained += work(unit, log=log, retries=retries, threads=threads, fuse=fuse)
    return trained


def check_models(runs: list[RunSpec]) -> None:
    """Build each distinct model once (on the meta device: no memory, no time), so a bad depth
    or model setting is refused in one line before anything is trained or written."""
    import torch

    from ..models import create_model

    seen = set()
    for run in runs:
        key = json.dumps([run.config.model, run.config.model_kwargs], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            with torch.device("meta"):
                create_model(run.config.model, **run.config.model_kwargs)


def _skip_note(runs: list[RunSpec]) -> str:
    done = sum(finished(Path(r.config.out)) for r in runs)
    return f" ({done} finished earlier, skipped)" if done else ""


def _parallel(study: StudyConfig, runs: list[RunSpec], jobs: int, progress: Progress, log: Log,
              retries: Optional[int] = None, fuse: bool = False) -> list[str]:
    import signal

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    trained: list[str] = []
    # spawn: a fork of a process that has used OpenMP threads may deadlock.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_worker, study.to_dict(), i, threads, _device_for(i), retries, fuse) for i in range(jobs)]

        def pass_on_sigterm(signum: int, frame: Any) -> None:
            # Ctrl-C reaches the workers by itself (one process group); a SIGTERM sent to this
            # process alone (a scheduler's, a kill) is passed on, so each worker checkpoints.
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, pass_on_sigterm)
        pending: set[Future] = set(futures)
        last = ""
        try:
            while pending:
                done, pending = wait(pending, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
                for fut in done:
                    trained += fut.result()  # a worker's UserError surfaces here, as one line
                line = progress.line()
                if line != last:
                    log(line)
                    sys.stdout.flush()
                    last = line
        except KeyboardInterrupt as e:
            log("stopping: every job finishes its current step and writes a checkpoint ...")
            wait(futures)  # a second Ctrl-C interrupts this wait too: the workers then stop at once
            stops = [f.exception() for f in futures if isinstance(f.exception(), KeyboardInterrupt)]
            raise (stops[0] if stops else e) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    return trained
