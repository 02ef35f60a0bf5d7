"""The latent KV cache of the decoding engine: per MLA sublayer, the normalised, scaled KV latent and the
roped shared key of every token, kv_lora_rank + qk_rope_head_dim values (what `longcat info` counts).

Legend: S sublayers (2 per ScMoE layer; the MTP layer keeps a cache of its own with S = 1), N slots,
M tokens per slot, B rows of one forward, T new tokens per row, W keys a row attends over,
Rkv kv_lora_rank, R qk_rope_head_dim.

Layout: one slot per sequence, latent [S, N, M, Rkv] and k_rope [S, N, M, R], and `lengths[slot]` true
entries, kept as host integers (the engine schedules with them, so no step reads them from the device).
A forward runs over consecutive slots (`Rows`), each row writing its T new tokens at its own positions
(also its RoPE positions: a slot holds one sequence from position 0). A row with fewer true tokens
than T is padded at the end; the padding's entries land past the row's length, where the key mask
hides them until the row's next tokens overwrite them. Rolling back rejected drafts is therefore only a
change of `lengths`, and a row that leaves is only a slot whose length is no longer counted.

One code, two widths: an eager step attends over W = its longest row's length + T (a view of the
slots, no copy); a graph-ready step over the whole slot, W = M, so no shape depends on the lengths.

Shared prompt prefixes (the serving engine's prefix cache, the next issue): a slot is addressed in
blocks of BLOCK_TOKENS tokens, and the prefix cache will keep finished requests' prompt blocks in a pool of the same
per-token layout ([S, blocks, BLOCK_TOKENS, Rkv + R]), keyed by a hash of the block's tokens chained
with its predecessors' (vLLM's automatic prefix caching key). A request whose prompt starts with cached
blocks will have them copied into its slot (one strided copy per block, about a thousandth of the
prefill it replaces) and prefill only the rest. Copying rather than pointing a block table at
shared blocks keeps every decode step's keys one contiguous view: pure PyTorch attention cannot read
through a block table without gathering every key of every row in every step.
"""

from __future__ import annotations

import torch

from ..config import LongcatConfig

BLOCK_TOKENS = 16


def key_mask(positions: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, 1, T, W]: the query at position positions[b, t] sees its row's keys at or before it."""
    keys = torch.arange(width, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


class Rows:
    """The cache as one forward of B consecutive slots sees it: row b's T new tokens at `positions` [B, T].
    fresh: every row starts at position 0, so attention runs the naive path over the new tokens alone
    (causal; end padding is never seen by a true token) and nothing is read back."""

    def __init__(
        self,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        first: int,
        positions: torch.Tensor,
        width: int,
        fresh: bool = False,
    ) -> None:
        self.latent, self.k_rope, self.positions, self.width, self.fresh = latent, k_rope, positions, width, fresh
        B = positions.shape[0]
        self.rows = slice(first, first + B)
        self.slots = torch.arange(first, first + B, device=positions.device)[:, None]  # [B, 1]
        self.mask = None if fresh else key_mask(positions, width)

    def update(
        self, sublayer: int, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """latent [B, T, Rkv], k_rope [B, T, R] written at each row's positions; returns the rows' keys
        [B, W, Rkv] and [B, W, R], or None when fresh."""
        self.latent[sublayer].index_put_((self.slots, self.positions), latent)
        self.k_rope[sublayer].index_put_((self.slots, self.positions), k_rope)
        if self.fresh:
            return None
        return self.latent[sublayer, self.rows, : self.width], self.k_rope[sublayer, self.rows, : self.width]


class LatentCache:
    def __init__(
        self,
        config: LongcatConfig,
        slots: int,
        max_tokens: int,
        device: torch.device | str,
        dtype: torch.dtype,
        sublayers: int | None = None,
    ) -> None:
        """sublayers: 2 * num_layers for the main model (the default), 1 for the MTP layer's own cache."""
        S = config.num_hidden_layers if sublayers is None else sublayers
        self.latent = torch.zeros(S, slots, max_tokens, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(S, slots, max_tokens, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.max_tokens = max_tokens

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rope.nbytes

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a compiled step receives (never this object: its host lengths would become guards)."""
        return self.latent, self.k_rope

    def rows(self, first: int, batch: int, tokens: int) -> Rows:
        """An eager forward over slots first .. first + batch - 1, each adding `tokens` after its length."""
        lengths = self.lengths[first : first + batch]
        width = max(lengths) + tokens
        if width > self.max_tokens:
            raise ValueError(f"the KV cache holds {self.max_tokens} tokens a slot; {width} were asked for")
        device = self.latent.device
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(tokens, device=device)
        return Rows(self.latent, self.k_rope, first, positions, width, fresh=not any(lengths))

    def advance(self, first: int, counts: list[int]) -> None:
        for b, count in enumerate(counts):
            self.lengths[first + b] += count

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s entries and length into slot `target` (the engine keeps running slots
        contiguous; this copies one sequence's cache, [S, length, .])."""
        if source == target:
            return
        length = self.lengths[source]
        self.latent[:, target, :length] = self.latent[:, source, :length]
        self.k_rope[:, target, :length] = self.k_rope[:, source, :length]
        self.lengths[target] = length
