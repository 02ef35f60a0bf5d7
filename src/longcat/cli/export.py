"""`longcat export`: a training step checkpoint, or a `final/`, as a Hugging Face model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import CheckpointError


def run(args: argparse.Namespace) -> int:
    from ..training.checkpointing import StateFileError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.source), Path(args.out), zero_expert_stubs=args.zero_expert_stubs)
    except StateFileError as err:
        raise CheckpointError(str(err)) from err
    print(out)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    export = sub.add_parser("export", help="a training step checkpoint as a Hugging Face directory")
    export.add_argument(
        "source",
        help="checkpoints/step_N of a run, a run directory (its latest checkpoint), or a Hugging Face directory "
        "such as a run's final/ (to convert its layout)",
    )
    export.add_argument("--out", required=True, help="the directory to write (replaced if it exists)")
    export.add_argument(
        "--zero-expert-stubs",
        action="store_true",
        help="add all-zero weights for the zero experts, the layout transformers 5.0-5.24 alone read "
        "(default: the released layout, read by transformers 4.57 and >= 5.25, vLLM and SGLang)",
    )
    export.set_defaults(func=run)
