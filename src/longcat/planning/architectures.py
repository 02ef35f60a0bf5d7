"""What the cost model needs to know of a model: layer count, widths, attention kind, experts.

LongCat-Flash's comes from a LongcatConfig (a preset name, or a config.json); DeepSeek-V3 and
Qwen3-235B-A22B are data here (their published configs), so Table 7 of the paper can be recomputed.
Parameter counts are in elements; a model's precision is the planner's choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import PRESETS, ConfigError, LongcatConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    layers: int  # MoE layers (the per-layer times of Table 7 are multiplied by this)
    hidden: int
    vocab: int
    # attention: "mla" (absorbed at decode) or "gqa"
    attention: str
    heads: int
    attentions_per_layer: int = 1  # LongCat's ScMoE layer has 2
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    kv_heads: int = 0  # GQA
    head_dim: int = 0  # GQA
    # experts
    routed_experts: int = 0
    expert_inter: int = 0
    ffn_experts_per_token: float = 0.0  # FFN-expert slots a token is sent to (zero experts excluded)
    shared_experts: int = 0
    shared_inter: int = 0
    dense_ffns_per_layer: int = 0  # LongCat: 2 dense SwiGLU FFNs in every layer
    dense_inter: int = 0
    dense_layers: int = 0  # leading dense-FFN layers (DeepSeek-V3: 3), counted for memory only
    dense_layer_inter: int = 0
    mtp_layers: int = 0
    scmoe: bool = False  # the MoE reads the first attention's output: single-batch overlap applies

    # --- sizes ---
    def attention_params(self) -> int:
        """One attention block's weights (MLA: q_a, q_b, kv_a, kv_b, o; GQA: q, k, v, o)."""
        h = self.hidden
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            return (h * self.q_lora_rank + self.q_lora_rank * self.heads * qk
                    + h * (self.kv_lora_rank + self.qk_rope_head_dim)
                    + self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
                    + self.heads * self.v_head_dim * h)  # fmt: skip
        return h * self.heads * self.head_dim + 2 * h * self.kv_heads * self.head_dim + self.heads * self.head_dim * h

    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_inter

    def kv_values_per_token(self) -> int:
        """Cached values per token over all attention blocks (MLA: latent + rope key; GQA: K and V)."""
        per_block = (
            self.kv_lora_rank + self.qk_rope_head_dim if self.attention == "mla" else 2 * self.kv_heads * self.head_dim
        )
        return per_block * self.attentions_per_layer * (self.layers + self.dense_layers)

    def params(self) -> dict[str, int]:
        """Element counts: routed experts, everything else ("dense": attention, dense and shared FFNs,
        routers, embeddings, head), and the MTP module (not served weights unless speculating)."""
        h = self.hidden
        all_layers = self.layers + self.dense_layers
        attention = self.attention_params() * self.attentions_per_layer * all_layers
        dense = 3 * h * self.dense_inter * self.dense_ffns_per_layer * self.layers
        dense += 3 * h * self.dense_layer_inter * self.dense_layers
        shared = 3 * h * self.shared_inter * self.shared_experts * self.layers
        routers = h * self.routed_experts * self.layers  # zero experts' router columns are negligible
        embeddings = 2 * self.vocab * h
        experts = self.expert_params() * self.routed_experts * self.layers
        mtp = self.mtp_layers * (self.attention_params() + 3 * h * max(self.dense_inter, self.shared_inter) + 2 * h * h)
        return {"experts": experts, "dense": attention + dense + shared + routers + embeddings, "mtp": mtp}


def longcat(config: LongcatConfig, name: str = "LongCat-Flash") -> Architecture:
    return Architecture(
        name=name, layers=config.num_layers, hidden=config.hidden_size, vocab=config.vocab_size, attention="mla",
        heads=config.num_attention_heads, attentions_per_layer=2, q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        routed_experts=config.n_routed_experts, expert_inter=config.expert_ffn_hidden_size,
        ffn_experts_per_token=config.target_ffn_experts, dense_ffns_per_layer=2,
        dense_inter=config.ffn_hidden_size, mtp_layers=config.num_nextn_predict_layers, scmoe=True,
    )  # fmt: skip


# published configs (config.json of deepseek-ai/DeepSeek-V3 and Qwen/Qwen3-235B-A22B)
DEEPSEEK_V3 = Architecture(
    name="DeepSeek-V3", layers=58, dense_layers=3, dense_layer_inter=18432, hidden=7168, vocab=129280,
    attention="mla", heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, routed_experts=256, expert_inter=2048, ffn_experts_per_token=8, shared_experts=1,
    shared_inter=2048, mtp_layers=1,
)  # fmt: skip
QWEN3_235B = Architecture(
    name="Qwen3-235B-A22B", layers=94, hidden=4096, vocab=151936, attention="gqa", heads=64, kv_heads=4,
    head_dim=128, routed_experts=128, expert_inter=1536, ffn_experts_per_token=8,
)  # fmt: skip
BUILT_IN = {"deepseek-v3": DEEPSEEK_V3, "qwen3-235b-a22b": QWEN3_235B}


def table7_layers(arch: Architecture) -> int:
    """Table 7 multiplies its per-layer times by every layer (61 for DeepSeek-V3, dense ones too)."""
    return arch.layers + arch.dense_layers


def resolve(name: str) -> Architecture:
    """A built-in name, a LongCat preset, or a config.json (file or directory)."""
    key = name.lower()
    if key in BUILT_IN:
        return BUILT_IN[key]
    if key in PRESETS:
        return longcat(LongcatConfig.from_preset(key), "LongCat-Flash" if key == "longcat-flash" else key)
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("model_type") not in (None, "longcat_flash"):
            raise ConfigError(
                f"{path}: model_type {data.get('model_type')!r} is not LongCat's; built-in others: {sorted(BUILT_IN)}"
            )
        return longcat(LongcatConfig.from_json_file(path), path.parent.name or "LongCat")
    raise ConfigError(
        f"unknown model {name!r}: give a preset ({', '.join(sorted(PRESETS))}), a built-in "
        f"({', '.join(sorted(BUILT_IN))}) or a config.json"
    )
