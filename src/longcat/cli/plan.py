"""`longcat plan`: the paper's decode cost model (Table 7)."""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from ..planning.architectures import resolve
    from ..planning.cost import Deployment, plan, report
    from ..planning.hardware import load_hardware

    deployment = Deployment(
        ep=args.ep, batch_per_device=args.batch_per_device, seq_len=args.seq_len, draft_tokens=args.draft_tokens,
        mtp_accept=args.mtp_accept, dense_placement=args.dense_placement, overlap=args.overlap,
        price_per_gpu_hour=args.price_per_gpu_hour, weight_precision=args.precision,
        attention_us=args.attention_us, moe_us=args.moe_us,
    )  # fmt: skip
    result = plan(resolve(args.model), load_hardware(args.hardware, args.hw), deployment)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    pl = sub.add_parser("plan", help="the paper's decode cost model (Table 7): TPOT, $/token, memory per device")
    pl.add_argument("model", help="a preset (longcat-flash), deepseek-v3, qwen3-235b-a22b, or a config.json")
    pl.add_argument("--hardware", default="H800-80G", help="H800-80G, H20-141G, H200, H100-80G, or a JSON file")
    pl.add_argument("--hw", action="append", metavar="FIELD=VALUE", help="override a hardware field")
    pl.add_argument("--ep", type=int, default=128, help="expert-parallel devices")
    pl.add_argument("--batch-per-device", type=int, default=96)
    pl.add_argument("--seq-len", type=int, default=5000, help="average context of the decoded sequences")
    pl.add_argument("--draft-tokens", type=int, default=1, help="MTP drafts per step (0: no speculation)")
    pl.add_argument("--mtp-accept", type=float, default=0.8)
    pl.add_argument(
        "--dense-placement",
        choices=["replicated", "sharded"],
        default="replicated",
        help="non-expert weights on every device (MLA in DP) or sharded over them",
    )
    pl.add_argument("--overlap", choices=["sbo", "tbo", "none"], help="default: sbo for ScMoE models, else tbo")
    pl.add_argument("--precision", choices=["fp8", "bf16"], default="fp8", help="weights")
    pl.add_argument("--price-per-gpu-hour", type=float, default=2.0)
    pl.add_argument("--attention-us", type=float, help="a measured attention time per layer (replaces the model's)")
    pl.add_argument("--moe-us", type=float, help="a measured MoE expert time per layer (replaces the model's)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=run)
