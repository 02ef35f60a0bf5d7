"""`longcat <command>`: parses arguments, builds a config, calls one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .cli_tools import add_tool_parsers
from .config import PRESETS, ConfigError, LongcatConfig
from .data.corpus import DataError
from .inference.generate import GenerationError


def _load_config(preset_or_dir: str) -> tuple[LongcatConfig, str]:
    if preset_or_dir in PRESETS:
        return LongcatConfig.from_preset(preset_or_dir), f"preset {preset_or_dir}"
    path = Path(preset_or_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{preset_or_dir!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint directory "
            "or config.json"
        )
    return LongcatConfig.from_json_file(path), str(path)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def cmd_info(args: argparse.Namespace) -> int:
    from .accounting import model_report

    config, source = _load_config(args.target)
    if args.seq_len < 1:
        raise ConfigError(f"--seq-len must be a positive number of tokens, got {args.seq_len}")
    if args.ffn_experts is not None and not 0 <= args.ffn_experts <= min(config.moe_topk, config.n_routed_experts):
        raise ConfigError(
            f"--ffn-experts must lie between 0 and moe_topk ({config.moe_topk}) FFN experts per token, "
            f"got {args.ffn_experts}"
        )
    report = model_report(config, seq_len=args.seq_len, ffn_experts_avg=args.ffn_experts)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    c = config
    print(f"{source}")
    print(
        f"  {c.num_layers} ScMoE layers ({c.num_hidden_layers} MLA sublayers), hidden {c.hidden_size}, "
        f"{c.num_attention_heads} heads, vocab {c.vocab_size}"
    )
    print(
        f"  MoE: {c.n_routed_experts} FFN experts (width {c.expert_ffn_hidden_size}) + {c.zero_expert_num} "
        f"zero experts ({c.zero_expert_type}), top-{c.moe_topk}, scale {c.routed_scaling_factor:g}"
    )
    mtp = f" (+{_human(report.mtp_params)} MTP module)" if report.mtp_params else ""
    print(f"  total parameters       {_human(report.total_params)}{mtp}")
    print(
        f"  active per token       {_human(report.active_params_min)} (0 FFN experts)  "
        f"{_human(report.active_params_avg)} (K_e = {report.ffn_experts_avg:g})  "
        f"{_human(report.active_params_max)} ({c.moe_topk})"
    )
    latent = c.kv_lora_rank + c.qk_rope_head_dim
    print(
        f"  KV cache per token     {report.kv_cache_bytes_per_token:,} bytes "
        f"(bf16 latent: {c.num_hidden_layers} x {latent} values)"
    )
    print(f"  forward FLOPs / token  {report.flops_per_token / 1e9:.2f} GFLOP at {report.seq_len} tokens of context")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "moe":
        from .bench import moe

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len}
        if args.batch:
            kwargs["batches"] = tuple(args.batch)
        result = moe.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else moe.report(result))
        return 0
    if args.name == "train":
        from .bench import train

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len, "data_dir": args.data}
        if args.batch:
            kwargs["batch"] = args.batch[0]
        result = train.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else train.report(result))
        return 0
    if args.name == "ep":
        from .bench import ep

        kwargs = {"preset": args.preset, "rounds": args.rounds, "seq_len": args.seq_len}
        if args.batch:
            kwargs["batch"] = args.batch[0]
        result = ep.run(**kwargs)
        print(json.dumps(result, indent=2) if args.json else ep.report(result))
        return 0
    if args.name == "serve":
        from .bench import serve

        if not args.checkpoint:
            raise GenerationError("bench serve needs --checkpoint DIR (a trained checkpoint with its tokenizer)")
        result = serve.run(args.checkpoint, max_tokens=args.max_tokens, requests_per_client=args.requests,
                           speculative=args.speculative, anchor=not args.no_anchor, compile=args.compile)  # fmt: skip
        print(json.dumps(result, indent=2) if args.json else serve.report(result))
        return 0 if result["requests_failed"] == 0 else 1
    if args.name == "decode":
        from .bench import decode

        result = decode.run(
            checkpoint=args.checkpoint, repeats=max(2, args.rounds // 2), draft_tokens=args.draft_tokens
        )
        print(json.dumps(result, indent=2) if args.json else decode.report(result))
        return 0
    raise AssertionError(args.name)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import prepare
    from .training.trainer import default_data_dir

    out = Path(args.out) if args.out else default_data_dir()
    meta = prepare(out, inputs=args.input, tokenizer_path=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, seed=args.seed)  # fmt: skip
    print(f"prepared {out}: {meta['train_tokens']:,} training tokens, vocabulary {meta['vocab_size']}, "
          f"unigram entropy {meta['unigram_entropy']:.3f} nats")  # fmt: skip
    for domain, info in meta["domains"].items():
        print(f"  {domain}: {info['train_docs']} training documents, {info['val_docs']} held out "
              f"({info['val_tokens']:,} tokens)")  # fmt: skip
    for item in meta.get("skipped_files", []):
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    bare = [domain for domain, info in meta["domains"].items() if not info["val_docs"]]
    if bare:
        print(f"note: {', '.join(bare)} held out nothing (one document, or too few for --val-fraction), so "
              "training reports no validation loss for them; plain-text files in one folder form one domain",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import datetime

    from .distributed.layout import in_torchrun
    from .training.config import TrainConfig
    from .training.determinism import enable_blas_reproducibility
    from .training.trainer import TrainingError, train

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
    if args.max_restarts is not None and args.nproc is None:
        raise ConfigError("--max-restarts needs --nproc N (under torchrun, pass --max-restarts to torchrun)")
    if args.ep is not None and args.nproc is None and not in_torchrun():
        raise ConfigError(
            "--ep needs --nproc N (or a torchrun launch): expert parallelism spreads experts over processes"
        )
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / (f"{args.preset or 'tiny'}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    )
    # torchrun restarting failed workers (--max-restarts): they continue from the last complete checkpoint
    restarted = in_torchrun() and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not args.resume:
        from .training.checkpointing import list_checkpoints

        args.resume = bool(list_checkpoints(out / "checkpoints"))
    if args.resume and (out / "train_config.json").is_file():
        cfg = TrainConfig.from_file(out / "train_config.json")  # the run's own settings
    elif args.config:
        cfg = TrainConfig.from_file(args.config)
    else:
        cfg = TrainConfig()
    assignments = list(args.set or [])
    for flag, key in (("preset", "preset"), ("max_steps", "max_steps"), ("seed", "seed"),
                      ("save_every", "save_every"), ("data", "data_dir")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            assignments.append(f"{key}={json.dumps(value)}")
    if args.deterministic:
        assignments.append("deterministic=true")
    if args.width is not None and not args.transfer_from:
        raise ConfigError("--width applies with --transfer-from SWEEP_DIR (width transfer from a tuned proxy)")
    if args.transfer_from:
        if args.resume:
            raise ConfigError("--transfer-from starts a run; a resume continues the run's own train_config.json")
        from .scaling.transfer import transferred_config

        cfg = transferred_config(Path(args.transfer_from), args.width, assignments)
    else:
        cfg = cfg.with_overrides(assignments)
    model_config = _resumed_model_config(out, cfg) if args.resume else cfg.model_config()
    if args.nproc is not None:  # the launcher: start the workers, each of which comes back here
        from .launcher import launch_train

        worker = _without_launcher_flags(args.argv)
        if not args.out:
            worker += ["--out", str(out)]
        print(f"training {cfg.preset} into {out} on {args.nproc} processes", file=sys.stderr)
        experts = model_config.n_routed_experts
        return launch_train(worker, args.nproc, args.ep or 1, experts, max_restarts=args.max_restarts or 0)
    if cfg.deterministic:  # MKL takes its reproducible mode only before its first computation
        enable_blas_reproducibility()
    layout = None
    if in_torchrun():
        from .distributed.layout import init_layout

        cuda = cfg.device in ("auto", "cuda") and torch_cuda_available()
        layout = init_layout(args.ep or 1, "cuda" if cuda else "cpu")
        if restarted and not args.resume:  # no checkpoint yet: the failed attempt's rows go, the run starts over
            import torch.distributed as dist

            if layout.is_main:
                (out / "metrics.jsonl").unlink(missing_ok=True)
            dist.barrier()
    main_rank = layout is None or layout.is_main
    if main_rank:
        print(f"training {cfg.preset} into {out}", file=sys.stderr)
    finished = False
    try:
        summary = train(cfg, out, resume=args.resume, progress=not args.quiet, layout=layout)
        finished = True
        if main_rank:
            print(json.dumps(summary, indent=2))
    except TrainingError as err:
        print(f"longcat: {err}" if main_rank else f"longcat: rank {layout.rank}: {err}", file=sys.stderr)
    except BaseException:
        if layout is None:
            raise
        import traceback

        print(f"longcat: rank {layout.rank} failed:", file=sys.stderr)
        traceback.print_exc()  # every rank's error is shown, not only rank 0's
    finally:
        if layout is not None:
            import torch.distributed as dist

            if finished:
                dist.barrier()  # no rank tears its connections down while another still uses them
            dist.destroy_process_group()
            # a worker leaves without the interpreter's teardown: gloo's threads have aborted a worker
            # there ("terminate called without an active exception") after its work was done
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0 if finished else 1)
    return 0 if finished else 1


def _resumed_model_config(out: Path, cfg) -> LongcatConfig:  # noqa: ANN001 - TrainConfig
    """The model of the checkpoint a resume continues; a --set model.FIELD that contradicts it is refused
    here, before any worker starts (a resume cannot change the model's shape)."""
    from .training.checkpointing import list_checkpoints

    found = list_checkpoints(out / "checkpoints")
    if not found or not (found[-1][1] / "config.json").is_file():
        return cfg.model_config()  # the trainer says what is missing
    saved = LongcatConfig.from_json_file(found[-1][1] / "config.json")
    for key, value in cfg.model.items():
        if getattr(saved, key, value) != value:
            raise ConfigError(
                f"--set model.{key}={value!r} differs from the checkpoint's {key} = {getattr(saved, key)!r} "
                f"({found[-1][1]}): a resume continues the checkpoint's model; drop the override, or start a new "
                f"run with --out elsewhere (longcat export turns the checkpoint into a model directory)"
            )
    return saved


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _without_launcher_flags(argv: list[str]) -> list[str]:
    """The train arguments a worker gets: the user's, less the launcher's own (--nproc, --ep,
    --max-restarts; the launcher passes --ep on by itself) and the command name."""
    out, skip = [], False
    for item in argv[argv.index("train") + 1 :]:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--nproc", "--ep", "--max-restarts"):
            skip = "=" not in item
            continue
        out.append(item)
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    from .checkpoint import resolve_checkpoint_dir
    from .inference.chat import CheckpointTokenizer
    from .inference.generate import GenerationStats
    from .model.lm import LongcatForCausalLM

    if args.system is not None and not args.chat:
        raise GenerationError("--system only applies with --chat; add --chat or drop --system")
    if args.draft_tokens is not None and not args.speculative:
        raise GenerationError("--draft-tokens only applies with --speculative; add --speculative or drop it")
    for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p)):
        if value is not None and not args.sample:
            raise GenerationError(f"{flag} only applies with --sample (greedy decoding ignores it); add --sample")
    root = resolve_checkpoint_dir(args.checkpoint)  # a local directory, or a Hub id downloaded once
    tokenizer = CheckpointTokenizer(root)  # before the weights: a missing tokenizer fails fast
    model = LongcatForCausalLM.from_pretrained(root).eval()
    text = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        text = tokenizer.chat(messages)
    ids = tokenizer.encode(text)
    if not ids:
        raise GenerationError("the prompt is empty: pass some text with --prompt")
    stats = GenerationStats()
    temperature = 1.0 if args.temperature is None else args.temperature
    kwargs = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, speculative="mtp" if args.speculative else None,
        num_draft_tokens=1 if args.draft_tokens is None else args.draft_tokens, stats=stats, compile=args.compile,
    )  # fmt: skip
    start = time.perf_counter()
    new: list[int] = []
    shown = ""
    for chunk in model.stream_generate([ids], **kwargs):
        new.extend(chunk[0].tolist())
        if args.stream:
            decoded = tokenizer.decode(new)
            if not decoded.endswith("\ufffd"):  # wait for the rest of a split multi-byte character
                sys.stdout.write(decoded[len(shown) :])
                sys.stdout.flush()
                shown = decoded
    elapsed = time.perf_counter() - start
    decoded = tokenizer.decode(new)
    print(decoded[len(shown) :] if args.stream else decoded)
    if args.stats:
        rate = stats.new_tokens / max(elapsed, 1e-9)
        line = f"{stats.prompt_tokens} prompt tokens; {stats.new_tokens} tokens in {elapsed:.2f}s ({rate:.1f} tokens/s)"
        if args.compile:
            line += " including the first call's compilation"
        if args.speculative:
            line += (
                f"; MTP acceptance {stats.acceptance_rate:.1%}, {stats.tokens_per_forward:.2f} tokens per main forward"
            )
        print(line, file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .training.checkpointing import StateFileError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.source), Path(args.out))
    except StateFileError as err:
        raise CheckpointError(str(err)) from err
    print(out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .training.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, active parameters, KV cache and FLOPs per token")
    info.add_argument("target", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint directory")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.add_argument("--ffn-experts", type=float, default=None, help="K_e (default: K * N / (N + Z))")
    info.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="train a tokenizer and write token shards with a validation split")
    prep.add_argument("--out", help="output directory (default: the cache used by `longcat train`)")
    prep.add_argument("--input", nargs="+", help="text/JSONL files or directories (default: the embedded corpus)")
    prep.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    prep.add_argument("--vocab-size", type=int, default=4096)
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.add_argument("--seed", type=int, default=0)
    prep.set_defaults(func=cmd_data_prepare)

    train = sub.add_parser("train", help="train a LongCat model (default: the tiny preset on the embedded corpus)")
    train.add_argument("--preset", help="model preset (tiny, small, longcat-flash)")
    train.add_argument("--config", help="a JSON file of training fields (see TrainConfig)")
    train.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override fields; model.FIELD for the model (repeatable)",
    )
    train.add_argument(
        "--transfer-from",
        metavar="SWEEP_DIR",
        help="width transfer: start from the best proxy point of `longcat sweep --out SWEEP_DIR`",
    )
    train.add_argument("--width", type=int, help="with --transfer-from: the target hidden size")
    train.add_argument("--out", help="run directory (default: runs/PRESET-TIMESTAMP)")
    train.add_argument("--data", help="a prepared data directory (default: the embedded corpus)")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--deterministic", action="store_true", help="bitwise-reproducible kernels")
    train.add_argument("--save-every", type=int, help="checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--nproc", type=int, help="train on N local processes (torch.distributed.run); batch_size is global"
    )
    train.add_argument("--ep", type=int, help="expert parallelism: spread each layer's FFN experts over E ranks")
    train.add_argument(
        "--max-restarts", type=int, help="with --nproc: restart failed workers up to K times; they resume by themselves"
    )
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("checkpoint", help="a checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format")
    gen.add_argument("--system", help="system prompt for --chat")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    gen.add_argument("--draft-tokens", type=int, help="MTP draft tokens per round (default 1; with --speculative)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, help="with --sample: softmax temperature, > 0 (default 1)")
    gen.add_argument("--top-k", type=int, help="with --sample: keep the k most likely tokens")
    gen.add_argument("--top-p", type=float, help="with --sample: keep the smallest set of tokens with this mass")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stats", action="store_true", help="print speed (and MTP acceptance) to stderr")
    gen.add_argument("--compile", action="store_true", help="torch.compile the decode steps (slow first call)")
    gen.set_defaults(func=cmd_generate)

    add_tool_parsers(sub)

    export = sub.add_parser("export", help="a training step checkpoint as a Hugging Face directory")
    export.add_argument("source", help="checkpoints/step_N of a run, or a run directory (its latest checkpoint)")
    export.add_argument("--out", required=True, help="the directory to write (replaced if it exists)")
    export.set_defaults(func=cmd_export)

    plot = sub.add_parser("plot", help="PNG plots of a run's metrics")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="where to write the PNGs (default: RUN_DIR/plots)")
    plot.set_defaults(func=cmd_plot)

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
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    from .checkpoint import ZeroExpertRowsIgnored
    from .runtime import tune_cpu_allocator

    warnings.simplefilter("ignore", ZeroExpertRowsIgnored)  # our own final/ carries them on purpose
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if argv is None:  # the `longcat` process itself, not a caller of main() inside another program
        tune_cpu_allocator()
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"longcat: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, GenerationError) as err:
        print(f"longcat: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
