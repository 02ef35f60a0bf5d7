"""`longcat info`: a model's parameters, active parameters, KV cache and FLOPs per token."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import PRESETS, ConfigError, LongcatConfig


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


def run(args: argparse.Namespace) -> int:
    from ..accounting import model_report

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


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's subparsers action
    info = sub.add_parser("info", help="parameters, active parameters, KV cache and FLOPs per token")
    info.add_argument("target", help=f"a preset ({', '.join(sorted(PRESETS))}) or a checkpoint directory")
    info.add_argument("--json", action="store_true", help="print a JSON object")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.add_argument("--ffn-experts", type=float, default=None, help="K_e (default: K * N / (N + Z))")
    info.set_defaults(func=run)
