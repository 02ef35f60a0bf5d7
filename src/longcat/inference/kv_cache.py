"""A preallocated latent KV cache: per MLA sublayer, the normalised, scaled KV latent and the roped shared
key, kv_lora_rank + qk_rope_head_dim values per token (what `longcat info` counts).

Legend: S sublayers (2 per ScMoE layer; the MTP layer keeps a cache of its own), B batch, M max tokens,
Rkv kv_lora_rank, R qk_rope_head_dim.

LatentCache (one generation call): rows of a batch share one write position (`length`); prompts of
different lengths are left-padded, and `key_valid` [B, M] marks the padding so no query attends to it.
Rolling back (speculative decoding) only moves `length`; stale entries are overwritten by the next write.

SlotCache (the serving engine): one slot per request with a length of its own, so requests join and
leave a running batch whenever they like. A forward runs over a contiguous range of slots (`rows`),
each row writing its T new tokens at its own positions; rows with fewer true tokens than T are padded
at the end, and the padding's entries land past the row's length, where causal masks hide them until
the row's next tokens overwrite them.
"""

from __future__ import annotations

import torch

from ..config import LongcatConfig


def _buffers(
    config: LongcatConfig,
    rows: int,
    max_tokens: int,
    device: torch.device | str,
    dtype: torch.dtype,
    sublayers: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [S, rows, M, Rkv] and k_rope [S, rows, M, R], zeroed; S = 2 * num_layers unless given."""
    S = config.num_hidden_layers if sublayers is None else sublayers
    latent = torch.zeros(S, rows, max_tokens, config.kv_lora_rank, device=device, dtype=dtype)
    return latent, torch.zeros(S, rows, max_tokens, config.qk_rope_head_dim, device=device, dtype=dtype)


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
        self.latent, self.k_rope = _buffers(config, batch_size, max_tokens, device, dtype, sublayers)
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

    def update(
        self, sublayer: int, start: int | torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Write T new entries at `start` and return the keys the T queries attend over: the cached
        latent [B, S, Rkv] and roped key [B, S, R], or None when nothing precedes them (prefill: the
        naive path over the new tokens alone). A tensor `start` ([T] positions, compiled decoding)
        writes in place and returns the whole static-size cache."""
        if isinstance(start, torch.Tensor):
            self.write_at(sublayer, start, latent, k_rope)
            return self.latent[sublayer], self.k_rope[sublayer]
        self.write(sublayer, start, latent, k_rope)
        return self.read(sublayer, start + latent.shape[1]) if start > 0 else None


class SlotCache:
    """Preallocated latent cache slots for serving: latent [S, slots, M, Rkv], k_rope [S, slots, M, R];
    `lengths[slot]` true entries in each slot (host integers: the engine schedules with them)."""

    def __init__(
        self,
        config: LongcatConfig,
        slots: int,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype,
        sublayers: int | None = None,
    ) -> None:
        self.latent, self.k_rope = _buffers(config, slots, max_tokens, device, dtype, sublayers)
        self.lengths = [0] * slots
        self.max_tokens = max_tokens

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes

    def rows(self, first: int, batch: int, tokens: int) -> SlotRows:
        """A forward over slots first .. first + batch - 1, each adding `tokens` entries after its own length."""
        return SlotRows(self, first, batch, tokens)

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s entries and length into slot `target` (the engine keeps running slots
        contiguous; this copies one request's cache, [S, M, .])."""
        if source == target:
            return
        length = self.lengths[source]
        self.latent[:, target, :length] = self.latent[:, source, :length]
        self.k_rope[:, target, :length] = self.k_rope[:, source, :length]
        self.lengths[target] = length


class SlotRows:
    """The cache as one forward of B consecutive slots sees it. Row b's T new tokens sit at positions
    lengths[first + b] .. + T - 1; `positions` [B, T] are those (also the RoPE positions, since a slot
    holds one sequence from position 0) and `mask` [B, 1, T, W] lets each query see its row's keys up
    to its own position, W = the longest row's length + T."""

    def __init__(self, cache: SlotCache, first: int, batch: int, tokens: int) -> None:
        self.cache, self.first, self.batch, self.tokens = cache, first, batch, tokens
        lengths = cache.lengths[first : first + batch]
        self.width = max(lengths) + tokens
        if self.width > cache.max_tokens:
            raise ValueError(f"the slot cache holds {cache.max_tokens} tokens; {self.width} were asked for")
        device = cache.latent.device
        self.positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(tokens, device=device)
        keys = torch.arange(self.width, device=device)
        self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # [B, 1, T, W]
        self.slots = torch.arange(first, first + batch, device=device)[:, None]  # [B, 1]

    def update(
        self, sublayer: int, start: object, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [B, T, Rkv], k_rope [B, T, R] written at each row's positions (`start` is unused:
        rows have their own); returns the rows' keys, [B, W, Rkv] and [B, W, R]. Lengths are the caller's to advance."""
        self.cache.latent[sublayer, self.slots, self.positions] = latent
        self.cache.k_rope[sublayer, self.slots, self.positions] = k_rope
        rows = slice(self.first, self.first + self.batch)
        return self.cache.latent[sublayer, rows, : self.width], self.cache.k_rope[sublayer, rows, : self.width]


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
