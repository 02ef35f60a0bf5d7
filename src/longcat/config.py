"""LongcatConfig: the model configuration, with the Hugging Face `longcat_flash` field names.

`config.json` written by transformers 4.57 (`rope_theta`, `rope_scaling`) and by 5.x
(`rope_parameters`) both load; what we write loads in both, and transformers 5.x's generic names
(`num_experts_per_tok`, ...) are read. Fields that neither we nor transformers model are kept in
`extra` and written back unchanged, except the keys that describe the files the config came with
(`auto_map`, `quantization_config`, ...): what we write has no remote code and no quantised weights.
`num_layers` (ScMoE blocks) is authoritative: `num_hidden_layers` means 2 x `num_layers` in
transformers and `num_layers` in Meituan's remote code, so it is never trusted on read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration field is missing, malformed or inconsistent; the message names it and the fix."""


# Keys that transformers writes and that we derive or ignore on read (never kept in `extra`).
_DERIVED_KEYS = {
    "num_hidden_layers",  # 2 x num_layers (transformers) or num_layers (remote code): derived
    "qk_head_dim",  # qk_nope_head_dim + qk_rope_head_dim
    "rope_parameters",  # folded into rope_theta / rope_scaling
    "model_type",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
}
# keys that describe the files a config came with, not the model: our saves write unquantised weights
# and no remote code, so these are not carried over (auto_map would point at .py files not there)
_FILE_KEYS = {"auto_map", "quantization_config", "quant_config", "disable_quant_module"}
# transformers 5.x's attribute_map: generic names it accepts for these fields
_ATTRIBUTE_MAP = {
    "num_local_experts": "n_routed_experts",
    "num_experts_per_tok": "moe_topk",
    "intermediate_size": "ffn_hidden_size",
    "moe_intermediate_size": "expert_ffn_hidden_size",
}
_ZERO_EXPERT_TYPES = ("identity", "drop")


NO_SHORTCUT_MODEL_TYPE = "longcat_no_shortcut"


