"""`longcat bench NAME`: our code and its comparison side by side, as ratios."""

from __future__ import annotations

import argparse
import json

from ..inference.generate import GenerationError


def _model_overrides(assignments: list[str]) -> dict:
    """`--set model.FIELD=VALUE` as a dict of model config fields (VALUE is JSON, bare words strings)."""
    from ..config import ConfigError

    fields = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("model."):
            raise ConfigError(f"--set {item!r}: bench moe and decode take model.FIELD=VALUE (the model's fields)")
        try:
            fields[key.removeprefix("model.")] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key.removeprefix("model.")] = raw
    return fields


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    if args.name == "ep" and (args.device != "cpu" or args.dtype != "float32" or args.set):
        raise ConfigError("bench ep runs on the CPU in fp32 with its own flags: --device, --dtype and --set apply "
                          "to bench train, moe and decode (--device and --dtype to serve too)")  # fmt: skip
    if args.name == "moe":
        import torch

        from ..bench import moe

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len, "device": args.device,
                  "dtype": getattr(torch, args.dtype), "overrides": _model_overrides(args.set or [])}  # fmt: skip
        if args.batch:
            kwargs["batches"] = tuple(args.batch)
        result = moe.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else moe.report(result))
        return 0
    if args.name == "train":
        from ..bench import train

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len, "data_dir": args.data,
                  "device": args.device, "dtype": args.dtype, "overrides": args.set or []}  # fmt: skip
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
        if args.set:
            raise ConfigError("bench serve serves --checkpoint as it is; --set applies to train, moe and decode")
        levels = tuple(args.batch) if args.batch else serve.LEVELS
        result = serve.run(args.checkpoint, max_tokens=args.max_tokens, requests_per_client=args.requests,
                           speculative=args.speculative, anchor=not args.no_anchor, compile=args.compile,
                           levels=levels, device=args.device, dtype=args.dtype)  # fmt: skip
        print(json.dumps(result, indent=2) if args.json else serve.report(result))
        return 0 if result["requests_failed"] == 0 else 1
    if args.name == "decode":
        from ..bench import decode

        result = decode.run(
            checkpoint=args.checkpoint, repeats=max(2, args.rounds // 2), draft_tokens=args.draft_tokens,
            device=args.device, dtype=args.dtype, preset=args.preset, overrides=_model_overrides(args.set or []),
            batches=tuple(args.batch) if args.batch else (16, 64),
        )  # fmt: skip
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
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="sequences per batch (moe: 2 4 8; train: 8; ep: 4 a rank; decode: 16 64 concurrent requests)",
    )
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--rounds", type=int, default=10, help="timed rounds (the median is reported)")
    bench.add_argument("--data", help="train: a prepared data directory (default: the embedded corpus)")
    bench.add_argument("--device", default="cpu", help="train, moe, decode, serve: cpu or cuda (cuda:N)")
    bench.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"],
        help="train: bfloat16 is the bf16 autocast recipe (fp32 master weights); moe, decode, serve: weights' dtype",
    )  # fmt: skip
    bench.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="train: a training config field (model.FIELD for the model, e.g. model.hidden_size=1024); "
        "moe, decode: model.FIELD only; repeatable",
    )  # fmt: skip
    bench.set_defaults(func=run)
