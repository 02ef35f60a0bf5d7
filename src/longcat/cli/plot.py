"""`longcat plot`: PNG plots of a run's metrics."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from ..training.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    plot = sub.add_parser("plot", help="PNG plots of a run's metrics")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    plot.set_defaults(func=run)
