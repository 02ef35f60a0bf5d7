"""Token selection for every row of a step in one call: greedy, or sampling with temperature, top-k,
top-p (nucleus) and min-p, each row with its own settings and seed; and the speculative rejection rule.

Randomness is counter-based: row b's uniform numbers for the token at sequence position p are a hash of
(b's seed, p, a stream, the vocabulary index), not draws from a generator. So one batched call serves
rows with different seeds; a row's draws depend neither on which rows share its batch nor on how many
steps it took to reach p; and a step holds no generator state, which CUDA graph capture needs. A draw
from q is the exponential race argmax_v q_v / E_v with E_v = -log u_v (Gumbel-max in another form).

Legend: B rows, T positions per row, V vocabulary, k drafts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# streams: the main model's token at a position, an MTP draft there, and the test that accepts a draft
MAIN, DRAFT, ACCEPT = 1, 2, 3
_M31 = (1 << 31) - 1


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one

    def validate(self) -> SamplingParams:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (> 0 when sampling), got {self.temperature}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        return self


class RowSettings(NamedTuple):
    """Every row's settings as tensors [B] on the device (what a compiled step receives); `sampled` says
    whether any row samples: a batch of greedy rows never builds a distribution."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor
    top_k: torch.Tensor  # long; V when unset
    top_p: torch.Tensor  # > 1 when unset, so no rounding of a cumulative sum ever drops a token
    min_p: torch.Tensor
    seed: torch.Tensor  # long, in [0, 2^62)
    sampled: bool

    @staticmethod
    def of(
        params: list[SamplingParams], seeds: list[int], vocab: int, device: torch.device, rows: int = 0
    ) -> RowSettings:
        """Settings of these rows, padded with greedy rows up to `rows`."""
        pad = max(rows - len(params), 0)
        params = [*params, *[SamplingParams()] * pad]
        column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        return RowSettings(
            column([not p.do_sample for p in params], torch.bool),
            column([p.temperature if p.do_sample else 1.0 for p in params], torch.float32),
            column([min(p.top_k or vocab, vocab) for p in params], torch.long),
            column([2.0 if p.top_p is None or p.top_p >= 1 else p.top_p for p in params], torch.float32),
            column([p.min_p or 0.0 for p in params], torch.float32),
            column([s % (1 << 62) for s in [*seeds, *[0] * pad]], torch.long),
            any(p.do_sample for p in params),
        )


def distribution(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """logits [B, T, V] -> the distributions sampled from (fp32), after temperature, top-k, min-p and
    top-p; a greedy row's is one-hot on its argmax."""
    x = logits.float()
    B, V = x.shape[0], x.shape[-1]
    one_hot = torch.nn.functional.one_hot(x.argmax(-1), V).float()
    if not rows.sampled:
        return one_hot
    view = lambda t: t.view(B, *[1] * (x.dim() - 1))  # noqa: E731 - [B] -> [B, 1, .., 1]
    ordered, order = (x / view(rows.temperature)).sort(dim=-1, descending=True)
    rank = torch.arange(V, device=x.device)
    keep = rank < view(rows.top_k)
    probs = ordered.masked_fill(~keep, float("-inf")).softmax(-1)
    keep = keep & (probs >= view(rows.min_p) * probs[..., :1])
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    keep = keep & (probs.cumsum(-1) - probs < view(rows.top_p))  # the smallest prefix reaching top_p
    probs = probs * keep
    probs = torch.zeros_like(probs).scatter(-1, order, probs / probs.sum(-1, keepdim=True))
    return torch.where(view(rows.greedy), one_hot, probs)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A bijection of [0, 2^31) (xor-shift, multiply by an odd constant, twice): int64 products stay
    below 2^62, so no overflow on any device."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _M31
    return x ^ (x >> 15)


def uniform(seed: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int | None = None) -> torch.Tensor:
    """Uniform numbers in (0, 1): seed [B], positions [B, T] -> [B, T] (vocab None) or [B, T, V]."""
    key = _mix((seed & _M31)[:, None] ^ (stream * 0x5BD1E995 & _M31))
    key = _mix(key ^ ((seed >> 31) & _M31)[:, None])
    key = _mix(key ^ (positions & _M31))  # [B, T]
    if vocab is not None:
        index = torch.arange(vocab, device=seed.device) * 0x3C6EF372 & _M31
        key = _mix(_mix(key[..., None] ^ index))
    return ((key >> 7).float() + 0.5) * 2.0**-24


def draw(probs: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One token from each distribution probs [B, T, V] -> [B, T] (a one-hot one gives its token)."""
    race = -torch.log(uniform(seed, positions, stream, probs.shape[-1]))
    return (probs / race).argmax(-1)


def choose(logits: torch.Tensor, rows: RowSettings, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] for the tokens at positions [B, T] -> token ids [B, T]."""
    if not rows.sampled:
        return logits.argmax(-1)
    return draw(distribution(logits, rows), rows.seed, positions, MAIN)


def accept(
    target: torch.Tensor, draft: torch.Tensor, drafts: torch.Tensor, rows: RowSettings, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule (Leviathan et al., 2023) for k drafts [B, k] drawn from draft [B, k, V], checked
    against the main model's target [B, k + 1, V] (the last after every draft); positions [B, k + 1] of
    the tokens each target distribution chooses. Draft j is accepted with probability
    min(1, p_j(d_j) / q_j(d_j)), and the token after the accepted ones is drawn from
    normalise(max(p_j - q_j, 0)) at the first rejection, or from p_k when every draft is accepted, so
    the output follows the main model. One-hot (greedy) rows reduce to "accept while the argmaxes agree".
    Returns how many drafts each row accepts [B] and the token that follows them [B]."""
    k = drafts.shape[1]
    p = target[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [B, k]
    q = draft.gather(-1, drafts[..., None]).squeeze(-1)
    ok = uniform(rows.seed, positions[:, :k], ACCEPT) * q < p
    accepted = ok.long().cumprod(-1).sum(-1)  # [B]
    residual = (target[:, :k] - draft).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    # p == q up to rounding leaves no residual mass (a rejection there has probability ~0): use p
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), target[:, :k])
    then = torch.cat((residual, target[:, k:]), dim=1)  # [B, k + 1, V]
    index = accepted[:, None, None].expand(-1, 1, then.shape[-1])
    chosen = then.gather(1, index)  # [B, 1, V]
    where = positions.gather(1, accepted[:, None])  # [B, 1]
    return accepted, draw(chosen, rows.seed, where, MAIN)[:, 0]
