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


class PenaltyState:
    """One request's adjustment: its generated-token counts [V] and the tokens it has seen [V] (prompt and
    completion), updated as tokens are kept."""

    def __init__(self, penalties: Penalties, prompt: Sequence[int], vocab: int, device: torch.device) -> None:
        self.penalties = penalties
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.as_tensor(list(prompt), dtype=torch.long, device=device)] = True
        self.bias = None
        if penalties.bias:
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            ids, values = zip(*penalties.bias, strict=True)
            self.bias[torch.tensor(ids, device=device)] = torch.tensor(values, device=device)

    def record(self, tokens: Sequence[int]) -> None:
        """Tokens the request kept (appended to its completion)."""
        if tokens:
            index = torch.as_tensor(list(tokens), dtype=torch.long, device=self.counts.device)
            self.counts.index_add_(0, index, torch.ones(len(tokens), device=self.counts.device))
            self.seen[index] = True

    def apply(self, logits: torch.Tensor, ahead: Sequence[int] = ()) -> torch.Tensor:
        """logits [V] -> the adjusted logits [V] (fp32) at the position after the completion so far and
        `ahead` (a speculation round's drafts before this position, counted as if kept)."""
        counts, seen, p = self.counts, self.seen, self.penalties
        if ahead:
            index = torch.as_tensor(list(ahead), dtype=torch.long, device=counts.device)
            counts = counts.index_add(0, index, torch.ones(len(ahead), device=counts.device))
            seen = seen.clone()
            seen[index] = True
        x = logits.float()
        if p.repetition != 1.0:
            x = torch.where(seen, torch.where(x > 0, x / p.repetition, x * p.repetition), x)
        if p.frequency:
            x = x - p.frequency * counts
        if p.presence:
            x = x - p.presence * (counts > 0).float()
        if self.bias is not None:
            x = x + self.bias
        return x