@dataclass
class LongcatConfig:
    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28
    num_attention_heads: int = 64
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_theta: float = 10000000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # dense FFN (two per layer) and MLA sizes
    ffn_hidden_size: int = 12288
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    head_dim: int | None = None  # transformers uses it as the rotary dim: must equal qk_rope_head_dim
    v_head_dim: int = 128
    # ScMoE (paper §2.2): the MoE reads the first attention's output. False: it reads the second attention's,
    # as FFN_1 does (the same parameters and FLOPs, no shortcut) -- a study baseline, saved under another
    # model_type (NO_SHORTCUT_MODEL_TYPE) so that no LongCat-Flash loader runs it as ScMoE
    moe_shortcut: bool = True
    mla_scale_q_lora: bool = True  # paper Eq. 7: alpha_q = sqrt(hidden / q_lora_rank)
    mla_scale_kv_lora: bool = True  # alpha_kv = sqrt(hidden / kv_lora_rank)
    # MoE with zero-computation experts (paper §2.1)
    moe_topk: int = 12
    n_routed_experts: int = 512
    zero_expert_num: int = 256
    zero_expert_type: str = "identity"
    expert_ffn_hidden_size: int = 2048
    routed_scaling_factor: float = 6.0
    router_bias: bool = False
    norm_topk_prob: bool = False
    num_nextn_predict_layers: int = 1
    torch_dtype: str | None = None  # the dtype the weights were saved in, if known
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.qk_rope_head_dim
        if self.zero_expert_num is None:
            self.zero_expert_num = 0
        if self.zero_expert_type is None:
            self.zero_expert_type = "identity"  # the remote code's null default; transformers treats them so

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        """Attention sublayers (two per ScMoE layer): the number of KV-cache slots."""
        return 2 * self.num_layers

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_total(self) -> int:
        return self.n_routed_experts + self.zero_expert_num

    @property
    def target_ffn_experts(self) -> float:
        """Default K_e: the share of top-k slots a uniform router gives FFN experts (K * N / (N + Z))."""
        return self.moe_topk * self.n_routed_experts / self.num_experts_total

    @property
    def q_lora_scale(self) -> float:
        return math.sqrt(self.hidden_size / self.q_lora_rank) if self.mla_scale_q_lora else 1.0

    @property
    def kv_lora_scale(self) -> float:
        return math.sqrt(self.hidden_size / self.kv_lora_rank) if self.mla_scale_kv_lora else 1.0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ----- validation ----------------------------------------------------------------------
    def validate(self) -> LongcatConfig:
        """Raise ConfigError naming the first inconsistent field and how to fix it; return self."""
        positive = [
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings",
            "ffn_hidden_size", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
            "moe_topk", "expert_ffn_hidden_size",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("qk_nope_head_dim", "n_routed_experts", "zero_expert_num", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if self.n_routed_experts == 0:
            raise ConfigError("n_routed_experts must be at least 1: a LongCat layer always has FFN experts")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.head_dim != self.qk_rope_head_dim:
            raise ConfigError(
                f"head_dim ({self.head_dim}) must equal qk_rope_head_dim ({self.qk_rope_head_dim}): "
                "transformers uses head_dim as the rotary dimension; set head_dim to qk_rope_head_dim"
            )
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}): MLA shares one latent across all heads; drop the field"
            )
        if self.moe_topk > self.num_experts_total:
            raise ConfigError(
                f"moe_topk ({self.moe_topk}) exceeds n_routed_experts + zero_expert_num "
                f"({self.num_experts_total}); lower moe_topk or add experts"
            )
        if self.zero_expert_type not in _ZERO_EXPERT_TYPES:
            raise ConfigError(f"zero_expert_type must be one of {_ZERO_EXPERT_TYPES}, got {self.zero_expert_type!r}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act must be 'silu' (SwiGLU everywhere), got {self.hidden_act!r}")
        if not (self.routed_scaling_factor > 0 and math.isfinite(self.routed_scaling_factor)):
            raise ConfigError(f"routed_scaling_factor must be a positive number, got {self.routed_scaling_factor}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind != "default":
                raise ConfigError(
                    f"rope_scaling type {kind!r} is not supported: LongCat-Flash uses plain RoPE "
                    "(rope_type 'default'); remove rope_scaling or set rope_type to 'default'"
                )
        if self.num_nextn_predict_layers > 1:
            raise ConfigError(
                f"num_nextn_predict_layers={self.num_nextn_predict_layers}: only 0 or 1 MTP module "
                "is supported (LongCat-Flash has one)"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        for name in ("pad_token_id", "bos_token_id", *(["eos_token_id"] if self.eos_token_ids else [])):
            ids = self.eos_token_ids if name == "eos_token_id" else [getattr(self, name)]
            for token in ids:
                if token is not None and not 0 <= token < self.vocab_size:
                    raise ConfigError(f"{name}={token} is outside the vocabulary [0, {self.vocab_size})")
        return self

    # ----- JSON round trip -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LongcatConfig:
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in (None, "longcat_flash", NO_SHORTCUT_MODEL_TYPE):
            raise ConfigError(f"model_type is {model_type!r}, expected 'longcat_flash'")
        if model_type == NO_SHORTCUT_MODEL_TYPE:
            data["moe_shortcut"] = False
        elif data.get("moe_shortcut") is False:
            raise ConfigError(
                f"moe_shortcut is false but model_type is {model_type!r}: a model without the shortcut is saved as "
                f"model_type {NO_SHORTCUT_MODEL_TYPE!r}; fix the config"
            )
        if "num_layers" not in data and "num_hidden_layers" in data:
            raise ConfigError(
                "config has num_hidden_layers but no num_layers; num_hidden_layers is ambiguous "
                "(2 x num_layers in transformers, num_layers in the remote code): add num_layers"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        rope_parameters = data.get("rope_parameters")
        for alias, name in _ATTRIBUTE_MAP.items():  # transformers 5.x's generic names for our fields
            if alias in data and name in data and data[alias] != data[name]:
                raise ConfigError(
                    f"config has {alias} = {data[alias]!r} and {name} = {data[name]!r}, which transformers treats "
                    f"as one field; keep {name} only"
                )
        for key, value in data.items():
            if key in _ATTRIBUTE_MAP:
                kwargs[_ATTRIBUTE_MAP[key]] = value
            elif key in known:
                kwargs[key] = value
            elif key not in _DERIVED_KEYS and key not in _FILE_KEYS:
                extra[key] = value
        if kwargs.get("torch_dtype") is None:
            kwargs["torch_dtype"] = data.get("dtype") or data.get("torch_dtype")
        if isinstance(rope_parameters, dict):
            rope_parameters = dict(rope_parameters)
            if "rope_theta" in rope_parameters:
                kwargs["rope_theta"] = rope_parameters.pop("rope_theta")
            if rope_parameters.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = rope_parameters
        qk_head_dim = data.get("qk_head_dim")
        config = cls(**kwargs, extra=extra)
        if qk_head_dim is not None and qk_head_dim != config.qk_head_dim:
            raise ConfigError(
                f"qk_head_dim ({qk_head_dim}) must equal qk_nope_head_dim + qk_rope_head_dim "
                f"({config.qk_head_dim}); remove qk_head_dim or fix the head dims"
            )
        return config.validate()

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` content: loads in transformers 4.57 (rope_theta) and 5.x (rope_parameters)."""
        out: dict[str, Any] = {"architectures": ["LongcatFlashForCausalLM"], "model_type": "longcat_flash"}
        if not self.moe_shortcut:  # transformers (and any ScMoE loader) must refuse it, not run it as ScMoE
            out = {"architectures": ["LongcatNoShortcutForCausalLM"], "model_type": NO_SHORTCUT_MODEL_TYPE}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "torch_dtype") or (f.name == "moe_shortcut" and self.moe_shortcut):
                continue
            out[f.name] = getattr(self, f.name)
        out["qk_head_dim"] = self.qk_head_dim
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.torch_dtype is not None:
            out["torch_dtype"] = self.torch_dtype
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> LongcatConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); restore the file") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except TypeError as err:  # a field of the wrong kind reached the dataclass
            raise ConfigError(f"{path}: {err}") from err

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")

    # ----- presets -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LongcatConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = PRESETS[name]()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)} in overrides for preset {name!r}")
        values.update(overrides)
        return cls(**values).validate()

    def replace(self, **changes: Any) -> LongcatConfig:
        return dataclasses.replace(self, **changes).validate()


def _longcat_flash() -> dict[str, Any]:
    """The released LongCat-Flash-Chat configuration (560B total, 18.6B-31.3B active)."""
    return {}


def _tiny() -> dict[str, Any]:
    """Trains usefully in minutes on 2 CPU cores; keeps every feature (zero experts, ScMoE, MLA, MTP).

    Dense width / expert width = 6, as in the release, so routed_scaling_factor = 6 plays the same
    variance-compensation role (paper Eq. 8, gamma = m)."""
    return dict(
        vocab_size=4096, hidden_size=128, num_layers=2, num_attention_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        ffn_hidden_size=384, expert_ffn_hidden_size=64, n_routed_experts=16, zero_expert_num=8,
        moe_topk=6, routed_scaling_factor=6.0, max_position_embeddings=2048, rope_theta=10000.0,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def _small() -> dict[str, Any]:
    """Fine-grained research size: 64 FFN + 32 zero experts, top-12, expert width 64."""
    return dict(
        vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=8,
        q_lora_rank=192, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        ffn_hidden_size=384, expert_ffn_hidden_size=64, n_routed_experts=64, zero_expert_num=32,
        moe_topk=12, routed_scaling_factor=6.0, max_position_embeddings=4096, rope_theta=10000.0,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


PRESETS = {"longcat-flash": _longcat_flash, "tiny": _tiny, "small": _small}
