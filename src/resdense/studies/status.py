"""``resdense study status OUT``: where a study stands, read from its folder alone.

Runs done, running (which host, process and Slurm job holds each: what its lock records), waiting
and failed; an estimate of the time left; the Slurm jobs ``--slurm`` submitted; the report once it
is written. It opens files for reading only (a lock is only probed, never taken) and trains nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..outputs import STUDY, kind_of
from ..runlock import owner
from .engine import WorkCost, _clock, _total_steps, failures, finished, gave_up, last_epoch
from .slurm import LOGS, submissions
from .report import load_study
from .spec import StudyConfig, get_study


def _load(out: Path) -> StudyConfig:
    if kind_of(out) != STUDY.name or not (out / "study.json").is_file():
        raise UserError(f"{out} is not a study folder (no study.json); give the --out of a `resdense study`")
    return load_study(out)[1]


def study_status(out: str | Path) -> dict[str, Any]:
    """``{"study", "runs": [{name, state, ...}], "counts", "left_s", "jobs", "report"}``."""
    out = Path(out)
    study = _load(out)
    runs = get_study(study.study).runs(study)
    cost = WorkCost()
    rows, work_done, work_left, seconds = [], 0.0, 0.0, 0.0
    for run in runs:
        run_dir = Path(run.config.out)
        total, unit = _total_steps(run), cost.per_step(run)
        row: dict[str, Any] = {"name": run.name, "steps": total}
        holder = owner(run_dir)
        if finished(run_dir):
            row["state"] = "done"
        elif holder is not None:
            row.update(holder, state="running")
        elif gave_up(run_dir):
            row.update(failures(run_dir), state="failed")
        else:
            row["state"] = "waiting"
        last = last_epoch(run_dir)
        row["step"] = total if row["state"] == "done" else min(int(last.get("step", 0)), total)
        if row["step"]:
            work_done += unit * row["step"]
            seconds += float(last.get("wall_time", 0.0))  # seconds the run has trained so far
        if row["state"] in ("running", "waiting"):
            work_left += unit * (total - row["step"])
        rows.append(row)
    counts = {state: sum(r["state"] == state for r in rows) for state in ("done", "running", "waiting", "failed")}
    # The work left at the speed of the work done so far, spread over the runs training now.
    left = work_left * seconds / work_done / max(counts["running"], 1) if work_done and work_left else None
    report = out / "report.html"
    return {"study": study.study, "out": str(out), "runs": rows, "counts": counts, "left_s": left,
            "jobs": submissions(out), "report": str(report) if report.is_file() else None}


def status_lines(status: dict[str, Any]) -> list[str]:
    """What ``resdense study status`` prints."""
    c, out = status["counts"], status["out"]
    lines = [f"{status['study']} study in {out}: {len(status['runs'])} runs: {c['done']} done, {c['running']} "
             f"running, {c['waiting']} waiting, {c['failed']} failed"]
    for r in status["runs"]:
        if r["state"] == "running":
            job = f", Slurm job {r['slurm_job']}" if r.get("slurm_job") else ""
            since = f", for {_clock(time.time() - r['since'])}" if isinstance(r.get("since"), (int, float)) else ""
            lines.append(f"  running  {r['name']}: step {r['step']}/{r['steps']} on {r.get('host', '?')}{job} "
                         f"(pid {r.get('pid')}{since})")
        elif r["state"] == "failed":
            lines.append(f"  failed   {r['name']}: {r.get('attempts')} attempts, last: {r.get('error')} "
                         f"(see {out}/{r['name']}/train.log)")
    if status["left_s"] is not None:
        lines.append(f"about {_clock(status['left_s'])} left at {max(c['running'], 1)} run(s) at a time "
                     "(from the speed of the steps trained so far)")
    for job in status["jobs"][-3:]:
        lines.append(f"Slurm job {job['job']}: {job['tasks']} task{'s' * (job['tasks'] != 1)}, submitted "
                     f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(job['submitted']))}; logs {out}/{LOGS}/{job['job']}_*.out")
    lines.append(f"report: {status['report']}" if status["report"] else
                 "report: not written yet (the worker that finishes the last run writes it)")
    return lines
