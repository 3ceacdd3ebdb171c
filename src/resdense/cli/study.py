"""``resdense study NAME|list`` and ``resdense report``."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from typing import Any

from ._util import int_between, int_list, parse_overrides, positive_int

# The flags of `--slurm` (each refused without it): attribute -> flag.
SLURM_FLAGS = {"partition": "--partition", "time": "--time", "cpus_per_task": "--cpus-per-task",
               "gpus_per_task": "--gpus-per-task", "array_size": "--array-size", "throttle": "--throttle",
               "signal_lead": "--signal-lead", "sbatch_arg": "--sbatch-arg"}


def _option_type(default: Any) -> Any:
    if isinstance(default, list):
        return int_list
    return type(default)


def register(sub: Any) -> None:
    from ..studies import STUDIES

    p = sub.add_parser("study", help="the papers' claims as experiments: `resdense study list` names them")
    studies = p.add_subparsers(dest="study", metavar="STUDY", parser_class=type(p))
    studies.required = True
    studies.add_parser("list", help="the studies, their presets and claims").set_defaults(func=cmd_list)
    for spec in STUDIES.values():
        s = studies.add_parser(spec.name, help=spec.summary)
        s.add_argument("--data", default="fashion-mnist")
        s.add_argument("--data-dir")
        s.add_argument("--seeds", type=int_list, default=[0, 1, 2],
                       help="seeds of every run (default 0,1,2): claims are decided over them")
        s.add_argument("--preset", choices=list(spec.presets), default="quick")
        for name, default in spec.default_options.items():
            s.add_argument(f"--{name}", type=_option_type(default), default=default,
                           help=f"{spec.option_help.get(name, '')} (default "
                                f"{','.join(map(str, default)) if isinstance(default, list) else default})".lstrip())
        s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training setting of every run")
        s.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                       help="train N runs at once (CPU threads divided among them; one run per GPU where there are several)")
        s.add_argument("--retries", type=int_between(0, 10), metavar="N",
                       help="retry a run that fails up to N times, then report it as failed and go on "
                            "(default: a failure stops the study; with --slurm 2)")
        s.add_argument("--fuse-seeds", action=argparse.BooleanOptionalAction, default=None,
                       help="train each arm's seeds as one model, written as separate runs with their results "
                            "(default: on CUDA, where it is faster; off on a CPU)")
        s.add_argument("--out", required=True, metavar="STUDY_DIR")
        _add_slurm_flags(s)
        s.set_defaults(func=cmd_study, spec=spec.name)
    st = studies.add_parser("status", help="a study's runs done / running (where, which Slurm job) / waiting / "
                                           "failed, the time left and the report; reads the folder only")
    st.add_argument("study_dir", metavar="STUDY_DIR")
    st.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="(re)draw a study's figures and report from its result files; on a folder of "
                                      "studies, every study's report and an index page")
    p.add_argument("study_dir", metavar="STUDY_DIR|FOLDER")
    p.set_defaults(func=cmd_report)


def _add_slurm_flags(s: Any) -> None:
    from ..studies.slurm import MAX_CPUS, MAX_GPUS, MAX_TASKS, SIGNAL_LEAD_S

    g = s.add_argument_group("on a Slurm cluster (see the README, 'On a cluster')")
    g.add_argument("--slurm", action="store_true",
                   help="submit the study as a job array of study workers (script kept in STUDY_DIR/slurm.sbatch)")
    g.add_argument("--partition", metavar="NAME", help="Slurm partition (default: the cluster's)")
    g.add_argument("--time", metavar="LIMIT", help="time limit of each task, e.g. 4:00:00 (default: the partition's)")
    g.add_argument("--cpus-per-task", type=int_between(1, MAX_CPUS), metavar="N", help="CPUs per task (default 1)")
    g.add_argument("--gpus-per-task", type=int_between(0, MAX_GPUS), metavar="N", help="GPUs per task (default 0)")
    g.add_argument("--array-size", type=int_between(1, MAX_TASKS), metavar="N",
                   help="tasks in the array (default: one per unfinished run)")
    g.add_argument("--throttle", type=int_between(1, MAX_TASKS), metavar="N",
                   help="at most N tasks at once (--array=...%%N; default 16)")
    g.add_argument("--signal-lead", type=int_between(*SIGNAL_LEAD_S), metavar="SECONDS",
                   help="SIGUSR1 each task this long before its time limit: it checkpoints and requeues (default 120)")
    g.add_argument("--sbatch-arg", action="append", metavar="=--OPTION=VALUE",
                   help="one more sbatch option, with '=' (e.g. --sbatch-arg=--account=abc); repeatable")
    # What the sbatch script runs: requeue on SIGTERM, torch threads from SLURM_CPUS_PER_TASK.
    g.add_argument("--slurm-worker", action="store_true", help=argparse.SUPPRESS)


def cmd_list(args: argparse.Namespace) -> int:
    from ..studies import STUDIES, StudyConfig
    from ..studies.spec import UNCALIBRATED

    for spec in STUDIES.values():
        print(f"{spec.name}: {spec.summary}")
        print(f"  presets: {', '.join(spec.presets)}")
        for preset in spec.presets:
            print(f"  budget of preset {preset}: {_preset_budget(spec, preset)}")
            for what, note in (("not yet calibrated", UNCALIBRATED.get(preset)), ("measured", spec.measured.get(preset))):
                if note:
                    print(f"    {what}: {note}")
        # Claims depend on the preset (a short budget leaves some undecided): list each once,
        # with the presets that decide it.
        by_preset = {p: spec.claims(StudyConfig(study=spec.name, preset=p, options=dict(spec.default_options)))
                     for p in spec.presets}
        deciders: dict[str, list[str]] = {}
        first: dict[str, Any] = {}  # each claim as its first preset words it (some exist on some presets only)
        for preset, claims in by_preset.items():
            for c in claims:
                deciders.setdefault(c.id, []).extend([preset] if c.tested else [])
                first.setdefault(c.id, c)
        for claim in first.values():
            tested = deciders[claim.id]
            print(f"  claim: {claim.text} [{claim.contrast} {claim.predicted}]"
                  f" (decided by preset{'s' if len(tested) > 1 else ''} {', '.join(tested)})")
    return 0


def _preset_budget(spec: Any, preset: str) -> str:
    """A preset's planned budget in words (each distinct one where its arms differ), beside the paper's."""
    from ..studies import StudyConfig
    from ..studies.budget import paper_text, planned_text

    study = StudyConfig(study=spec.name, preset=preset, seeds=[0], options=dict(spec.default_options))
    planned = list(dict.fromkeys(planned_text(run.config) for run in spec.runs(study)))
    paper = spec.paper_budget.to_dict() if spec.paper_budget else {}
    return f"{'; '.join(planned)} ({paper_text(paper)})"


def cmd_study(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..studies import StudyConfig, get_study, run_study

    spec = get_study(args.spec)
    options = {name: getattr(args, name) for name in spec.default_options}
    study = StudyConfig(study=spec.name, data=args.data, data_dir=args.data_dir, seeds=args.seeds, preset=args.preset,
                        out=args.out, options=options, overrides=parse_overrides(args.set, "--set", "lr=0.05"))
    given = [flag for attr, flag in SLURM_FLAGS.items() if getattr(args, attr) is not None]
    if given and not args.slurm:
        raise ConfigError(f"{given[0]} is a Slurm setting: add --slurm to submit the study, or drop {given[0]}")
    if args.slurm:
        return _submit(args, spec, study)
    threads = os.environ.get("SLURM_CPUS_PER_TASK") if args.slurm_worker else None
    if args.slurm_worker:
        _stop_between_runs()
    try:
        result = run_study(study, jobs=args.jobs, retries=args.retries,
                           threads=int(threads) if threads and threads.isdigit() else None, report_once=args.slurm_worker,
                           fuse=args.fuse_seeds)
    except KeyboardInterrupt as e:
        # SIGUSR1 is the time-limit warning of the sbatch script: come back and continue. SIGTERM
        # (scancel, preemption, scontrol requeue) leaves the decision to Slurm.
        if not (args.slurm_worker and getattr(e, "exit_code", 0) == 128 + signal.SIGUSR1):
            raise
        from ..studies.slurm import requeue_self

        print(f"resdense study: {e}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # requeueing signals this job: finish the message
        requeue_self(functools.partial(print, flush=True))
        return e.exit_code
    if result["report"] is not None:
        _print_summary(result["report"], args.out)
    if result.get("failed"):
        print(f"resdense study: {len(result['failed'])} run(s) failed after {(args.retries or 0) + 1} attempt(s) each "
              f"({', '.join(result['failed'])}); no report: see `resdense study status {args.out}`", file=sys.stderr)
        return 1
    return 0


def _stop_between_runs() -> None:
    """A Slurm worker's signals outside a run's training loop (starting, between runs, writing the
    report), where their default action would end the task unrequeued: stop there, as Ctrl-C would
    (a run's own handler takes over while it trains, and checkpoints at the step)."""
    from ..train.stop import TrainingStopped, signal_name

    def stop(signum: int, frame: Any) -> None:
        raise TrainingStopped(f"stopped by {signal_name(signum)} outside a run's training (nothing to checkpoint)",
                              signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, stop)


def _submit(args: argparse.Namespace, spec: Any, study: Any) -> int:
    from ..studies.slurm import SlurmOptions, submit

    flags = []
    for name, value in study.options.items():
        flags += [f"--{name}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    if args.fuse_seeds is not None:  # else each task decides by its own device
        flags.append("--fuse-seeds" if args.fuse_seeds else "--no-fuse-seeds")
    defaults = SlurmOptions()
    opts = SlurmOptions(partition=args.partition, time=args.time, cpus_per_task=args.cpus_per_task or 1,
                        gpus_per_task=args.gpus_per_task or 0, tasks=args.array_size,
                        throttle=args.throttle or defaults.throttle, signal_lead=args.signal_lead or defaults.signal_lead,
                        retries=defaults.retries if args.retries is None else args.retries,
                        sbatch_args=tuple(args.sbatch_arg or ()))
    submit(study, opts, flags, jobs=args.jobs)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..studies.status import status_lines, study_status

    for line in status_lines(study_status(args.study_dir)):
        print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..studies import build_report
    from ..studies.index import build_index

    if not (Path(args.study_dir) / "study.json").is_file() and any(Path(args.study_dir).glob("*/study.json")):
        index = build_index(args.study_dir)
        print(f"{len(index['studies'])} studies ({', '.join(index['studies'])}); index: {index['index']}")
        return 0
    _print_summary(build_report(args.study_dir), args.study_dir)
    return 0


def _print_summary(report: dict[str, Any], out: str) -> None:
    from ..studies.budget import decided_at
    from ..studies.report import DECISION_WORDS, measured_line
    from ..studies.stats import FAMILY_ALPHA

    width = max([14, *(len(t["group"]) + 1 for t in report["table"])])
    print(f"{'group':<{width}} seeds  train error % (eval)   test error %")
    for t in report["table"]:
        def cell(key: str) -> str:
            return "–" if t[key] is None else f"{100 * t[key]:6.2f} ± {100 * t[key + '_std']:5.2f}"
        print(f"{t['group']:<{width}} {t['seeds']:>5}  {cell('train_error'):>20}  {cell('test_error'):>15}")
    for v in report["verdicts"]:
        print(f"{v.text}: {decided_at(DECISION_WORDS[v.decision].upper(), v.budget, v.paper_budget)}")
        print(f"    {v.contrast} = " + ("no data" if v.difference is None else
              f"{v.difference:+.2f}" + ("" if v.stderr is None else f" ± {v.stderr:.2f}") + f" points ({v.n_seeds} seed{'s' if v.n_seeds != 1 else ''})")
              + f"; {v.reason}")
    if report["verdicts"]:
        print(f"(the {len(report['verdicts'])} decided claims are controlled together: Holm–Bonferroni at a "
              f"family-wise {FAMILY_ALPHA:.0%}; each interval above is unadjusted)")
    for m in report.get("measured", []):
        print(f"(measured, not decided) {measured_line(m)}")
    for line in report.get("compared", []):
        print(f"(against the paper) {line}")
    print(f"report: {out}/report.html and {out}/report.md")
