"""``resdense study NAME|list`` and ``resdense report``."""

from __future__ import annotations

import argparse
from typing import Any

from ._util import int_list, parse_overrides, positive_int


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
        s.add_argument("--out", required=True, metavar="STUDY_DIR")
        s.set_defaults(func=cmd_study, spec=spec.name)

    p = sub.add_parser("report", help="(re)draw a study's figures and report from its result files; on a folder of "
                                      "studies, every study's report and an index page")
    p.add_argument("study_dir", metavar="STUDY_DIR|FOLDER")
    p.set_defaults(func=cmd_report)


def cmd_list(args: argparse.Namespace) -> int:
    from ..studies import STUDIES, StudyConfig

    for spec in STUDIES.values():
        print(f"{spec.name}: {spec.summary}")
        print(f"  presets: {', '.join(spec.presets)}")
        for preset in spec.presets:
            print(f"  budget of preset {preset}: {_preset_budget(spec, preset)}")
        # Claims depend on the preset (a short budget leaves some undecided): list each once,
        # with the presets that decide it.
        by_preset = {p: spec.claims(StudyConfig(study=spec.name, preset=p, options=dict(spec.default_options)))
                     for p in spec.presets}
        deciders: dict[str, list[str]] = {}
        for preset, claims in by_preset.items():
            for c in claims:
                deciders.setdefault(c.id, []).extend([preset] if c.tested else [])
        for claim in next(iter(by_preset.values())):
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
    from ..studies import StudyConfig, get_study, run_study

    spec = get_study(args.spec)
    options = {name: getattr(args, name) for name in spec.default_options}
    study = StudyConfig(study=spec.name, data=args.data, data_dir=args.data_dir, seeds=args.seeds, preset=args.preset,
                        out=args.out, options=options, overrides=parse_overrides(args.set, "--set", "lr=0.05"))
    result = run_study(study, jobs=args.jobs)
    if result["report"] is not None:
        _print_summary(result["report"], args.out)
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
