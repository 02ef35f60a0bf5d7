"""Multi-token prediction module (paper §2.4; DeepSeek-V3 style, one dense layer).

For position i it combines the main model's final hidden state h_i with the embedding of token
t_{i+1} and predicts t_{i+2}:

    z = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])           # [B, T, 2H] -> [B, T, H]
    z = z + MLA(input_layernorm(z));  z = z + FFN(post_attention_layernorm(z))
    logits = lm_head(norm(z))                                    # the main model's head

h_i is the main model's output after its final norm (what vLLM feeds its LongCat MTP draft). The
module owns its embedding (`model.mtp.embed_tokens`), as the released checkpoint stores one. Key
names follow the checkpoint: `model.mtp.layers.0.{enorm.m, hnorm.m, eh_proj, ...,
transformer_layer.mlp}` and `model.mtp.norm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import LongcatConfig
from .attention import MLA
from .ffn import SwiGLU
from .norm_rope import RMSNorm

if TYPE_CHECKING:
    from ..inference.kv_cache import Rows


class _MlpHolder(nn.Module):
    """Holds the dense FFN under the checkpoint's `transformer_layer.mlp` name."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.mlp = SwiGLU(config.hidden_size, config.ffn_hidden_size)


class MTPLayer(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.enorm = nn.ModuleDict({"m": RMSNorm(H, config.rms_norm_eps)})
        self.hnorm = nn.ModuleDict({"m": RMSNorm(H, config.rms_norm_eps)})
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)
        self.transformer_layer = _MlpHolder(config)

    def forward(
        self,
        embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Rows | None = None,
    ) -> torch.Tensor:
        """embeds, hidden [B, T, H] -> [B, T, H]. A cache for the MTP layer has one sublayer of its own."""
        z = self.eh_proj(torch.cat((self.enorm["m"](embeds), self.hnorm["m"](hidden)), dim=-1))
        z = z + self.self_attn(self.input_layernorm(z), cos, sin, attn_mask, cache, 0)
        return z + self.transformer_layer.mlp(self.post_attention_layernorm(z))


class MTP(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MTPLayer(config) for _ in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: Rows | None = None,
    ) -> torch.Tensor:
        """next_ids [B, T] (t_{i+1}), hidden [B, T, H] (h_i) -> normed MTP hidden [B, T, H]."""
        z = self.layers[0](self.embed_tokens(next_ids), hidden, cos, sin, attn_mask, cache)
        return self.norm(z)
