"""`longcat grow`: a run's layers stacked (paper §3.1.2) with all its training state."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ConfigError


def run(args: argparse.Namespace) -> int:
    from ..scaling.growth import grow
    from ..training.checkpointing import StateFileError
    from ..training.trainer import TrainingError

    try:
        grow(Path(args.source), Path(args.out), factor=args.factor)
    except (TrainingError, StateFileError) as err:
        raise ConfigError(str(err)) from err
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    grow = sub.add_parser("grow", help="stack a run's layers (paper §3.1.2) with all its training state")
    grow.add_argument("source", help="a run directory, a step checkpoint, or a model directory such as final/")
    grow.add_argument("--out", required=True, help="the grown run directory (continue it with train --resume)")
    grow.add_argument("--factor", type=int, default=2, help="layers L -> factor x L (default 2)")
    grow.set_defaults(func=run)
