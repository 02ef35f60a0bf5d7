"""`longcat bench train`: training tokens/s of our full training step against transformers'
LongcatFlashForCausalLM on the same config, weights, batch and optimizer, plus model FLOPs utilisation
against a matmul peak of the step's dtype measured in the same run, on the same device.

Our step is the trainer's own (LM loss + balance loss + hidden z-loss, clipping, AdamW, the budget
controller); MTP is off on both sides since transformers has none. transformers' step is its forward
with labels, backward, the same clipping and AdamW, under the same autocast in the bf16 recipe
(`--dtype bfloat16`: fp32 master weights, bf16 autocast). On a GPU the step is also profiled: the
host's busy time per step against the device's kernel time (a host-bound step has the first larger).
"""

from __future__ import annotations

import tempfile
import time

import torch
import torch.nn.functional as F

from ..accounting import model_report
from ..data.loader import PackedLoader
from ..training.config import TrainConfig
from ..training.optim import build_optimizer, lr_at, set_lr
from ..training.trainer import Trainer
from .common import machine, time_interleaved, transformers_twin, transformers_version


def matmul_peak(
    sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5, device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:  # fmt: skip
    """Best FLOP/s of a square matmul in `dtype` on this device, now. On the CPU in fp32 through
    PyTorch's BLAS and through numpy's (OpenBLAS in the numpy wheels): on AMD CPUs the second can be
    faster than PyTorch's MKL, and MFU should be measured against the best the machine reaches, not
    against one library. On a GPU through PyTorch, at sizes that fill it."""
    import numpy as np

    cuda = torch.device(device).type == "cuda"
    if cuda:
        sizes = (4096, 8192)

    def best(matmul, make) -> float:  # noqa: ANN001
        rate = 0.0
        for size in sizes:
            a, b = make(size), make(size)
            matmul(a, b)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                matmul(a, b)
                if cuda:
                    torch.cuda.synchronize()
                rate = max(rate, 2 * size**3 / (time.perf_counter() - start))
        return rate

    torch_rate = best(torch.matmul, lambda n: torch.randn(n, n, device=device, dtype=dtype))
    if cuda or dtype != torch.float32:
        return {"torch": torch_rate, "numpy": None, "best": torch_rate}
    generator = np.random.default_rng(0)
    numpy_rate = best(np.matmul, lambda n: generator.standard_normal((n, n), dtype=np.float32))
    return {"torch": torch_rate, "numpy": numpy_rate, "best": max(torch_rate, numpy_rate)}


def host_and_device_ms(step, steps: int = 3) -> dict[str, float] | None:  # noqa: ANN001
    """On a GPU: per step, the host's busy time (CPU time of the profiled operators) and the device's
    kernel time, from torch.profiler. None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events)
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    return {"host_ms_per_step": host_us / 1000 / steps, "device_ms_per_step": device_us / 1000 / steps}


def run(
    preset: str = "small", batch: int = 8, seq_len: int = 256, rounds: int = 6, data_dir: str | None = None,
    device: str = "cpu", dtype: str = "float32", overrides: list[str] | None = None,
) -> dict:  # fmt: skip
    """overrides: `--set` style KEY=VALUE of the training config (`model.hidden_size=1024`, ...)."""
    cfg = TrainConfig(
        preset=preset, batch_size=batch, seq_len=seq_len, mtp_weight=0.0, max_steps=10_000, lr=1e-3,
        data_dir=data_dir, eval_every=10**9, log_every=10**9, device=device, dtype=dtype,
    ).with_overrides(list(overrides or []))  # fmt: skip
    seq_len, batch = cfg.seq_len, cfg.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        model = trainer.model
        result: dict = {
            "preset": preset,
            "overrides": list(overrides or []),
            "batch": batch,
            "seq_len": seq_len,
            "dtype": dtype,
            "vocab_size": model.config.vocab_size,
            "transformers": transformers_version(),
            "machine": machine(),
        }
        fns = {"ours": lambda: trainer.train_step(monitor=False)}
        if result["transformers"] is not None:
            twin = transformers_twin(model).train()
            optimizer = build_optimizer(twin, cfg)
            # the same batches in the same order and the same learning-rate schedule as our trainer, so
            # both models change alike (transformers has no budget controller, so its routing still drifts)
            loader = PackedLoader(trainer.loader.stream, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.doc_masking)
            their_step = [0]

            def theirs() -> None:
                ids = loader.next_batch().input_ids.to(model.device)
                set_lr(optimizer, lr_at(their_step[0], cfg))
                with trainer.autocast:
                    logits = twin(ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                their_step[0] += 1

            fns["transformers"] = theirs
        times = time_interleaved(_synchronized(fns, model.device), rounds, warmup=1)
        result["profile"] = host_and_device_ms(fns["ours"]) if model.device.type == "cuda" else None
        result["moe_path"] = model.moe_layers()[0].experts.last_path
    tokens = batch * seq_len
    peaks = matmul_peak(device=str(model.device), dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    peak = peaks["best"]
    report = model_report(model.config, seq_len=seq_len)
    train_flops = 3 * report.flops_per_token  # forward + backward (2x forward)
    result["tokens_per_s"] = {name: tokens / seconds for name, seconds in times.items()}
    result["peak_flops"] = peak
    result["peak_flops_torch"], result["peak_flops_numpy"] = peaks["torch"], peaks["numpy"]
    result["train_flops_per_token"] = train_flops
    result["mfu"] = result["tokens_per_s"]["ours"] * train_flops / peak
    if "transformers" in times:
        result["speedup_vs_transformers"] = times["transformers"] / times["ours"]
        result["mfu_transformers"] = result["tokens_per_s"]["transformers"] * train_flops / peak
    return result


def _synchronized(fns: dict, device: torch.device) -> dict:
    """On a GPU each timed call waits for its kernels, so the clock measures the device's work."""
    if device.type != "cuda":
        return fns

    def wrap(fn):  # noqa: ANN001, ANN202
        def call() -> None:
            fn()
            torch.cuda.synchronize()

        return call

    return {name: wrap(fn) for name, fn in fns.items()}


def report(result: dict) -> str:
    tps = result["tokens_per_s"]
    dtype = "fp32" if result["dtype"] == "float32" else "bf16 autocast, fp32 master weights"
    sets = f", {' '.join(result['overrides'])}" if result.get("overrides") else ""
    lines = [
        f"Training step, preset {result['preset']}{sets} (vocabulary {result['vocab_size']}), "
        f"batch {result['batch']} x {result['seq_len']} tokens, AdamW, {dtype}; MoE: {result['moe_path']}",
        f"  longcat        {tps['ours']:>9,.0f} tokens/s   MFU {100 * result['mfu']:.1f}%",
    ]
    if "transformers" in tps:
        lines.append(
            f"  transformers   {tps['transformers']:>9,.0f} tokens/s   MFU {100 * result['mfu_transformers']:.1f}%"
        )
        lines.append(f"  speed-up over transformers: {result['speedup_vs_transformers']:.2f}x")
    else:
        lines.append("  transformers is not installed: no comparison")
    peak = (
        f"  peak {'fp32' if result['dtype'] == 'float32' else 'bf16'} matmul {result['peak_flops'] / 1e9:,.0f} GFLOP/s"
    )
    if result["peak_flops_numpy"] is not None:
        peak += (
            f" (PyTorch's BLAS {result['peak_flops_torch'] / 1e9:.0f}, numpy's {result['peak_flops_numpy'] / 1e9:.0f})"
        )
    lines.append(f"{peak}; {result['train_flops_per_token'] / 1e6:.1f} MFLOP per training token")
    if result.get("profile"):
        p = result["profile"]
        lines.append(
            f"  per step: host busy {p['host_ms_per_step']:.1f} ms, device kernels {p['device_ms_per_step']:.1f} ms"
            + (" (host-bound)" if p["host_ms_per_step"] > p["device_ms_per_step"] else "")
        )
    m = result["machine"]
    lines.append(f"{m['date']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['device']}")
    return "\n".join(lines)
