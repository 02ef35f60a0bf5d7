"""`longcat bench NAME`: our code and its comparison side by side, as ratios."""

from __future__ import annotations

import argparse
import json

from ..inference.generate import GenerationError


def run(args: argparse.Namespace) -> int:
    if args.name == "moe":
        from ..bench import moe

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len}
        if args.batch:
            kwargs["batches"] = tuple(args.batch)
        result = moe.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else moe.report(result))
        return 0
    if args.name == "train":
        from ..bench import train

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len, "data_dir": args.data}
        if args.batch:
            kwargs["batch"] = args.batch[0]
        result = train.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else train.report(result))
        return 0
    if args.name == "ep":
        from ..bench import ep

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len}
        if args.batch:
            kwargs["batch"] = args.batch[0]
        result = ep.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else ep.report(result))
        return 0
    if args.name == "serve":
        from ..bench import serve

        if not args.checkpoint:
            raise GenerationError("bench serve needs --checkpoint DIR (a trained checkpoint with its tokenizer)")
        result = serve.run(args.checkpoint, max_tokens=args.max_tokens, requests_per_client=args.requests,
                           speculative=args.speculative, anchor=not args.no_anchor, compile=args.compile)  # fmt: skip
        print(json.dumps(result, indent=2) if args.json else serve.report(result))
        return 0 if result["requests_failed"] == 0 else 1
    if args.name == "decode":
        from ..bench import decode

        result = decode.run(
            checkpoint=args.checkpoint, repeats=max(2, args.rounds // 2), draft_tokens=args.draft_tokens
        )
        print(json.dumps(result, indent=2) if args.json else decode.report(result))
        return 0
    raise AssertionError(args.name)


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    bench = sub.add_parser("bench", help="benchmarks against transformers and dense baselines")
    bench.add_argument("name", choices=["moe", "train", "decode", "ep", "serve"])
    bench.add_argument("--checkpoint", help="decode: a trained checkpoint (adds speculative vs plain); serve: required")
    bench.add_argument("--max-tokens", type=int, default=64, help="serve: output tokens per request")
    bench.add_argument("--requests", type=int, default=2, help="serve: requests per client at each level")
    bench.add_argument("--speculative", action="store_true", help="serve: our server with MTP speculation")
    bench.add_argument("--no-anchor", action="store_true", help="serve: skip transformers serve (ours only)")
    bench.add_argument("--compile", action="store_true", help="serve: our server with --compile")
    bench.add_argument("--draft-tokens", type=int, default=1, help="decode: MTP draft tokens per round")
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--preset", default="small")
    bench.add_argument(
        "--batch", type=int, nargs="+", default=None, help="sequences per batch (moe: 2 4 8; train: 8; ep: 4 a rank)"
    )
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--rounds", type=int, default=10, help="timed rounds (the median is reported)")
    bench.add_argument("--data", help="train: a prepared data directory (default: the embedded corpus)")
    bench.set_defaults(func=run)
