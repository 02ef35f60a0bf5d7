"""The paper's decode cost model (§6, Table 7) for any architecture, hardware and deployment.

Per MoE layer, on each of the EP devices, with B sequences per device and T = B·(1 + d) query tokens
per decode step (d MTP drafts verified with each token):

- attention (one attention block): projections in and out (2·T·weights FLOPs at the bf16 peak, or
  their weight bytes over HBM, whichever is slower) plus the core (absorbed MLA: 2·T·heads·C·(2·R_kv +
  R_rope) FLOPs; GQA: 2·T·heads·C·2·head_dim) at the attention kernel's throughput, or the KV cache's
  bytes over HBM when that is slower (GQA at long context). C is the sequences' average context.
- dispatch / combine: every token's hidden vector to each of its FFN-expert slots (zero experts stay
  home: K_e slots, not K), T·K_e·hidden bytes at the dispatch precision (fp8) / combine precision
  (bf16), over the all-to-all bandwidth per device.
- MoE: the T·K_e rows each device receives (a balanced load) through its N/EP experts (plus shared
  experts for every token): FLOPs at the weights' precision peak, or weight bytes over HBM.
- dense FFNs (LongCat's two per layer): like the projections.

Layer time by overlap scheme:
- SBO (paper §6.1.1, ScMoE only): attention + max(dispatch, FFN_0 + attention's input projections)
  + MoE + max(combine, the rest of the second attention + FFN_1).
- TBO (two micro-batches, DeepSeek/SGLang style): the dense compute of one micro-batch overlaps the
  other's communication, the expert GEMM does not: max(attention + dense FFNs, dispatch + combine) + MoE.
  With Table 7's per-layer figures this gives 30.6 ms for DeepSeek-V3 (table: 30) and 26.2 ms for
  Qwen3-235B-A22B (table: 26.2).
- none: everything in sequence.

TPOT = layers · layer time / (1 + d·acceptance); each device serves B users, so it produces
B / TPOT tokens/s; dollars per million output tokens = price per GPU-hour / (3600 · that) · 1e6.
Memory per device: routed experts split over EP, the rest replicated on every device (Table 7's
"MLA in DP") or sharded over them, and the latent (or K/V) cache of B sequences at context C.
Activations and workspace are not modelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ConfigError
from .architectures import Architecture, table7_layers
from .hardware import Hardware

BYTES = {"fp8": 1, "bf16": 2}

# Table 7 of the paper (EP 128, batch 96 per device, MLA in DP, 660 TFLOP/s attention, 40 GB/s all-to-all,
# MTP 1 with 80% acceptance): per-layer microseconds, TPOT in ms, dollars per million output tokens
TABLE_7 = {
    "DeepSeek-V3": {"attention_us": 471, "dispatch_us": 275, "moe_us": 77, "combine_us": 551, "overlap": "tbo",
                    "tpot_ms": 30.0, "usd_per_million_tokens": 0.17},
    "Qwen3-235B-A22B": {"attention_us": 314, "dispatch_us": 157, "moe_us": 29, "combine_us": 315, "overlap": "tbo",
                        "tpot_ms": 26.2, "usd_per_million_tokens": 0.15},
    "LongCat-Flash": {"attention_us": 264, "dispatch_us": 236, "moe_us": 60, "combine_us": 472, "overlap": "sbo",
                      "tpot_ms": 16.0, "usd_per_million_tokens": 0.09},
}  # fmt: skip


@dataclass
class Deployment:
    ep: int = 128
    batch_per_device: int = 96
    seq_len: int = 5000  # average context of the decoded sequences (Table 6's LongCat rows)
    draft_tokens: int = 1  # MTP drafts verified per step (0: no speculation)
    mtp_accept: float = 0.8
    dense_placement: str = "replicated"  # or "sharded"
    overlap: str | None = None  # "sbo" | "tbo" | "none"; None: sbo for ScMoE models, else tbo
    price_per_gpu_hour: float = 2.0
    weight_precision: str = "fp8"
    attention_precision: str = "bf16"
    kv_precision: str = "bf16"
    dispatch_precision: str = "fp8"
    combine_precision: str = "bf16"
    attention_us: float | None = None  # measured per-layer times replace the model's estimates
    moe_us: float | None = None

    def check(self, arch: Architecture) -> Deployment:
        for name in ("ep", "batch_per_device", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.draft_tokens < 0 or not 0 <= self.mtp_accept <= 1:
            raise ConfigError("draft_tokens must be >= 0 and mtp_accept in [0, 1]")
        if self.ep > arch.routed_experts:
            raise ConfigError(f"ep {self.ep} exceeds {arch.name}'s {arch.routed_experts} experts a layer")
        if self.dense_placement not in ("replicated", "sharded"):
            raise ConfigError(f"dense_placement must be replicated or sharded, got {self.dense_placement!r}")
        for name in ("weight_precision", "attention_precision", "kv_precision", "dispatch_precision",
                     "combine_precision"):  # fmt: skip
            if getattr(self, name) not in BYTES:
                raise ConfigError(f"{name} must be one of {sorted(BYTES)}, got {getattr(self, name)!r}")
        if self.overlap == "sbo" and not arch.scmoe:
            raise ConfigError(
                f"sbo overlap needs a shortcut-connected MoE (its input ready after the first attention); {arch.name} "
                "has none: use tbo or none"
            )
        if self.overlap not in (None, "sbo", "tbo", "none"):
            raise ConfigError(f"overlap must be sbo, tbo or none, got {self.overlap!r}")
        return self


def _seconds(flops: float, tflops: float, nbytes: float, hbm_tbs: float) -> float:
    return max(flops / (tflops * 1e12), nbytes / (hbm_tbs * 1e12))


def attention_parts(arch: Architecture, hw: Hardware, d: Deployment) -> dict[str, float]:
    """Seconds for one attention block's input projections, core and output projection."""
    T, C, B = d.batch_per_device * (1 + d.draft_tokens), d.seq_len, d.batch_per_device
    h, wb, peak = (
        arch.hidden,
        BYTES[d.attention_precision],
        hw.bf16_tflops if d.attention_precision == "bf16" else hw.fp8_tflops,
    )
    if arch.attention == "mla":
        qk = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        latent = arch.kv_lora_rank + arch.qk_rope_head_dim
        absorbed_key = arch.heads * arch.qk_nope_head_dim * arch.kv_lora_rank  # W_uk folded into the query
        w_in = h * arch.q_lora_rank + arch.q_lora_rank * arch.heads * qk + h * latent + absorbed_key
        w_out = arch.heads * arch.v_head_dim * arch.kv_lora_rank + arch.heads * arch.v_head_dim * h
        core = 2 * T * arch.heads * C * (2 * arch.kv_lora_rank + arch.qk_rope_head_dim)
        cache = B * C * (arch.kv_lora_rank + arch.qk_rope_head_dim) * BYTES[d.kv_precision]
    else:
        w_in = h * arch.heads * arch.head_dim + 2 * h * arch.kv_heads * arch.head_dim
        w_out = arch.heads * arch.head_dim * h
        core = 2 * T * arch.heads * C * 2 * arch.head_dim
        cache = B * C * 2 * arch.kv_heads * arch.head_dim * BYTES[d.kv_precision]
    return {
        "in": _seconds(2 * T * w_in, peak, w_in * wb, hw.hbm_tbs),
        "core": _seconds(core, hw.attention_tflops, cache, hw.hbm_tbs),
        "out": _seconds(2 * T * w_out, peak, w_out * wb, hw.hbm_tbs),
    }


