"""A preallocated latent KV cache: per MLA sublayer, the normalised, scaled KV latent and the roped shared
key, kv_lora_rank + qk_rope_head_dim values per token (what `longcat info` counts).

Legend: S sublayers (2 per ScMoE layer; the MTP layer keeps a cache of its own), B batch, M max tokens,
Rkv kv_lora_rank, R qk_rope_head_dim.

Rows of a batch share one write position (`length`): prompts of different lengths are left-padded,
and `key_valid` [B, M] marks the padding so no query attends to it. Rolling back (speculative decoding)
only moves `length`; stale entries are overwritten by the next write.
"""

from __future__ import annotations

import torch

from ..config import LongcatConfig


class LatentCache:
    def __init__(
        self,
        config: LongcatConfig,
        batch_size: int,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype,
        sublayers: int | None = None,
    ) -> None:
        """sublayers: 2 * num_layers for the main model (the default), 1 for the MTP layer's own cache."""
        S = config.num_hidden_layers if sublayers is None else sublayers
        self.latent = torch.zeros(S, batch_size, max_tokens, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(S, batch_size, max_tokens, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_tokens, dtype=torch.bool, device=device)
        self.length = 0
        self.max_tokens = max_tokens

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes

    def reserve(self, tokens: int, valid: torch.Tensor | None = None) -> tuple[int, int]:
        """Claim the next `tokens` positions for every sublayer; valid [B, tokens] marks real tokens."""
        start, end = self.length, self.length + tokens
        if end > self.max_tokens:
            raise ValueError(f"the KV cache holds {self.max_tokens} tokens; {end} were asked for")
        self.key_valid[:, start:end] = True if valid is None else valid
        self.length = end
        return start, end

    def write(self, sublayer: int, start: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """latent [B, T, Rkv], k_rope [B, T, R] at positions start .. start + T."""
        T = latent.shape[1]
        self.latent[sublayer, :, start : start + T] = latent
        self.k_rope[sublayer, :, start : start + T] = k_rope

    def write_at(self, sublayer: int, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Static-shape write for compiled decoding: positions [T] (a tensor, so shapes never change)."""
        self.latent[sublayer].index_copy_(1, positions, latent)
        self.k_rope[sublayer].index_copy_(1, positions, k_rope)

    def read(self, sublayer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached latent [B, end, Rkv] and roped key [B, end, R]."""
        return self.latent[sublayer, :, :end], self.k_rope[sublayer, :, :end]

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length


def static_decode_mask(cache: LatentCache, positions: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, M] over the whole cache: query at cache position p sees valid keys at <= p."""
    keys = torch.arange(cache.max_tokens, device=positions.device)
    return cache.key_valid[:, None, None, :] & (keys[None, :] <= positions[:, None])[None, None]


def decode_mask(cache: LatentCache, start: int, tokens: int) -> torch.Tensor:
    """bool [B, 1, tokens, start + tokens]: each new query sees valid cached keys and the new keys up to
    its own position."""
    end = start + tokens
    causal = torch.ones(tokens, end, dtype=torch.bool, device=cache.key_valid.device).tril(diagonal=start)
    return causal[None, None] & cache.key_valid[:, None, None, :end]
