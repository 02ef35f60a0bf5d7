"""`longcat bench train`: training tokens/s of our full training step against transformers'
LongcatFlashForCausalLM on the same config, weights, batch and optimizer, plus model FLOPs utilisation
against an fp32 matmul peak measured in the same run.

Our step is the trainer's own (LM loss + balance loss + hidden z-loss, clipping, AdamW, the budget
controller); MTP is off on both sides since transformers has none. transformers' step is its forward
with labels, backward, the same clipping and AdamW.
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


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 3072), repeats: int = 5) -> dict[str, float]:
    """Best fp32 FLOP/s of a square matmul on this machine, now, through PyTorch's BLAS and through
    numpy's (OpenBLAS in the numpy wheels): on AMD CPUs the second can be faster than PyTorch's MKL, and
    MFU should be measured against the best the machine reaches, not against one library."""
    import numpy as np

    def best(matmul, make) -> float:  # noqa: ANN001
        rate = 0.0
        for size in sizes:
            a, b = make(size), make(size)
            matmul(a, b)
            for _ in range(repeats):
                start = time.perf_counter()
                matmul(a, b)
                rate = max(rate, 2 * size**3 / (time.perf_counter() - start))
        return rate

    generator = np.random.default_rng(0)
    torch_rate = best(torch.matmul, lambda n: torch.randn(n, n))
    numpy_rate = best(np.matmul, lambda n: generator.standard_normal((n, n), dtype=np.float32))
    return {"torch": torch_rate, "numpy": numpy_rate, "best": max(torch_rate, numpy_rate)}


def run(
    preset: str = "small", batch: int = 8, seq_len: int = 256, rounds: int = 6, data_dir: str | None = None
) -> dict:
    cfg = TrainConfig(
        preset=preset, batch_size=batch, seq_len=seq_len, mtp_weight=0.0, max_steps=10_000, lr=1e-3,
        data_dir=data_dir, eval_every=10**9, log_every=10**9,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        model = trainer.model
        result: dict = {
            "preset": preset,
            "batch": batch,
            "seq_len": seq_len,
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
                ids = loader.next_batch().input_ids
                set_lr(optimizer, lr_at(their_step[0], cfg))
                logits = twin(ids, use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                their_step[0] += 1

            fns["transformers"] = theirs
        times = time_interleaved(fns, rounds, warmup=1)
    tokens = batch * seq_len
    peaks = matmul_peak()
    peak = peaks["best"]
    report = model_report(model.config, seq_len=seq_len)
    train_flops = 3 * report.flops_per_token  # forward + backward (2x forward)
    result["tokens_per_s"] = {name: tokens / seconds for name, seconds in times.items()}
    result["peak_fp32_flops"] = peak
    result["peak_fp32_flops_torch"], result["peak_fp32_flops_numpy"] = peaks["torch"], peaks["numpy"]
    result["train_flops_per_token"] = train_flops
    result["mfu"] = result["tokens_per_s"]["ours"] * train_flops / peak
    if "transformers" in times:
        result["speedup_vs_transformers"] = times["transformers"] / times["ours"]
        result["mfu_transformers"] = result["tokens_per_s"]["transformers"] * train_flops / peak
    return result


def report(result: dict) -> str:
    tps = result["tokens_per_s"]
    lines = [
        f"Training step, preset {result['preset']} (vocabulary {result['vocab_size']}), "
        f"batch {result['batch']} x {result['seq_len']} tokens, AdamW, fp32",
        f"  longcat        {tps['ours']:>9,.0f} tokens/s   MFU {100 * result['mfu']:.1f}%",
    ]
    if "transformers" in tps:
        lines.append(
            f"  transformers   {tps['transformers']:>9,.0f} tokens/s   MFU {100 * result['mfu_transformers']:.1f}%"
        )
        lines.append(f"  speed-up over transformers: {result['speedup_vs_transformers']:.2f}x")
    else:
        lines.append("  transformers is not installed: no comparison")
    lines.append(
        f"  peak fp32 matmul {result['peak_fp32_flops'] / 1e9:.0f} GFLOP/s (PyTorch's BLAS "
        f"{result['peak_fp32_flops_torch'] / 1e9:.0f}, numpy's {result['peak_fp32_flops_numpy'] / 1e9:.0f}); "
        f"{result['train_flops_per_token'] / 1e6:.1f} MFLOP per training token"
    )
    m = result["machine"]
    lines.append(f"{m['date']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['device']}")
    return "\n".join(lines)
