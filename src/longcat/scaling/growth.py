"""Model growth by layer stacking (paper §3.1.2): a trained L-layer run becomes an r·L-layer run whose
layers are [l1 … lL, l1 … lL, …], carrying all of its training state, ready for `longcat train --resume`.

What is carried: every tensor of the copied layers (their experts, routers and the controller's
selection biases included) and their AdamW moments and step counts; the embeddings, final norm, head
and MTP module as they are; the step counter, learning-rate schedule position, data position, RNG
state and token counters. The grown run's config pins every value that otherwise derives from
`max_steps` (the MTP start, the controller's decay horizon, the length of WSD's decay phase), so
resuming with a larger `--max-steps` only lengthens the stable phase. Growing a model directory
(`final/`, no optimizer state) works too: the optimizer then starts fresh, at step 0, and says so.

The output is an ordinary run directory written by the trainer's own save path: the grown run is
built as a fresh Trainer, filled with the stacked state, and saved as its step checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from ..config import ConfigError, LongcatConfig
from ..distributed.checkpoint import checkpoint_state, init_optimizer_state
from ..distributed.checkpoint import load as dcp_load
from ..model.lm import LongcatForCausalLM
from ..training.checkpointing import SHARDS_DIR, STATE_FILE, list_checkpoints, load_trainer_state, set_rng_state
from ..training.config import TrainConfig
from ..training.optim import build_optimizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def source_name(name: str, layers: int) -> str:
    """The source parameter a grown one copies: model.layers.(k·L + i).X <- model.layers.i.X."""
    match = _LAYER.match(name)
    return name if match is None else f"model.layers.{int(match.group(1)) % layers}.{match.group(2)}"


def pinned(cfg: TrainConfig) -> TrainConfig:
    """cfg with every max_steps-derived value written out, so a longer run changes only the stable phase."""
    return dataclasses.replace(
        cfg, mtp_start_step=cfg.mtp_start, bias_decay_steps=cfg.bias_decay_horizon, decay_steps=cfg.wsd_decay_steps
    )


def _source(path: Path) -> tuple[Path, dict | None, TrainConfig, LongcatConfig]:
    """-> (directory holding the weights, trainer state or None, the run's TrainConfig, model config)."""
    if (path / STATE_FILE).is_file() or list_checkpoints(path / "checkpoints"):
        directory = path if (path / STATE_FILE).is_file() else list_checkpoints(path / "checkpoints")[-1][1]
        state = load_trainer_state(directory)
        return (
            directory,
            state,
            TrainConfig.from_dict(state["train_config"]),
            LongcatConfig.from_json_file(directory / "config.json"),
        )
    if (path / "config.json").is_file():
        run_config = path.parent / "train_config.json"
        cfg = TrainConfig.from_file(run_config) if run_config.is_file() else TrainConfig()
        return path, None, cfg, LongcatConfig.from_json_file(path / "config.json")
    raise ConfigError(
        f"{path} is neither a run directory with a checkpoint, a step checkpoint ({STATE_FILE}) nor a model "
        "directory (config.json); point longcat grow at one of those"
    )


def grow(source: Path, out: Path, factor: int = 2, progress: bool = True) -> Path:
    from ..training.trainer import Trainer

    if factor < 2:
        raise ConfigError(f"--factor must be at least 2, got {factor}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; grow into a new directory")
    directory, state, cfg, config = _source(Path(source))
    layers = config.num_layers
    if state is None:
        print(f"longcat grow: {directory} holds no optimizer or trainer state; the grown run starts at step 0 "
              "with a fresh optimizer", file=sys.stderr)  # fmt: skip
    grown_cfg = pinned(dataclasses.replace(cfg, model={**cfg.model, "num_layers": factor * layers}))

    try:  # nothing half-written: a failure removes the directory this call created
        trainer = Trainer(grown_cfg, out, resume=False, progress=False)
        ignored = {"torch_dtype", "dtype", "architectures", "transformers_version"}
        expected = {k: v for k, v in dataclasses.replace(config, num_layers=factor * layers).to_dict().items()
                    if k not in ignored}  # fmt: skip
        built = trainer.config.to_dict()
        differ = sorted(k for k, v in expected.items() if built.get(k) != v)
        if differ:
            raise ConfigError(f"the run's config rebuilds a model that differs from {directory}'s in {differ}")
        source_model = LongcatForCausalLM(config, device="cpu", seed=0)
        source_optim = None
        if state is not None:
            source_optim = build_optimizer(source_model, cfg)
            init_optimizer_state(source_optim)
            dcp_load(directory / SHARDS_DIR, checkpoint_state(source_model, source_optim))
        else:
            source_model = LongcatForCausalLM.from_pretrained(directory, device="cpu", dtype=torch.float32)
        copy_stacked(source_model, source_optim, trainer.model, trainer.optimizer, layers)
        if state is not None:
            trainer.step, trainer.skipped = state["step"], state["skipped"]
            trainer.consecutive_bad, trainer.tokens_seen = state["consecutive_bad"], state["tokens_seen"]
            trainer.loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])
        trainer.save()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _carry_metrics(directory, out, trainer.step, layers, factor)
    if progress:
        print(f"grew {layers} -> {factor * layers} layers at step {trainer.step} into {out}; continue with "
              f"`longcat train --out {out} --resume [--max-steps M]`", file=sys.stderr)  # fmt: skip
    return out


@torch.no_grad()
def copy_stacked(source, source_optim, target, target_optim, layers: int) -> None:  # noqa: ANN001
    """Every parameter and persistent buffer of `target` from its source_name in `source`, and with
    both optimizers given, AdamW's exp_avg, exp_avg_sq and step likewise."""
    source_state = source.state_dict()
    for name, tensor in target.state_dict().items():
        tensor.copy_(source_state[source_name(name, layers)])
    if source_optim is None:
        return
    init_optimizer_state(target_optim)
    source_params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        slots, source_slots = target_optim.state[param], source_optim.state[source_params[source_name(name, layers)]]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            slots[key].copy_(source_slots[key])


def _carry_metrics(directory: Path, out: Path, step: int, layers: int, factor: int) -> None:
    """The source run's metric rows up to the growth step, then a row marking the growth."""
    run = directory.parent.parent if directory.parent.name == "checkpoints" else directory.parent
    rows = []
    source = run / "metrics.jsonl"
    if source.is_file():
        for line in source.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    rows.append(line)
            except json.JSONDecodeError:
                continue
    marker = {"step": step, "event": "growth", "layers_before": layers, "layers_after": factor * layers,
              "source": str(directory)}  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows) + json.dumps(marker) + "\n")
