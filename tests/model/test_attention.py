"""MLA and RoPE against slow, obvious references written from the paper's equations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tests.conftest import random_tiny_config

from longcat.model.attention import MLA
from longcat.model.norm_rope import RotaryEmbedding, apply_rotary_interleaved


def test_interleaved_rope_matches_complex_rotation() -> None:
    """DeepSeek's definition: pairs (x0, x1), (x2, x3), ... are complex numbers rotated by e^{i m theta_j}.
    Our output lists the rotated real parts first, then the imaginary parts."""
    dim, T = 8, 5
    rope = RotaryEmbedding(dim, theta=1000.0)
    rope.reset_parameters()
    x = torch.randn(1, 2, T, dim)
    positions = torch.arange(T)[None]
    cos, sin = rope(positions, torch.float32)
    ours = apply_rotary_interleaved(x, cos[:, None], sin[:, None])
    freqs = 1000.0 ** (-torch.arange(0, dim, 2).float() / dim)
    angle = positions[0, :, None].float() * freqs  # [T, dim/2]
    z = torch.view_as_complex(x.reshape(1, 2, T, dim // 2, 2)) * torch.polar(torch.ones_like(angle), angle)
    ref = torch.view_as_real(z).reshape(1, 2, T, dim)
    torch.testing.assert_close(ours, torch.cat((ref[..., 0::2], ref[..., 1::2]), dim=-1))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_mla_matches_paper_equations() -> None:
    """Eq. 6-7 with alpha after the latent norms, explicit softmax and causal mask, per head."""
    config = random_tiny_config(3, mla_scale_q_lora=True, mla_scale_kv_lora=True)
    torch.manual_seed(0)
    mla = MLA(config)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, n = 2, 7, config.num_attention_heads
    dn, r, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    h = torch.randn(B, T, config.hidden_size)
    rope = RotaryEmbedding(r, config.rope_theta)
    rope.reset_parameters()
    cos, sin = rope(torch.arange(T).expand(B, T), torch.float32)
    out = mla(h, cos, sin)

    alpha_q = math.sqrt(config.hidden_size / config.q_lora_rank)
    alpha_kv = math.sqrt(config.hidden_size / config.kv_lora_rank)
    c_q = alpha_q * _rms(h @ mla.q_a_proj.weight.T, mla.q_a_layernorm.weight, 1e-6)
    kv_a = h @ mla.kv_a_proj_with_mqa.weight.T
    c_kv = alpha_kv * _rms(kv_a[..., : config.kv_lora_rank], mla.kv_a_layernorm.weight, 1e-6)
    k_r = apply_rotary_interleaved(kv_a[..., config.kv_lora_rank :][:, None], cos[:, None], sin[:, None])[:, 0]
    q = (c_q @ mla.q_b_proj.weight.T).view(B, T, n, dn + r)
    kv = (c_kv @ mla.kv_b_proj.weight.T).view(B, T, n, dn + dv)
    heads = []
    for i in range(n):
        q_r = apply_rotary_interleaved(q[:, None, :, i, dn:], cos[:, None], sin[:, None])[:, 0]
        scores = (q[:, :, i, :dn] @ kv[:, :, i, :dn].transpose(1, 2) + q_r @ k_r.transpose(1, 2)) / math.sqrt(dn + r)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        heads.append(F.softmax(scores, dim=-1) @ kv[:, :, i, dn:])
    ref = torch.cat(heads, dim=-1) @ mla.o_proj.weight.T
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
