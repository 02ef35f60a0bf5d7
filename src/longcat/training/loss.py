"""Cross-entropy over a large vocabulary without a full fp32 copy of the logits.

F.cross_entropy(logits.float(), targets) on bf16 logits [N, V] keeps an fp32 copy and an fp32
log-softmax of the whole [N, V] for backward: at 16 x 1024 tokens and V = 32k that is 4 GiB beside
1 GiB of bf16 logits. Here the fp32 values exist one chunk of rows at a time, in forward and again in
backward; what is saved is the logits themselves and one fp32 log-sum-exp per row. The result is the
mean over rows whose target is not `ignore_index`, as F.cross_entropy's, and nothing reads a value to
the host.

The trainer uses it on accelerators and in the bf16 recipe; the CPU fp32 path keeps F.cross_entropy,
whose results the golden run pins bit for bit.
"""

from __future__ import annotations

import torch

from ..model.lm import IGNORE_INDEX


def _rows_per_chunk(vocab: int, budget: int = 1 << 24) -> int:
    """About `budget` fp32 values (64 MiB) a chunk."""
    return max(1, budget // max(vocab, 1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, rows: int):  # noqa: ANN001, ANN205
        N = logits.shape[0]
        valid = targets != ignore_index  # [N]
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, N, rows):
            z = logits[start : start + rows].float()  # [c, V]
            lse[start : start + rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, safe[start : start + rows, None]).squeeze(1)
            total += ((lse[start : start + rows] - picked) * valid[start : start + rows]).sum()
        count = valid.sum().clamp(min=1).float()
        ctx.save_for_backward(logits, safe, valid, lse, count)
        ctx.rows = rows
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        logits, safe, valid, lse, count = ctx.saved_tensors
        rows = ctx.rows
        grad_logits = torch.empty_like(logits)
        scale = grad / count
        for start in range(0, logits.shape[0], rows):
            end = start + rows
            p = (logits[start:end].float() - lse[start:end, None]).exp_()  # softmax, [c, V]
            p.scatter_add_(1, safe[start:end, None], -torch.ones_like(p[:, :1]))
            p.mul_((valid[start:end, None] * scale).to(p.dtype))
            grad_logits[start:end] = p
        return grad_logits, None, None, None


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits [N, V] (any float dtype) against targets [N], computed in fp32 one
    chunk of `rows` rows at a time (default: about 64 MiB of fp32 a chunk); returns an fp32 scalar."""
    if rows is None:
        rows = _rows_per_chunk(logits.shape[-1])
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, rows)
