"""``resdense study degradation`` and ``resdense report``."""

from __future__ import annotations

import argparse
from typing import Any

from ._util import int_list, parse_overrides


def register(sub: Any) -> None:
    p = sub.add_parser("study", help="the papers' experiments (degradation)")
    studies = p.add_subparsers(dest="study", metavar="STUDY", parser_class=type(p))
    studies.required = True
    d = studies.add_parser("degradation", help="plain vs residual nets across depth (ResNet paper, Fig. 6)")
    d.add_argument("--data", default="fashion-mnist")
    d.add_argument("--data-dir")
    d.add_argument("--depths", type=int_list, default=[20, 56], help="CIFAR-style depths 6n+2, e.g. 20,56")
    d.add_argument("--seeds", type=int_list, default=[0], help="e.g. 0,1,2 for mean ± std")
    d.add_argument("--preset", choices=("quick", "paper"), default="quick")
    d.add_argument("--shortcut", choices=("A", "B"), default="A", help="the residual nets' shortcut option")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training setting of every run")
    d.add_argument("--out", required=True, metavar="STUDY_DIR")
    d.set_defaults(func=cmd_degradation)

    p = sub.add_parser("report", help="(re)draw a study's figures and report from its result files")
    p.add_argument("study_dir")
    p.set_defaults(func=cmd_report)


def cmd_degradation(args: argparse.Namespace) -> int:
    from ..models.resnet import resnet_cifar
    from ..studies import StudyConfig, build_report, run_study

    for depth in args.depths:  # a bad depth fails before anything trains
        resnet_cifar(depth)
    study = StudyConfig(data=args.data, depths=args.depths, seeds=args.seeds, preset=args.preset,
                        shortcut=args.shortcut, out=args.out, data_dir=args.data_dir,
                        overrides=parse_overrides(args.set))
    run_study(study)
    result = build_report(args.out)
    _print_summary(result, args.out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..studies import build_report

    result = build_report(args.study_dir)
    _print_summary(result, args.study_dir)
    return 0


def _print_summary(result: dict[str, Any], out: str) -> None:
    for t in result["table"]:
        print(f"{t['kind']:>6}-{t['depth']:<4} train error {100 * t['final_train_error']:6.2f}%  "
              f"val {100 * t['final_val_error']:6.2f}%  test {100 * t['test_error']:6.2f}%  ({t['seeds']} seed(s))")
    print(result["verdict"]["text"])
    print(f"report: {out}/report.html and {out}/report.md")
