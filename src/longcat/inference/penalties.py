"""Per-request logit adjustments of the OpenAI API: presence and frequency penalties, `logit_bias`, and
the repetition penalty (an extension vLLM and transformers users know).

- frequency and presence (OpenAI's definition): logit[t] -= frequency * c[t] + presence * [c[t] > 0], with
  c[t] the number of times t was generated so far in this completion (the prompt does not count);
- repetition (Keskar et al., 2019, as transformers and vLLM apply it): every token of the prompt or the
  completion so far has its logit divided by r when positive, multiplied by r when negative;
- logit_bias: added to the token's logit (-100 bans it, +100 all but forces it).

Repetition comes first, then frequency and presence, then the bias. They change what is sampled (and
greedy's argmax); the log-probabilities a response reports stay the model's own, as OpenAI's do.

Legend: V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class Penalties:
    presence: float = 0.0
    frequency: float = 0.0
    repetition: float = 1.0
    bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.repetition != 1.0 or self.bias)


class PenaltyTable:
    """The adjustments of every cache slot, as the device holds them: generated-token counts [N, V], the
    tokens each slot has seen [N, V] (prompt and completion), its logit bias [N, V] and its
    (repetition, frequency, presence) [N, 3]. A slot without penalties holds neutral values (1, 0, 0),
    which leave logits exactly unchanged, so a batch applies one set of operations to every row."""

    def __init__(self, slots: int, vocab: int, device: torch.device) -> None:
        self.counts = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.coefficients = torch.tensor([[1.0, 0.0, 0.0]] * slots, device=device)

    def admit(self, slot: int, penalties: Penalties, prompt: Sequence[int]) -> None:
        device = self.counts.device
        self.counts[slot] = 0
        self.seen[slot] = False
        self.seen[slot, torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.bias[slot] = 0
        if penalties.bias:
            ids, values = zip(*penalties.bias, strict=True)
            self.bias[slot, torch.tensor(ids, device=device)] = torch.tensor(values, device=device)
        p = penalties
        self.coefficients[slot] = torch.tensor([p.repetition, p.frequency, p.presence], device=device)

    def record(self, first: int, tokens: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Tokens [B, T] that slots first .. first + B - 1 appended to their completions (on the device,
        no host read); kept [B, T] bool marks the true ones."""
        B = tokens.shape[0]
        weight = torch.ones_like(tokens, dtype=torch.float32) if kept is None else kept.float()
        self.counts[first : first + B].scatter_add_(1, tokens, weight)
        self.seen[first : first + B] |= self.counts[first : first + B] > 0

    def move(self, source: int, target: int) -> None:
        for table in (self.counts, self.seen, self.bias, self.coefficients):
            table[target] = table[source]

    def rows(self, first: int, batch: int) -> Adjustment:
        end = first + batch
        return Adjustment(self.counts[first:end], self.seen[first:end], self.bias[first:end],
                          self.coefficients[first:end])  # fmt: skip


class Adjustment(NamedTuple):
    """A batch's slice of the table (what a compiled step receives)."""

    counts: torch.Tensor  # [B, V]
    seen: torch.Tensor
    bias: torch.Tensor
    coefficients: torch.Tensor  # [B, 3]

    def apply(self, logits: torch.Tensor, ahead: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, T, V] -> the adjusted logits (fp32). ahead [B, T, V]: counts of a speculation
        round's drafts before each position, counted as if kept."""
        counts, seen = self.counts[:, None], self.seen[:, None]  # [B, 1, V]
        if ahead is not None:
            counts, seen = counts + ahead, seen | (ahead > 0)
        repetition, frequency, presence = (c[:, None, None] for c in self.coefficients.unbind(-1))
        x = logits.float()
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
        return x - frequency * counts - presence * (counts > 0).float() + self.bias[:, None]
