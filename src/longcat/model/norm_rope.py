"""RMSNorm and rotary position embedding in DeepSeek's interleaved layout.

Legend: B batch, T tokens, n heads, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from .precision import apply_keeping_float32


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 and cast back, as transformers does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; the frequencies are a non-persistent buffer (never saved)."""

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)

    def reset_parameters(self) -> None:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.inv_freq.device) / self.dim
        self.inv_freq.copy_(1.0 / (self.theta**exponent))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # the frequencies stay fp32 under model.to(bfloat16) (see precision.py)
        return apply_keeping_float32(self, super()._apply, fn, recurse, ("inv_freq",))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, R/2] (one angle per rotated pair)."""
        angles = position_ids[..., None].float() * self.inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of x [B, n, T, R] by cos/sin [B, 1, T, R/2].

    The output is de-interleaved (all rotated first members, then all second members), exactly as
    transformers returns it. q and k go through the same permutation, so q.k is unchanged, and the
    KV cache stores keys in this layout.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
