"""`longcat serve --compile`: the engine's plain decode step as torch.compile'd static-shape graphs.

The step of generate.CompiledDecoder, for a batch of slots that each have their own length: the rows
are padded to a bucket size (1, 2, 4, ... up to max_batch; one graph per bucket, compiled on first use),
every row attends over its whole slot under a mask (keys at or before its position), and writes its
new entry at (slot, position) with an indexed store, so no shape depends on the lengths. Padding rows
write at the last cache position, which no true entry reaches (the cache holds context + k + 1).
On the CPU the graphs use the same Inductor options and transposed-weight copy of the model as
CompiledDecoder (frozen weights: the server's model never changes).

Legend: B bucket rows, S sublayers, M cache length, Rkv kv_lora_rank, R rope dim, V vocabulary.
"""

from __future__ import annotations

import torch

from ..inference.generate import _cpu_compile_options, _decoding_copy
from ..inference.kv_cache import SlotCache
from ..model.lm import LongcatForCausalLM


class _StaticRows:
    """The slot cache as one compiled step sees it: rows = slots 0 .. B - 1, each writing one entry at its
    position [B, 1] and attending over the whole slot."""

    def __init__(self, latent: torch.Tensor, k_rope: torch.Tensor, positions: torch.Tensor) -> None:
        self.latent, self.k_rope, self.positions = latent, k_rope, positions  # [S, slots, M, .], [B, 1]
        self.slots = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]

    def update(self, sublayer: int, start: object, latent: torch.Tensor, k_rope: torch.Tensor):  # noqa: ANN201
        B = self.positions.shape[0]
        self.latent[sublayer].index_put_((self.slots, self.positions), latent)
        self.k_rope[sublayer].index_put_((self.slots, self.positions), k_rope)
        return self.latent[sublayer, :B], self.k_rope[sublayer, :B]


class CompiledSteps:
    def __init__(self, model: LongcatForCausalLM, cache: SlotCache) -> None:
        on_cpu = model.device.type == "cpu"
        self.model = _decoding_copy(model, transpose_linear=on_cpu)
        self.cache = cache
        self._step = torch.compile(self._forward, dynamic=False, options=_cpu_compile_options() if on_cpu else {})

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor):  # noqa: ANN202
        keys = torch.arange(latent.shape[2], device=tokens.device)
        mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, 1, M]
        rows = _StaticRows(latent, k_rope, positions)
        hidden, _ = self.model.model(tokens, positions, mask, rows, 0)
        normed = self.model.model.norm(hidden)
        return normed, self.model.lm_head(normed)

    @staticmethod
    def bucket(rows: int) -> int:
        size = 1
        while size < rows:
            size *= 2
        return size

    @torch.inference_mode()
    def warm_up(self) -> list[int]:
        """Compile every bucket now (each takes seconds to a minute on a CPU), with padding rows only: they
        write at the last cache position, which holds no true entry. Returns the bucket sizes."""
        slots, device = self.cache.latent.shape[1], self.cache.latent.device
        sizes = sorted({min(self.bucket(n), slots) for n in range(1, slots + 1)})
        for size in sizes:
            tokens = torch.zeros(size, 1, dtype=torch.long, device=device)
            positions = torch.full((size, 1), self.cache.max_tokens - 1, dtype=torch.long, device=device)
            self._step(tokens, positions, self.cache.latent, self.cache.k_rope)
        return sizes

    @torch.inference_mode()
    def decode(self, last: list[int]) -> torch.Tensor:
        """One token for each of the running rows (slots 0 .. R - 1, `last` their newest tokens) ->
        logits [R, V]; the caller advances the lengths."""
        R = len(last)
        B = min(self.bucket(R), self.cache.latent.shape[1])
        device = self.cache.latent.device
        tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        tokens[:R, 0] = torch.tensor(last, device=device)
        positions = torch.full((B, 1), self.cache.max_tokens - 1, dtype=torch.long, device=device)
        positions[:R, 0] = torch.tensor(self.cache.lengths[:R], device=device)
        _, logits = self._step(tokens, positions, self.cache.latent, self.cache.k_rope)
        return logits[:R, 0]