def plan(arch: Architecture, hw: Hardware, d: Deployment) -> dict:
    d.check(arch)
    T = d.batch_per_device * (1 + d.draft_tokens)
    wb = BYTES[d.weight_precision]
    peak = hw.fp8_tflops if d.weight_precision == "fp8" else hw.bf16_tflops
    slots = T * arch.ffn_experts_per_token
    a2a = hw.all_to_all_gbs * 1e9
    dispatch = slots * arch.hidden * BYTES[d.dispatch_precision] / a2a
    combine = slots * arch.hidden * BYTES[d.combine_precision] / a2a
    experts_here = arch.routed_experts / d.ep
    moe_flops = 2 * slots * arch.expert_params() + 2 * T * 3 * arch.hidden * arch.shared_inter * arch.shared_experts
    moe_bytes = (experts_here * arch.expert_params() + 3 * arch.hidden * arch.shared_inter * arch.shared_experts) * wb
    moe_model = _seconds(moe_flops, peak, moe_bytes, hw.hbm_tbs)
    parts = attention_parts(arch, hw, d)
    attention_model = sum(parts.values())
    ffn = 0.0
    if arch.dense_ffns_per_layer:
        w = 3 * arch.hidden * arch.dense_inter
        ffn = _seconds(2 * T * w, peak, w * wb, hw.hbm_tbs)
    attention = attention_model if d.attention_us is None else d.attention_us * 1e-6
    moe = moe_model if d.moe_us is None else d.moe_us * 1e-6
    share = {k: v / attention_model for k, v in parts.items()}  # a measured time splits like the estimate
    overlap = d.overlap or ("sbo" if arch.scmoe else "tbo")
    n_attn, n_ffn = arch.attentions_per_layer, arch.dense_ffns_per_layer
    if overlap == "sbo":
        layer = (attention + max(dispatch, ffn + share["in"] * attention) + moe
                 + max(combine, (share["core"] + share["out"]) * attention + ffn))  # fmt: skip
    elif overlap == "tbo":
        layer = max(n_attn * attention + n_ffn * ffn, dispatch + combine) + moe
    else:
        layer = n_attn * attention + n_ffn * ffn + dispatch + moe + combine
    layers = table7_layers(arch)
    tokens_per_step = 1 + d.draft_tokens * d.mtp_accept
    tpot = layers * layer / tokens_per_step
    per_gpu = d.batch_per_device / tpot
    memory = memory_per_device(arch, hw, d)
    result = {
        "model": arch.name, "hardware": hw.name, "overlap": overlap,
        "attention_us": attention * 1e6, "dispatch_us": dispatch * 1e6, "moe_us": moe * 1e6,
        "combine_us": combine * 1e6, "dense_ffn_us": ffn * 1e6, "dispatch_us_model": dispatch * 1e6,
        "combine_us_model": combine * 1e6,
        "attention_us_model": attention_model * 1e6, "moe_us_model": moe_model * 1e6,
        "attention_measured": d.attention_us is not None, "moe_measured": d.moe_us is not None,
        "layer_us": layer * 1e6, "layers": layers, "tokens_per_step": tokens_per_step,
        "tpot_ms": tpot * 1e3, "tokens_per_s_per_user": 1 / tpot, "tokens_per_s_per_gpu": per_gpu,
        "usd_per_million_tokens": d.price_per_gpu_hour / (3600 * per_gpu) * 1e6,
        **memory, "deployment": asdict(d),
    }  # fmt: skip
    if arch.name in TABLE_7 and table7_scenario(hw, d):
        result["paper_table_7"] = TABLE_7[arch.name]
    return result


