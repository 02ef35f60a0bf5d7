"""`longcat export`: a training step checkpoint as a Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import CheckpointError


def run(args: argparse.Namespace) -> int:
    from ..training.checkpointing import StateFileError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.source), Path(args.out))
    except StateFileError as err:
        raise CheckpointError(str(err)) from err
    print(out)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    export = sub.add_parser("export", help="a training step checkpoint as a Hugging Face directory")
    export.add_argument("source", help="checkpoints/step_N of a run, or a run directory (its latest checkpoint)")
    export.add_argument("--out", required=True, help="the directory to write (replaced if it exists)")
    export.set_defaults(func=run)
