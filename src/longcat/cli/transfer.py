"""`longcat transfer`: width transfer (paper Table 1) from a sweep's best proxy point."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from ..scaling.transfer import transferred_config
    from ..training.config import TrainConfig

    cfg = transferred_config(Path(args.sweep_dir), args.width, list(args.set or []))
    out = Path(args.out) if args.out else Path(args.sweep_dir) / f"transfer_width{args.width}.json"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    os.replace(tmp, out)
    record = cfg.transfer
    proxy = TrainConfig.from_file(Path(record["proxy_run"]) / "train_config.json")
    print(f"best proxy point {record['proxy_point']} (val loss {record['proxy_val_loss']:.4f}, width "
          f"{record['proxy_width']}); s = {record['s']:g}", file=sys.stderr)  # fmt: skip
    for group in cfg.lr_groups:
        std = f"{proxy.init_std[group]:.4g} -> {cfg.init_std[group]:.4g}" if group in cfg.init_std else "-"
        print(f"  {group:12} init std {std:22} lr {proxy.lr_groups[group]:.4g} -> {cfg.lr_groups[group]:.4g}",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {out}; train it with `longcat train --config {out} --out RUN_DIR`", file=sys.stderr)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    transfer = sub.add_parser("transfer", help="width transfer (paper Table 1) from a sweep's best proxy point")
    transfer.add_argument("sweep_dir")
    transfer.add_argument("--width", type=int, required=True, help="the target hidden size")
    transfer.add_argument("--out", help="the train config to write (default SWEEP_DIR/transfer_widthW.json)")
    transfer.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="explicit values win over transferred ones and are recorded as such",
    )
    transfer.set_defaults(func=run)
