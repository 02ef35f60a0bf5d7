"""The `longcat` commands of the tools built on training and inference: serve, sweep, transfer, grow,
plan and study (their parsers and handlers; cli.py holds the rest and `main`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError
from .inference.generate import GenerationError


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serving.server import ServeOptions, serve
    except ImportError as err:
        raise CheckpointError(
            f"longcat serve needs the server extra ({err.name} is missing): pip install 'longcat[serve]'"
        ) from err
    from .checkpoint import resolve_checkpoint_dir

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
        shutdown_timeout=args.shutdown_timeout, dtype=args.dtype,
        log_level=args.log_level,
    )  # fmt: skip
    from .serving.engine import EngineError

    try:
        return serve(options)
    except EngineError as err:  # a setting the model cannot serve with, named before the port opens
        raise GenerationError(str(err)) from err


def cmd_sweep(args: argparse.Namespace) -> int:
    from .scaling.sweep import parse_grid, run_sweep

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


def cmd_transfer(args: argparse.Namespace) -> int:
    from .scaling.transfer import transferred_config
    from .training.config import TrainConfig

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


def cmd_grow(args: argparse.Namespace) -> int:
    from .scaling.growth import grow
    from .training.checkpointing import StateFileError
    from .training.trainer import TrainingError

    try:
        grow(Path(args.source), Path(args.out), factor=args.factor)
    except (TrainingError, StateFileError) as err:
        raise ConfigError(str(err)) from err
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .planning.architectures import resolve
    from .planning.cost import Deployment, plan, report
    from .planning.hardware import load_hardware

    deployment = Deployment(
        ep=args.ep, batch_per_device=args.batch_per_device, seq_len=args.seq_len, draft_tokens=args.draft_tokens,
        mtp_accept=args.mtp_accept, dense_placement=args.dense_placement, overlap=args.overlap,
        price_per_gpu_hour=args.price_per_gpu_hour, weight_precision=args.precision,
        attention_us=args.attention_us, moe_us=args.moe_us,
    )  # fmt: skip
    result = plan(resolve(args.model), load_hardware(args.hardware, args.hw), deployment)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .studies.catalog import STUDIES
    from .studies.runner import command_line, run_study, write_report

    if args.list or not args.name:
        for study in STUDIES.values():
            print(f"{study.name:16} ~{study.minutes} min  {study.question}")
        return 0
    if args.name not in STUDIES:
        raise ConfigError(f"unknown study {args.name!r}; `longcat study --list` lists them: {', '.join(STUDIES)}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    study = STUDIES[args.name]
    out = Path(args.out or f"runs/study-{study.name}" + ("-quick" if args.quick else ""))
    if args.checkpoint:
        if study.name != "compute-allocation":
            raise ConfigError("--checkpoint applies to the compute-allocation study (the others train their arms)")
        from .studies.allocation import measure_checkpoint

        results = measure_checkpoint(Path(args.checkpoint), Path(args.data) if args.data else None, out / "given")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    else:
        results = run_study(study, out, seeds=args.seeds, quick=args.quick, data=args.data, resume=args.resume,
                            progress=not args.quiet)  # fmt: skip
    report = write_report(study, out, results, command_line(), args.quick)
    summary = json.loads((out / "summary.json").read_text())
    print(f"{study.name}: {summary['verdict']} ({summary['reason']}); report: {report}")
    return 0


def add_tool_parsers(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    st = sub.add_parser("study", help="rerun one of the paper's claims at small scale; writes DIR/report.md")
    st.add_argument("name", nargs="?", help="a study (see --list)")
    st.add_argument("--list", action="store_true", help="the studies, their questions and expected times")
    st.add_argument("--out", help="the study directory (default runs/study-NAME)")
    st.add_argument("--quick", action="store_true", help="a few steps per arm: tests the pipeline, measures nothing")
    st.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    st.add_argument("--data", help="a prepared data directory (default: the embedded corpus)")
    st.add_argument("--resume", action="store_true", help="keep the finished runs of an interrupted study")
    st.add_argument("--quiet", action="store_true", help="no progress output")
    st.add_argument("--checkpoint", help="compute-allocation: measure this trained model instead of training runs")
    st.set_defaults(func=cmd_study)

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
    pl.set_defaults(func=cmd_plan)

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
        help="torch.compile the decode step (one graph per batch bucket, compiled before serving)",
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
    srv.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    srv.set_defaults(func=cmd_serve)

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
    sweep.set_defaults(func=cmd_sweep)

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
    transfer.set_defaults(func=cmd_transfer)

    grow = sub.add_parser("grow", help="stack a run's layers (paper §3.1.2) with all its training state")
    grow.add_argument("source", help="a run directory, a step checkpoint, or a model directory such as final/")
    grow.add_argument("--out", required=True, help="the grown run directory (continue it with train --resume)")
    grow.add_argument("--factor", type=int, default=2, help="layers L -> factor x L (default 2)")
    grow.set_defaults(func=cmd_grow)
