"""`longcat serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse

from ..checkpoint import CheckpointError
from ..inference.generate import GenerationError


def run(args: argparse.Namespace) -> int:
    try:
        from ..serving.server import ServeOptions, serve
    except ImportError as err:
        raise CheckpointError(
            f"longcat serve needs the server extra ({err.name} is missing): pip install 'longcat[serve]'"
        ) from err
    from ..checkpoint import resolve_checkpoint_dir

    if args.draft_tokens is not None and not args.speculative:
        raise GenerationError("--draft-tokens only applies with --speculative; add --speculative or drop it")
    for flag, value in (("--max-batch", args.max_batch), ("--prefill-chunk", args.prefill_chunk)):
        if value < 1:
            raise GenerationError(f"{flag} must be at least 1, got {value}")
    if args.max_queue < 0 or args.shutdown_timeout < 0:
        raise GenerationError("--max-queue and --shutdown-timeout must not be negative")
    root = resolve_checkpoint_dir(args.checkpoint)
    options = ServeOptions(
        checkpoint=str(root), host=args.host, port=args.port,
        served_model_name=args.served_model_name or args.checkpoint, max_batch=args.max_batch,
        max_queue=args.max_queue, speculative=args.speculative, num_draft_tokens=args.draft_tokens or 1,
        prefill_chunk=args.prefill_chunk, max_model_len=args.max_model_len, compile=args.compile,
        shutdown_timeout=args.shutdown_timeout, dtype=args.dtype, device=args.device,
        log_level=args.log_level,
    )  # fmt: skip
    from ..serving.engine import EngineError

    try:
        return serve(options)
    except EngineError as err:  # a setting the model cannot serve with, named before the port opens
        raise GenerationError(str(err)) from err


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    srv = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching")
    srv.add_argument("checkpoint", help="a checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the model id clients send (default: CHECKPOINT as given)")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    srv.add_argument("--speculative", action="store_true", help="MTP speculative decoding inside the batch")
    srv.add_argument("--draft-tokens", type=int, help="MTP draft tokens per round (default 1; with --speculative)")
    srv.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step")
    srv.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step or speculation round (graphs per batch bucket, compiled before serving)",
    )
    srv.add_argument(
        "--max-model-len",
        type=int,
        help="context a request may use (default: max_position_embeddings); sizes the KV cache",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds running requests may take to finish before they are aborted",
    )
    srv.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16")
    srv.add_argument("--device", default=None, help="where the weights and the cache live: cpu (default), cuda, cuda:N")
    srv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    srv.set_defaults(func=run)
