"""TrainConfig: everything a run needs besides the model config (which is a preset plus overrides)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, LongcatConfig

# parameter groups (training/optim.py assigns every parameter one): an init std for each matrix group,
# a peak LR for each group, no_decay being the norm gains and biases (vectors, initialised to 1 / 0)
INIT_GROUPS = ("embedding", "hidden", "unembedding", "router")
LR_GROUPS = ("embedding", "hidden", "unembedding", "router", "no_decay")


def _checked(name: str, value: Any) -> Any:
    """`value` as the type of TrainConfig's field `name` (an int where a float is wanted becomes a
    float); anything else is refused naming the field, its type and the value."""
    hint = typing.get_type_hints(TrainConfig)[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool, dict) and isinstance(value, origin):
            return value
    names = " or ".join(_TYPE_NAMES.get(typing.get_origin(k) or k, str(k)) for k in allowed)
    raise ConfigError(f"{name} must be {names}, got {value!r}")


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "an object",
               type(None): "null"}  # fmt: skip


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # LongcatConfig overrides
    expert_gamma: float = 1.0  # fine-grained expert variance compensation at init (paper Eq. 8)
    # data
    data_dir: str | None = None  # None: the embedded corpus, prepared on first use
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    doc_masking: bool = True  # packed documents do not attend to each other
    # optimisation
    max_steps: int = 600
    lr: float = 3e-3
    # per parameter group (INIT_GROUPS / LR_GROUPS): init std and peak LR; a missing group takes the
    # model's initializer_range / `lr`. A run writes the resolved values of every group into
    # train_config.json (width transfer, scaling/transfer.py, sets them per group).
    init_std: dict[str, float] = field(default_factory=dict)
    lr_groups: dict[str, float] = field(default_factory=dict)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    decay_fraction: float = 0.2  # WSD: the share of steps spent decaying
    decay_steps: int | None = None  # WSD: the decay's length in steps; None: decay_fraction of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-16  # paper §3.1.3: far below the gradient RMS
    grad_clip: float = 1.0
    # expert-bias budget controller (paper Eq. 2)
    target_ffn_experts: float | None = None  # K_e; None: the uniform share K * N / (N + Z)
    bias_update_rate: float = 0.3  # mu (probabilities are ~1/E, so the per-step share errors are small)
    bias_rate_final_ratio: float = 0.2  # mu decays linearly to this share of itself (paper: decay helps)
    bias_balance_rate: float | None = 0.05  # rate of Eq. 2's load-evening part; None: mu (Eq. 2 as written)
    bias_budget_final_ratio: float | None = 1.0  # split rates: the budget part's decay (None: as the balance part)
    bias_decay_steps: int | None = None  # steps over which the rates decay; None: max_steps
    # losses
    lb_alpha: float = 0.001  # device-level balance loss with the zero-expert group (Eqs. 3-5)
    # D: groups of FFN experts, one per expert-parallel device; None: the run's EP size (1 on one process),
    # resolved when the run starts and stored in train_config.json, so a resume keeps it
    lb_groups: int | None = None
    z_loss_weight: float = 1e-6  # hidden z-loss (Eq. 10)
    mtp_weight: float = 0.3
    mtp_start_step: int | None = None  # None: a quarter into the run (the paper adds MTP late)
    # MTP self-distillation: KL(main model's prediction of token i+2 || the MTP's), weight below. Not in
    # the paper (its MTP learns from the data alone); it trains the draft to agree with the model it
    # drafts for, which is what speculative acceptance measures (figures: docs/benchmarks.md, "MTP
    # acceptance"). 0 turns it off.
    mtp_distill_weight: float = 1.0
    # scale-out (longcat train --nproc N --ep E)
    moe_overlap: bool = True  # ScMoE: the expert-parallel all-to-alls run while the dense path computes
    # per decoder layer, as torchtitan (training/wrapping.py): recompute activations in backward; compile
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" compiles fast, for tests)
    # bookkeeping
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    max_nonfinite: int = 3  # consecutive non-finite steps before the run stops
    device: str = "auto"
    dtype: str = "float32"  # "bfloat16": autocast on CUDA
    # final/ in the layout transformers 5.0-5.24 alone read (checkpoint.save_pretrained); False: the released one
    export_zero_expert_stubs: bool = False
    transfer: dict[str, Any] | None = None  # set by width transfer: where the values came from (a record)

    def model_config(self, vocab_size: int | None = None, special: dict[str, int] | None = None) -> LongcatConfig:
        overrides = dict(self.model)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        for key, value in (special or {}).items():
            overrides.setdefault(key, value)
        overrides.setdefault("max_position_embeddings", max(self.seq_len, 1))
        return LongcatConfig.from_preset(self.preset, **overrides)

    @property
    def mtp_start(self) -> int:
        return self.max_steps // 4 if self.mtp_start_step is None else self.mtp_start_step

    @property
    def wsd_decay_steps(self) -> int:
        return round(self.max_steps * self.decay_fraction) if self.decay_steps is None else self.decay_steps

    @property
    def bias_decay_horizon(self) -> int:
        return self.max_steps if self.bias_decay_steps is None else self.bias_decay_steps

    def resolved_groups(self, initializer_range: float) -> TrainConfig:
        """This config with every group's init std and peak LR written out."""
        init_std = {group: self.init_std.get(group, initializer_range) for group in INIT_GROUPS}
        lr_groups = {group: self.lr_groups.get(group, self.lr) for group in LR_GROUPS}
        return dataclasses.replace(self, init_std=init_std, lr_groups=lr_groups)

    def validate(self) -> TrainConfig:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.schedule not in ("wsd", "cosine"):
            raise ConfigError(f"schedule must be 'wsd' or 'cosine', got {self.schedule!r}")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("decay_fraction and min_lr_ratio must lie in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.lb_groups is not None and self.lb_groups <= 0:
            raise ConfigError(f"lb_groups must be positive, got {self.lb_groups}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        for name, groups in (("init_std", INIT_GROUPS), ("lr_groups", LR_GROUPS)):
            for group, value in getattr(self, name).items():
                if group not in groups:
                    raise ConfigError(f"{name}.{group}: unknown parameter group; the groups are {', '.join(groups)}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == math.inf:
                    raise ConfigError(f"{name}.{group} must be a positive number, got {value!r}")
        for name in ("decay_steps", "bias_decay_steps", "mtp_start_step"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training field(s) {unknown}; known: {sorted(known)}")
        return cls(**{key: _checked(key, value) for key, value in data.items()}).validate()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read training config {path}: {err}") from err
        return cls.from_dict(data)

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """Apply KEY=VALUE strings; VALUE is JSON (bare words are strings); `model.KEY` sets a model field."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            head, dot, group = key.partition(".")
            if dot and head in ("model", "init_std", "lr_groups"):
                data[head] = {**data[head], group: value}
            elif key == "init_std" and isinstance(value, (int, float)) and not isinstance(value, bool):
                data["init_std"] = {group: value for group in INIT_GROUPS}  # one std for every group
            elif key in data:
                try:
                    data[key] = _checked(key, value)
                except ConfigError as err:
                    raise ConfigError(f"--set {item}: {err}") from None
            else:
                raise ConfigError(f"--set {key}: unknown field; training fields are {sorted(data)}, or use model.FIELD")
        return TrainConfig.from_dict(data)