def table7_scenario(hw: Hardware, d: Deployment) -> bool:
    """Whether a deployment is the one Table 7 assumes (its figures are then shown beside ours)."""
    return (d.ep, d.batch_per_device, d.draft_tokens, d.mtp_accept, d.price_per_gpu_hour) == (
        128,
        96,
        1,
        0.8,
        2.0,
    ) and (
        hw.attention_tflops,
        hw.all_to_all_gbs,
    ) == (660.0, 40.0)


def memory_per_device(arch: Architecture, hw: Hardware, d: Deployment) -> dict:
    params = arch.params()
    wb = BYTES[d.weight_precision]
    dense = params["dense"] + (params["mtp"] if d.draft_tokens else 0)
    dense_bytes = dense * wb / (1 if d.dense_placement == "replicated" else d.ep)
    expert_bytes = params["experts"] * wb / d.ep
    kv = d.batch_per_device * d.seq_len * arch.kv_values_per_token() * BYTES[d.kv_precision]
    total = dense_bytes + expert_bytes + kv
    capacity = hw.memory_gb * 1e9
    out = {
        "memory_per_device_bytes": int(total), "memory_weights_bytes": int(dense_bytes + expert_bytes),
        "memory_kv_cache_bytes": int(kv), "memory_capacity_bytes": int(capacity), "fits": total <= capacity,
    }  # fmt: skip
    if total > capacity:
        out["does_not_fit"] = (
            f"{total / 1e9:.1f} GB per device ({(dense_bytes + expert_bytes) / 1e9:.1f} GB of weights with the dense "
            f"part {d.dense_placement}, {kv / 1e9:.1f} GB of KV cache) exceeds the {hw.name}'s {hw.memory_gb:g} GB"
        )
    return out


def report(result: dict) -> str:
    """A readable table: the model's estimates, the values used (a measured time given replaces the
    estimate), and the paper's Table 7 where the deployment is its scenario."""
    paper = result.get("paper_table_7") or {}
    d = result["deployment"]
    lines = [
        f"{result['model']} on {result['hardware']}: EP {d['ep']}, {d['batch_per_device']} sequences a device at "
        f"{d['seq_len']} tokens of context, {d['draft_tokens']} MTP draft(s) at {d['mtp_accept']:.0%} acceptance, "
        f"{d['weight_precision']} weights, overlap {result['overlap']}",
        f"{'per layer (us)':16} {'estimate':>9} {'used':>9} {'paper':>9}",
    ]
    for key, label in (("attention_us", "attention"), ("dispatch_us", "dispatch"), ("moe_us", "MoE"),
                       ("combine_us", "combine"), ("dense_ffn_us", "dense FFN")):  # fmt: skip
        estimate = result.get(key.replace("_us", "_us_model"), result[key])
        lines.append(f"{label:16} {estimate:>9.0f} {result[key]:>9.0f} {_cell(paper.get(key)):>9}")
    lines.append(f"{'layer':16} {'':>9} {result['layer_us']:>9.0f}")
    lines.append(f"{'TPOT (ms)':16} {'':>9} {result['tpot_ms']:>9.1f} {_cell(paper.get('tpot_ms')):>9}")
    usd = paper.get("usd_per_million_tokens")
    lines.append(f"{'$ / 1M tokens':16} {'':>9} {result['usd_per_million_tokens']:>9.3f} {_cell(usd):>9}")
    lines.append(
        f"tokens/s: {result['tokens_per_s_per_user']:.1f} per user, {result['tokens_per_s_per_gpu']:.0f} per GPU "
        f"(at ${d['price_per_gpu_hour']:g} per GPU-hour)"
    )
    gb = 1e9
    lines.append(
        f"memory per device: {result['memory_per_device_bytes'] / gb:.1f} GB (weights "
        f"{result['memory_weights_bytes'] / gb:.1f}, KV cache {result['memory_kv_cache_bytes'] / gb:.1f}) of "
        f"{result['memory_capacity_bytes'] / gb:.0f} GB: {'fits' if result['fits'] else 'does NOT fit'}"
    )
    if not result["fits"]:
        lines.append(result["does_not_fit"])
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "" if value is None else f"{value:g}"
