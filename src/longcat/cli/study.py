"""`longcat study`: one of the paper's claims rerun at small scale."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ConfigError


def run(args: argparse.Namespace) -> int:
    from ..studies.catalog import STUDIES
    from ..studies.runner import command_line, run_study, write_report

    if args.list or not args.name:
        for study in STUDIES.values():
            print(f"{study.name:16} ~{study.minutes} min  {study.question}")
        return 0
    if args.name not in STUDIES:
        raise ConfigError(f"unknown study {args.name!r}; `longcat study --list` lists them: {', '.join(STUDIES)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    if args.first_seed < 0:
        raise ConfigError(f"--first-seed must not be negative, got {args.first_seed}")
    study = STUDIES[args.name]
    out = Path(args.out or f"runs/study-{study.name}" + ("-quick" if args.quick else ""))
    if args.checkpoint:
        if study.name != "compute-allocation":
            raise ConfigError("--checkpoint applies to the compute-allocation study (the others train their arms)")
        from ..studies.allocation import measure_checkpoint

        results = measure_checkpoint(Path(args.checkpoint), Path(args.data) if args.data else None, out / "given")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = run_study(study, out, seeds=args.seeds, quick=args.quick, data=args.data, resume=args.resume,
                            first_seed=args.first_seed,
                            progress=not args.quiet)  # fmt: skip
    report = write_report(study, out, results, command_line(), args.quick)
    summary = json.loads((out / "summary.json").read_text())
    print(f"{study.name}: {summary['verdict']} ({summary['reason']}); report: {report}")
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    st = sub.add_parser("study", help="rerun one of the paper's claims at small scale; writes DIR/report.md")
    st.add_argument("name", nargs="?", help="a study (see --list)")
    st.add_argument("--list", action="store_true", help="the studies, their questions and expected times")
    st.add_argument("--out", help="the study directory (default runs/study-NAME)")
    st.add_argument("--quick", action="store_true", help="a few steps per arm: tests the pipeline, measures nothing")
    st.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    st.add_argument("--first-seed", type=int, default=0,
                    help="seeds FIRST .. FIRST + N - 1 (default 0): fresh seeds for a test whose rule was set after "
                    "seeing earlier ones")  # fmt: skip
    st.add_argument("--data", help="a prepared data directory (default: the embedded corpus)")
    st.add_argument("--resume", action="store_true", help="keep the finished runs of an interrupted study")
    st.add_argument("--quiet", action="store_true", help="no progress output")
    st.add_argument("--checkpoint", help="compute-allocation: measure this trained model instead of training runs")
    st.set_defaults(func=run)
