"""Hyperparameter transfer across width (paper §3.1.1, Table 1): tune a narrow proxy, then derive the
wide model's per-group initialisation and learning rates.

The rule is Everett et al.'s "Adam LR full align" for standard parameterisation. With s = target width
/ proxy width:

    group                         init variance        Adam learning rate
    embedding                     unchanged            unchanged
    hidden (router included)      divided by s         divided by s
    unembedding                   divided by s         divided by s
    vectors (norms, biases)       (not initialised     unchanged
                                   from a std)

It assumes every hidden matrix's fan-in grows by s, so `widen` scales all of the model's widths
together (hidden size; dense and expert FFN widths; attention ranks and heads), rounded, while depth,
sparsity and batch size stay the proxy's (`check_same_shape` refuses a target that changes them).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import ConfigError, LongcatConfig
from ..training.config import TrainConfig

# group -> (init variance factor, learning-rate factor) as powers of s: factor = s ** exponent
TABLE_1: dict[str, tuple[int, int]] = {
    "embedding": (0, 0),
    "hidden": (-1, -1),
    "router": (-1, -1),
    "unembedding": (-1, -1),
    "no_decay": (0, 0),
}

# widths that scale with hidden_size (the fan-in of some hidden matrix), and what must not change
WIDTHS = ("hidden_size", "ffn_hidden_size", "expert_ffn_hidden_size", "q_lora_rank", "kv_lora_rank",
          "num_attention_heads")  # fmt: skip
SAME_SHAPE = ("num_layers", "n_routed_experts", "zero_expert_num", "moe_topk", "num_nextn_predict_layers")


def transfer_factors(s: float) -> dict[str, tuple[float, float]]:
    """Table 1 for width ratio s: group -> (init variance multiplier, learning-rate multiplier)."""
    if not (math.isfinite(s) and s > 0):
        raise ConfigError(f"the width ratio must be a positive number, got {s}")
    return {group: (s**var, s**lr) for group, (var, lr) in TABLE_1.items()}


def transfer(init_std: dict[str, float], lr: dict[str, float], s: float) -> tuple[dict[str, float], dict[str, float]]:
    """The proxy's resolved per-group init std and peak LR -> the target's (std scales as the square
    root of the variance factor)."""
    factors = transfer_factors(s)
    target_std = {group: std * math.sqrt(factors[group][0]) for group, std in init_std.items()}
    target_lr = {group: value * factors[group][1] for group, value in lr.items()}
    return target_std, target_lr


def widen(model: dict[str, Any], width: int) -> tuple[dict[str, Any], float]:
    """A proxy's model config (HF field names) -> the overrides of the same model at hidden size
    `width`, and s. Every width in WIDTHS is multiplied by s and rounded (at least 1)."""
    proxy = int(model["hidden_size"])
    if width <= 0:
        raise ConfigError(f"--width must be positive, got {width}")
    s = width / proxy
    out = {}
    for key in WIDTHS:
        if key in model and model[key] is not None:
            out[key] = width if key == "hidden_size" else max(1, round(model[key] * s))
    return out, s


def check_same_shape(proxy: dict[str, Any], target: dict[str, Any], proxy_batch: int, target_batch: int) -> None:
    """Table 1 holds depth, sparsity and batch size fixed: a target that changes one is refused."""
    for key in SAME_SHAPE:
        if key in proxy and proxy.get(key) != target.get(key):
            raise ConfigError(
                f"width transfer keeps {key} as the proxy's ({proxy.get(key)!r}); the target has {target.get(key)!r}. "
                "Transfer to the proxy's depth and sparsity, then change them in a run of their own"
            )
    if proxy_batch != target_batch:
        raise ConfigError(
            f"width transfer keeps batch_size as the proxy's ({proxy_batch}); the target has {target_batch}"
        )


def transferred_config(sweep_dir: Path, width: int | None, assignments: list[str]) -> TrainConfig:
    """The training config of the width-`width` model from a sweep's best proxy point: the proxy run's
    settings with widths scaled, per-group init stds and LRs transferred (Table 1), then the caller's
    `--set` assignments, which win over transferred values; `transfer` records what came from where.
    width None: taken from an assignment model.hidden_size=W."""
    from .sweep import best_point

    best = best_point(sweep_dir)
    run = Path(best["run_dir"])
    proxy = TrainConfig.from_file(run / "train_config.json")
    proxy_model = LongcatConfig.from_json_file(run / "model_config.json").to_dict()
    explicit = [item.partition("=")[0] for item in assignments]
    if width is None:
        given = [item.partition("=")[2] for item in assignments if item.startswith("model.hidden_size=")]
        if not given:
            raise ConfigError("width transfer needs the target width: --width W (or --set model.hidden_size=W)")
        width = int(given[-1])
    overrides, s = widen(proxy_model, width)
    init_std, lr_groups = transfer(proxy.init_std, proxy.lr_groups, s)
    target = dataclasses.replace(proxy, model={**proxy.model, **overrides}, init_std=init_std, lr_groups=lr_groups,
                                 lb_groups=None, transfer=None)  # fmt: skip
    target = target.with_overrides(assignments)
    if "lr" in explicit:  # an explicit lr sets every group's, except groups set one by one
        kept = {g: v for g, v in target.lr_groups.items() if f"lr_groups.{g}" in explicit}
        target = dataclasses.replace(target, lr_groups=kept)
    transferred = {f"model.{k}" for k in overrides} | {f"init_std.{g}" for g in init_std}
    transferred |= {f"lr_groups.{g}" for g in lr_groups}
    won = sorted(k for k in explicit if k in transferred or k in ("init_std", "lr"))
    check_same_shape(proxy_model, target.model_config().to_dict(), proxy.batch_size, target.batch_size)
    record = {
        "sweep": str(sweep_dir), "proxy_run": str(run), "proxy_point": best["point"],
        "proxy_val_loss": best["val_loss"], "proxy_width": proxy_model["hidden_size"], "width": width, "s": s,
        "rule": "paper Table 1 (Adam LR full align, standard parameterisation)", "explicit_overrides": won,
    }  # fmt: skip
    return dataclasses.replace(target, transfer=record)
