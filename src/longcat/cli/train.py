"""`longcat train`: one process, or the launcher for `--nproc` workers, each of which comes back here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError, LongcatConfig


def _resumed_model_config(out: Path, cfg) -> LongcatConfig:  # noqa: ANN001 - TrainConfig
    """The model of the checkpoint a resume continues; a --set model.FIELD that contradicts it is refused
    here, before any worker starts (a resume cannot change the model's shape)."""
    from ..training.checkpointing import list_checkpoints

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


def run(args: argparse.Namespace) -> int:
    import datetime

    from ..distributed.layout import in_torchrun
    from ..launcher import join, restarted_worker, run_worker
    from ..training.config import TrainConfig
    from ..training.determinism import enable_blas_reproducibility
    from ..training.trainer import TrainingError, train

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
    restarted = restarted_worker()
    if restarted and not args.resume:
        from ..training.checkpointing import list_checkpoints

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
        from ..scaling.transfer import transferred_config

        cfg = transferred_config(Path(args.transfer_from), args.width, assignments)
    else:
        cfg = cfg.with_overrides(assignments)
    model_config = _resumed_model_config(out, cfg) if args.resume else cfg.model_config()
    if args.nproc is not None:  # the launcher: start the workers, each of which comes back here
        from ..launcher import launch_train

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
        cuda = cfg.device in ("auto", "cuda") and torch_cuda_available()
        layout = join(out, args.ep or 1, "cuda" if cuda else "cpu", start_over=restarted and not args.resume)
    main_rank = layout is None or layout.is_main
    if main_rank:
        print(f"training {cfg.preset} into {out}", file=sys.stderr)

    def body() -> None:
        summary = train(cfg, out, resume=args.resume, progress=not args.quiet, layout=layout)
        if main_rank:
            print(json.dumps(summary, indent=2))

    return run_worker(layout, body, expected=(TrainingError,))


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
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
    train.set_defaults(func=run)
