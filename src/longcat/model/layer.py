"""The shortcut-connected MoE (ScMoE) decoder layer (paper §2.2), with exactly the reference dataflow:

    h1 = x  + MLA_0(norm_in0(x))
    u  = norm_post0(h1)
    m  = MoE(u)                      # the shortcut: needed only at the end of the layer
    h2 = h1 + FFN_0(u)
    h3 = h2 + MLA_1(norm_in1(h2))
    y  = h3 + FFN_1(norm_post1(h3)) + m

Because m is consumed last, an expert-parallel MoE can run its dispatch/combine while FFN_0, MLA_1
and FFN_1 compute. The MoE is therefore called in three phases (moe.py): routing and the start of the
dispatch right after norm_post0, the experts after FFN_0 (the dispatch had FFN_0 to arrive), and the
sum last (the return had MLA_1 and FFN_1 to arrive), as the paper's single-batch overlap schedules
them (§5.3). In one process each phase simply runs in turn; distributed/ installs the dispatcher
that makes them asynchronous, so this module stays single-device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import LongcatConfig
from .attention import MLA
from .ffn import SwiGLU
from .moe import MoE
from .norm_rope import RMSNorm

if TYPE_CHECKING:
    from ..inference.kv_cache import Rows


class DecoderLayer(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.self_attn = nn.ModuleList([MLA(config) for _ in range(2)])
        self.mlps = nn.ModuleList([SwiGLU(H, config.ffn_hidden_size) for _ in range(2)])
        self.input_layernorm = nn.ModuleList([RMSNorm(H, config.rms_norm_eps) for _ in range(2)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(H, config.rms_norm_eps) for _ in range(2)])
        self.mlp = MoE(config)
        self.shortcut = config.moe_shortcut

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Rows | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. With a cache, this layer's attentions use sublayers 2 index + {0, 1}."""
        attn = lambda i, inp: self.self_attn[i](inp, cos, sin, attn_mask, cache, 2 * index + i)
        h = x + attn(0, self.input_layernorm[0](x))
        u = self.post_attention_layernorm[0](h)
        if not self.shortcut:  # the study baseline: the MoE reads what FFN_1 reads, after the second attention
            h = h + self.mlps[0](u)
            h = h + attn(1, self.input_layernorm[1](h))
            v = self.post_attention_layernorm[1](h)
            return h + self.mlps[1](v) + self.mlp.finish(self.mlp.compute(self.mlp.begin(v)))
        moe = self.mlp.begin(u)  # routes; under expert parallelism the dispatch starts here
        h = h + self.mlps[0](u)
        moe = self.mlp.compute(moe)  # the local experts; under expert parallelism the return starts here
        h = h + attn(1, self.input_layernorm[1](h))
        return h + self.mlps[1](self.post_attention_layernorm[1](h)) + self.mlp.finish(moe)
