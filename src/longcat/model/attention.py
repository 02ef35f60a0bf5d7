"""Multi-head latent attention (MLA) with LongCat's variance-alignment scales (paper §2.3.1, Eq. 6-7).

Legend: B batch, T query tokens, S key tokens, H hidden, n heads, Dn nope head dim, R rope head dim,
Dv value head dim, Rq q_lora_rank, Rkv kv_lora_rank.

The scales are applied where transformers applies them (never before the latent RMSNorm, which would
cancel them): alpha_kv multiplies the normalised kv latent (what a latent cache stores); alpha_q
multiplies the whole query, which we fold into the softmax scale since q only enters through q.k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LongcatConfig
from .norm_rope import RMSNorm, apply_rotary_interleaved

if TYPE_CHECKING:
    from ..inference.kv_cache import Rows

# transformers builds the latent norms with the RMSNorm default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.dropout = config.attention_dropout
        qk_dim = config.qk_head_dim
        bias = config.attention_bias
        self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, config.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, config.hidden_size, bias=bias)
        self.kv_scale = config.kv_lora_scale
        self.softmax_scale = qk_dim**-0.5 * config.q_lora_scale

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> scaled, normalised kv latent [B, T, Rkv] and roped shared key [B, T, R].

        These two are all a KV cache needs (Rkv + R values per token)."""
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent) * self.kv_scale
        k_rope = apply_rotary_interleaved(k_rope.unsqueeze(1), cos.unsqueeze(1), sin.unsqueeze(1)).squeeze(1)
        return latent, k_rope

    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> q_nope [B, n, T, Dn], q_rope [B, n, T, R] (alpha_q not applied: see softmax_scale)."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rotary_interleaved(q_rope, cos.unsqueeze(1), sin.unsqueeze(1))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Rows | None = None,
        sublayer: int = 0,
    ) -> torch.Tensor:
        """x [B, T, H]; cos/sin [B, T, R/2]; attn_mask None (causal) or bool [B, 1, T, S] (True = attend).

        Without a cache, or when every row starts empty (a first prefill chunk), the naive path: keys and
        values expanded from the latent of these T tokens. Otherwise the absorbed path over the S cached
        latents of each row. Either way the new latents are written to the cache first: the cache's
        `update` (kv_cache.Rows) writes them and returns the keys to attend over, or None when these T
        tokens are all there is."""
        q_nope, q_rope = self.query(x, cos, sin)
        latent, k_rope = self.latent(x, cos, sin)
        if cache is not None:
            keys = cache.update(sublayer, latent, k_rope)
            if keys is not None:
                return self.absorbed(q_nope, q_rope, *keys, attn_mask)
        return self.naive(q_nope, q_rope, latent, k_rope, attn_mask)

    def naive(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Expanded attention (training, prefill, and the reference for the absorbed form).
        q_nope [B, n, T, Dn], q_rope [B, n, T, R], latent [B, T, Rkv], k_rope [B, T, R] -> [B, T, H]."""
        B, _, T, _ = q_nope.shape
        kv = self.kv_b_proj(latent).view(B, T, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # [B, n, T, Dn], [B, n, T, Dv]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, n, T, Dn + R]
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(B, self.num_heads, T, self.rope_dim)), dim=-1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None,
            scale=self.softmax_scale,
        )  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode without expanding past keys and values (DeepSeek-V2's absorbed MLA).

        q_nope [B, n, T, Dn], q_rope [B, n, T, R]; latent [B, S, Rkv], k_rope [B, S, R] (all cached
        tokens); attn_mask bool [B, 1, T, S] or None (the T queries are the last T positions).
        With kv_b_proj = [W_uk; W_uv] per head, q_nope . (W_uk c) = (W_uk^T q_nope) . c, and the output
        W_uv (sum_j p_j c_j): one pass over the S x (Rkv + R) cache, shared by every head."""
        B, n, T, _ = q_nope.shape
        S = latent.shape[1]
        w = self.kv_b_proj.weight.view(n, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [n, Dn, Rkv], [n, Dv, Rkv]
        # every head reads the same latent, so heads fold into the rows of one [B, n*T, .] matmul
        # (a broadcast over heads would copy the whole cache once per head)
        q_latent = torch.einsum("bntd,ndr->bntr", q_nope, w_uk).reshape(B, n * T, -1)  # [B, n*T, Rkv]
        scores = torch.baddbmm(  # [B, n*T, S]
            q_latent @ latent.transpose(1, 2), q_rope.reshape(B, n * T, -1), k_rope.transpose(1, 2)
        ).view(B, n, T, S)
        scores = scores.float() * self.softmax_scale
        if attn_mask is None:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(diagonal=S - T)
        probs = scores.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1).to(latent.dtype)
        out_latent = (probs.view(B, n * T, S) @ latent).view(B, n, T, -1)  # [B, n, T, Rkv]
        out = torch.einsum("bntr,ndr->btnd", out_latent, w_uv)  # [B, T, n, Dv]
        return self.o_proj(out.reshape(B, T, n * self.v_dim))
