"""`longcat sweep`: every point of a hyperparameter grid as a training run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..scaling.sweep import parse_grid, run_sweep

    base = []
    for flag, value in (("--preset", args.preset), ("--data", args.data), ("--config", args.config)):
        if value is not None:
            base += [flag, value]
    for item in args.set or []:
        base += ["--set", item]
    results = run_sweep(Path(args.out), parse_grid(args.grid), args.seeds, args.max_steps, base, jobs=args.jobs,
                        resume=args.resume)  # fmt: skip
    finished = [r for r in results if not r["diverged"] and r["val_loss"] is not None]
    print(json.dumps({"points": len(results), "diverged": sum(r["diverged"] for r in results),
                      "failed": sum(r["status"] == "failed" for r in results),
                      "best": min(finished, key=lambda r: r["val_loss"]) if finished else None,
                      "sweep": str(Path(args.out) / "sweep.json")}, indent=2))  # fmt: skip
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    sweep = sub.add_parser("sweep", help="train every point of a hyperparameter grid; sweep.json and plots")
    sweep.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a swept setting (as --set takes it: lr, init_std, init_std.hidden, model.X, ...)",
    )
    sweep.add_argument("--seeds", type=int, default=1, help="runs per point, seeds 0 .. N-1")
    sweep.add_argument("--max-steps", type=int, required=True)
    sweep.add_argument("--out", required=True, help="the sweep directory (runs/, logs/, sweep.json, plots)")
    sweep.add_argument("--jobs", type=int, default=1, help="points trained at once (the threads are shared)")
    sweep.add_argument("--resume", action="store_true", help="finish an interrupted sweep: skip finished points")
    sweep.add_argument("--preset")
    sweep.add_argument("--data", help="a prepared data directory (default: the embedded corpus)")
    sweep.add_argument("--config", help="a train_config.json every point starts from")
    sweep.add_argument("--set", action="extend", nargs="+", metavar="KEY=VALUE", help="a setting every point shares")
    sweep.set_defaults(func=run)
