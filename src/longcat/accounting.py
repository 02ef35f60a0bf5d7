"""Parameter, KV-cache and FLOP accounting from a config (what `longcat info` prints).

Conventions, chosen to reproduce the paper's figures (paper.md §1.7): totals exclude the MTP module
(reported apart); active parameters per token exclude the input embedding (a lookup, no compute) and
include the LM head, every non-expert weight of the layers (attention, dense FFNs, router, norms)
and j FFN experts per layer, for j = 0, K_e and K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import LongcatConfig


@dataclass
class ModelReport:
    total_params: int
    mtp_params: int
    active_params_min: int
    active_params_avg: int
    active_params_max: int
    ffn_experts_avg: float
    kv_cache_bytes_per_token: int
    flops_per_token: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def model_report(config: LongcatConfig, seq_len: int = 4096, ffn_experts_avg: float | None = None) -> ModelReport:
    """Counts come from the model built on the meta device (no memory), so they match the code."""
    from .model.lm import LongcatForCausalLM

    model = LongcatForCausalLM(config, device="meta")
    unique = {id(p): p for p in model.parameters()}  # tied weights count once
    total_all = sum(p.numel() for p in unique.values())
    mtp = model.model.mtp
    mtp_params = sum(p.numel() for p in mtp.parameters()) if mtp is not None else 0
    total = total_all - mtp_params
    embed = model.model.embed_tokens.weight.numel()
    per_expert = 3 * config.hidden_size * config.expert_ffn_hidden_size
    experts = per_expert * config.n_routed_experts * config.num_layers
    # the LM head counts as active even when tied to the embedding
    non_expert_active = total - embed - experts + (embed if config.tie_word_embeddings else 0)
    k_e = config.target_ffn_experts if ffn_experts_avg is None else ffn_experts_avg

    def active(j: float) -> int:
        return round(non_expert_active + j * per_expert * config.num_layers)

    # forward FLOPs: 2 per active weight, plus scores and weighted values over the causal average
    # context (seq_len / 2) in each of the 2 * num_layers attention sublayers
    heads = config.num_attention_heads
    attention = 2 * config.num_hidden_layers * heads * (config.qk_head_dim + config.v_head_dim) * (seq_len / 2)
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    return ModelReport(
        total_params=total,
        mtp_params=mtp_params,
        active_params_min=active(0),
        active_params_avg=active(k_e),
        active_params_max=active(config.moe_topk),
        ffn_experts_avg=k_e,
        kv_cache_bytes_per_token=config.num_hidden_layers * latent * 2,  # bf16
        flops_per_token=round(2 * active(k_e) + attention),
        seq_len=seq_len,
    )
