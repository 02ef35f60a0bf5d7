"""`longcat <command>`: one module per command, each with `add_parser(sub)` (its arguments) and
`run(args)` (parse, build a config, call one library function). `main` maps the library's input
errors to a one-line message and exit status 2."""

from __future__ import annotations

import argparse
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data.corpus import DataError
from ..inference.generate import GenerationError
from . import bench, data, export, generate, grow, info, plan, plot, serve, study, sweep, train, transfer

# in the order `longcat --help` lists them: look, train, run, scale, measure
COMMANDS = (info, data, train, generate, serve, export, plot, sweep, transfer, grow, study, plan, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat", description="LongCat-Flash: train, study and serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    from ..checkpoint import ZeroExpertRowsIgnored
    from ..runtime import tune_cpu_allocator

    warnings.simplefilter("ignore", ZeroExpertRowsIgnored)  # our own final/ carries them on purpose
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the `longcat` process itself, not a caller of main() inside another program
        tune_cpu_allocator()
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"longcat: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, GenerationError) as err:
        print(f"longcat: {err}", file=sys.stderr)
        return 2
