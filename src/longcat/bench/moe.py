"""`longcat bench moe`: our MoE layer against transformers' LongcatFlashMoE holding the same weights,
and against a dense SwiGLU doing the same active FLOPs; then the whole model against transformers'.

The dense width is chosen from the routing actually measured on the benchmark input: the average
number of FFN experts per token times the expert width, plus the router's matmul expressed as
SwiGLU width (E / 3, since a SwiGLU of width W costs 3 H W multiply-adds per token and the router
H E).
"""

from __future__ import annotations

import torch

from ..config import LongcatConfig
from ..model.cpu_kernels import fused_experts_apply, fused_kernels_enabled
from ..model.ffn import SwiGLU
from ..model.lm import LongcatForCausalLM
from .common import machine, time_interleaved, transformers_twin, transformers_version


def run(
    preset: str = "small",
    batches: tuple[int, ...] = (2, 4, 8),
    seq_len: int = 256,
    rounds: int = 10,
    model_batch: int = 4,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    overrides: dict | None = None,
) -> dict:
    """The MoE layer at each batch size (sequences of seq_len tokens), then the whole model once.
    dtype is the weights' (bf16 weights: the layer as a bf16 model runs it); overrides: model fields."""
    config = LongcatConfig.from_preset(preset, **(overrides or {}))
    model = LongcatForCausalLM(config, seed=seed, device=device, dtype=dtype).train()
    twin = transformers_twin(model) if transformers_version() is not None else None
    result: dict = {
        "preset": preset,
        "overrides": overrides or {},
        "seq_len": seq_len,
        "transformers": transformers_version(),
        "machine": machine(),
        "layer": [_layer(model, twin, batch, seq_len, rounds, seed) for batch in batches],
    }
    if twin is not None:
        result.update(_whole_model(model, twin, model_batch, seq_len, max(3, rounds // 2), seed))
    return result


def _layer(model, twin, batch: int, seq_len: int, rounds: int, seed: int) -> dict:
    config = model.config
    device, dtype = model.device, model.dtype
    torch.manual_seed(seed)
    ours = model.model.layers[0].mlp
    H = config.hidden_size
    x = torch.randn(batch * seq_len, H, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    x_req = x.clone().requires_grad_()

    with torch.no_grad():
        routing = ours.router(x)
    ffn_per_token = (routing.indices < config.n_routed_experts).sum().item() / x.shape[0]
    dense_width = round(ffn_per_token * config.expert_ffn_hidden_size + config.num_experts_total / 3)
    dense = SwiGLU(H, dense_width).to(device=device, dtype=dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=config.initializer_range)

    def fwd(module):
        def call():
            with torch.no_grad():
                module(x)

        return call

    def fwd_bwd(module):
        params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []

        def call():  # as in a training step: gradients start unset (zero_grad(set_to_none=True))
            x_req.grad = None
            for p in params:
                p.grad = None
            module(x_req).backward(grad)

        return call

    fns = {
        "ours_fwd": fwd(ours),
        "dense_fwd": fwd(dense),
        "ours_fwd_bwd": fwd_bwd(ours),
        "dense_fwd_bwd": fwd_bwd(dense),
    }
    fused = fused_experts_apply(x, ours.experts.gate_up_proj, ours.experts.down_proj)
    if fused:  # the grouped path too, for the kernel's own gain
        fns["ours_grouped_fwd_bwd"] = _without_fused_kernel(fwd_bwd(ours))
    result: dict = {
        "tokens": x.shape[0],
        "ffn_experts_per_token": ffn_per_token,
        "dense_width": dense_width,
        "experts_path": ours.experts.path(x.shape[0], config.moe_topk, device, dtype),
    }
    if twin is not None:
        theirs = twin.model.layers[0].mlp
        with torch.no_grad():
            result["max_abs_diff_vs_transformers"] = (
                (ours(x) - theirs(x.view(batch, seq_len, H)).view_as(x)).abs().max().item()
            )
        fns["transformers_fwd"] = fwd(lambda t: theirs(t.view(batch, seq_len, H)).view_as(t))
        fns["transformers_fwd_bwd"] = fwd_bwd(_Reshaped(theirs, batch, seq_len))
    times = time_interleaved(fns, rounds)
    result["ms"] = {name: 1000 * seconds for name, seconds in times.items()}
    result["fwd_bwd_vs_dense"] = times["dense_fwd_bwd"] / times["ours_fwd_bwd"]
    result["fwd_vs_dense"] = times["dense_fwd"] / times["ours_fwd"]
    if fused:
        result["fused_kernel_speedup_fwd_bwd"] = times["ours_grouped_fwd_bwd"] / times["ours_fwd_bwd"]
    if twin is not None:
        result["speedup_fwd_vs_transformers"] = times["transformers_fwd"] / times["ours_fwd"]
        result["speedup_fwd_bwd_vs_transformers"] = times["transformers_fwd_bwd"] / times["ours_fwd_bwd"]
    return result


def _without_fused_kernel(call):
    def wrapped():
        with fused_kernels_enabled(False):
            call()

    return wrapped


class _Reshaped(torch.nn.Module):
    """transformers' MoE takes [B, S, H]; the benchmark feeds [B * S, H]."""

    def __init__(self, moe: torch.nn.Module, batch: int, seq_len: int) -> None:
        super().__init__()
        self.moe, self.shape = moe, (batch, seq_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x.view(*self.shape, x.shape[-1])).view_as(x)


def _whole_model(model, twin, batch: int, seq_len: int, rounds: int, seed: int) -> dict:
    """Forward + backward of the whole model (LM loss) on the same weights and tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(model.device)

    def step(m):
        def call():
            m.zero_grad(set_to_none=True)
            m(ids, labels=ids).loss.backward()

        return call

    times = time_interleaved({"ours": step(model), "transformers": step(twin)}, rounds, warmup=1)
    return {
        "model_tokens": batch * seq_len,
        "model_fwd_bwd_ms": {name: 1000 * t for name, t in times.items()},
        "speedup_model_fwd_bwd_vs_transformers": times["transformers"] / times["ours"],
    }


def report(result: dict) -> str:
    has_twin = result["transformers"] is not None
    lines = [
        f"MoE layer, preset {result['preset']} (median ms; dense = SwiGLU with the same active FLOPs; "
        f"experts: {result['layer'][0]['experts_path']})",
        f"  {'tokens':>6} {'FFN/tok':>7} | {'longcat':>15} | {'dense':>15} | "
        + (f"{'transformers':>15} | " if has_twin else "")
        + f"{'vs dense':>11} | "
        + (f"{'vs transformers':>15}" if has_twin else ""),
        f"  {'':>6} {'':>7} | {'fwd':>7} {'f+b':>7} | {'fwd':>7} {'f+b':>7} | "
        + (f"{'fwd':>7} {'f+b':>7} | " if has_twin else "")
        + f"{'fwd':>5} {'f+b':>5} | "
        + (f"{'fwd':>7} {'f+b':>7}" if has_twin else ""),
    ]
    for row in result["layer"]:
        ms = row["ms"]
        line = (
            f"  {row['tokens']:>6} {row['ffn_experts_per_token']:>7.2f} | "
            f"{ms['ours_fwd']:>7.1f} {ms['ours_fwd_bwd']:>7.1f} | "
            f"{ms['dense_fwd']:>7.1f} {ms['dense_fwd_bwd']:>7.1f} | "
        )
        if has_twin:
            line += f"{ms['transformers_fwd']:>7.1f} {ms['transformers_fwd_bwd']:>7.1f} | "
        line += f"{row['fwd_vs_dense']:>5.2f} {row['fwd_bwd_vs_dense']:>5.2f} | "
        if has_twin:
            line += f"{row['speedup_fwd_vs_transformers']:>6.1f}x {row['speedup_fwd_bwd_vs_transformers']:>6.1f}x"
        lines.append(line)
    for row in result["layer"]:
        if "fused_kernel_speedup_fwd_bwd" in row:
            lines.append(
                f"  {row['tokens']:>6} tokens: fused CPU kernel {row['ms']['ours_fwd_bwd']:.1f} ms f+b, grouped path "
                f"{row['ms']['ours_grouped_fwd_bwd']:.1f} ms ({row['fused_kernel_speedup_fwd_bwd']:.2f}x)"
            )
    if has_twin:
        diff = max(row["max_abs_diff_vs_transformers"] for row in result["layer"])
        mm = result["model_fwd_bwd_ms"]
        lines.append(f"  (outputs agree with transformers to {diff:.1e})")
        lines.append(
            f"Whole model fwd+bwd, {result['model_tokens']} tokens: longcat {mm['ours']:.0f}ms, "
            f"transformers {result['transformers']} {mm['transformers']:.0f}ms, "
            f"speed-up {result['speedup_model_fwd_bwd_vs_transformers']:.2f}x"
        )
    else:
        lines.append("transformers is not installed: no comparison (pip install 'longcat[dev]')")
    m = result["machine"]
    lines.append(f"{m['date']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['device']}")
    return "\n".join(lines)
