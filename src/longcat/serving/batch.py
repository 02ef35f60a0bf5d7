"""The model steps of the serving engine, over consecutive cache slots (kv_cache.SlotCache): a prefill
chunk, a plain decode step, and a round of MTP speculation, each one forward for every row at once.
Rows keep their own positions, sampling settings and random generators; nothing here schedules.

Legend: B rows, T tokens per row in a forward (padded at the end), H hidden, V vocabulary,
k drafts per speculation round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inference.generate import lm_logits
from ..inference.kv_cache import SlotCache
from ..inference.sampling import SamplingParams, probabilities
from ..inference.speculative import accept_drafts
from ..model.lm import LongcatForCausalLM
from .penalties import PenaltyState


@dataclass
class RowSampling:
    """One row's way of choosing tokens."""

    params: SamplingParams
    generator: torch.Generator | None
    top_logprobs: int | None = None  # None: no log-probabilities; n >= 0: the chosen token's and n more
    penalties: PenaltyState | None = None  # presence/frequency/repetition penalties and logit_bias

    def adjusted(self, logits: torch.Tensor, ahead: list[int] | tuple = ()) -> torch.Tensor:
        """The logits [V] this row chooses from (its penalties applied; the model's own without any)."""
        return logits if self.penalties is None else self.penalties.apply(logits, ahead)


@dataclass
class Choice:
    """A chosen token and, when asked for, its log-probability and the n most likely alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Token lists -> ids [B, T] padded at the end with 0, and each row's true count."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return ids.to(device), [len(r) for r in rows]


@torch.inference_mode()
def forward_rows(model: LongcatForCausalLM, cache: SlotCache, first: int, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] after each slot's cached tokens -> normed hidden [B, T, H]. The cache lengths are not
    advanced: the caller keeps what it accepts (SlotRows.advance)."""
    rows = cache.rows(first, ids.shape[0], ids.shape[1])
    hidden, _ = model.model(ids, rows.positions, rows.mask, rows, 0)
    return model.model.norm(hidden)


@torch.inference_mode()
def mtp_rows(
    model: LongcatForCausalLM, cache: SlotCache, first: int, next_ids: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """The MTP layer over (main hidden h_i [B, T, H], next token t_{i+1} [B, T]) pairs after each slot's
    cached pairs -> normed MTP hidden [B, T, H] (lengths not advanced)."""
    rows = cache.rows(first, next_ids.shape[0], next_ids.shape[1])
    cos, sin = model.model.rotary_emb(rows.positions, hidden.dtype)
    return model.model.mtp(next_ids, hidden, cos, sin, rows.mask, rows, 0)


def advance(cache: SlotCache, first: int, counts: list[int]) -> None:
    for b, count in enumerate(counts):
        cache.lengths[first + b] += count


def choose(logits: torch.Tensor, rows: list[RowSampling]) -> list[Choice]:
    """logits [B, V] -> one Choice per row: greedy rows without penalties by one batched argmax, the
    others each with its own settings, penalties and generator."""
    greedy = logits.argmax(-1).tolist()
    choices = []
    for b, row in enumerate(rows):
        if row.params.do_sample:
            probs = probabilities(row.adjusted(logits[b]), row.params)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        else:
            token = greedy[b] if row.penalties is None else int(row.adjusted(logits[b]).argmax())
        choices.append(describe(logits[b], token, row.top_logprobs))
    return choices


def describe(logits: torch.Tensor, token: int, top: int | None) -> Choice:
    """logits [V] of the model (before temperature, as OpenAI reports them) -> the Choice for `token`."""
    if top is None:
        return Choice(token)
    logprobs = logits.float().log_softmax(-1)
    best = []
    if top > 0:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]))
        best = list(zip(indices.tolist(), values.tolist()))
    return Choice(token, float(logprobs[token]), best)


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], top: int) -> list[Choice]:
    """logits [P, V] at prompt positions 0 .. P - 1 and the tokens that follow each -> their Choices."""
    return [describe(logits[i], token, top) for i, token in enumerate(next_ids)]


@dataclass
class Pending:
    """A row's (main hidden, next token) pairs that its MTP cache has not seen: hidden [n, H], next [n]
    (1 <= n <= k + 1). The last pair's next token is the row's newest token."""

    hidden: torch.Tensor
    next_ids: list[int]


@torch.inference_mode()
def speculation_round(
    model: LongcatForCausalLM,
    cache: SlotCache,
    mtp_cache: SlotCache,
    pending: list[Pending],
    rows: list[RowSampling],
    k: int,
) -> tuple[list[list[Choice]], list[int], list[Pending]]:
    """One round for B rows at slots 0 .. B - 1 (paper §6.1.2; speculative.py has the one-sequence form):
    the MTP layer drafts k tokens per row, the main model verifies [t_m, d_1 .. d_k] of every row in one
    forward, and each row keeps its longest accepted prefix plus one token of the main model.
    Returns per row the new tokens (1 .. k + 1 Choices), how many drafts it accepted, and its next
    pending pairs; both caches are advanced past what each row keeps."""
    B = len(pending)
    device = cache.latent.device
    counts = [len(p.next_ids) for p in pending]
    width = max(counts)
    hidden = pending[0].hidden.new_zeros(B, width, pending[0].hidden.shape[-1])
    for b, p in enumerate(pending):
        hidden[b, : counts[b]] = p.hidden
    next_ids, _ = right_padded([p.next_ids for p in pending], device)
    z = mtp_rows(model, mtp_cache, 0, next_ids, hidden)  # [B, width, H]
    z = z[torch.arange(B, device=device), torch.tensor(counts, device=device) - 1][:, None]  # [B, 1, H]
    advance(mtp_cache, 0, counts)  # the pending pairs are true entries now; drafts' entries are not
    drafts, draft_probs = [], []  # k of [B] and of [B, V] | None
    for j in range(k):
        q_logits = lm_logits(model, z[:, 0])  # [B, V]
        token = q_logits.argmax(-1)
        probs = [None] * B
        for b, row in enumerate(rows):
            ahead = [int(d[b]) for d in drafts] if row.penalties is not None else ()
            if row.params.do_sample:
                probs[b] = probabilities(row.adjusted(q_logits[b], ahead), row.params)
                token[b] = torch.multinomial(probs[b], 1, generator=row.generator)[0]
            elif row.penalties is not None:
                token[b] = row.adjusted(q_logits[b], ahead).argmax()
        drafts.append(token)
        draft_probs.append(probs)
        if j < k - 1:  # drafts' MTP entries sit past the true ones: masked, then overwritten
            mtp_cache_lengths = list(mtp_cache.lengths[:B])
            for b in range(B):
                mtp_cache.lengths[b] += j
            z = mtp_rows(model, mtp_cache, 0, token[:, None], z)
            mtp_cache.lengths[:B] = mtp_cache_lengths
    last = torch.tensor([p.next_ids[-1] for p in pending], device=device)
    verify = torch.stack((last, *drafts), dim=1)  # [B, k + 1]
    normed = forward_rows(model, cache, 0, verify)
    logits = lm_logits(model, normed)  # [B, k + 1, V]
    drafted = torch.stack(drafts, dim=1).tolist()  # [B][k]
    out, accepted_counts, next_pending = [], [], []
    for b, row in enumerate(rows):
        probs = [draft_probs[j][b] for j in range(k)]
        target = logits[b]
        if row.penalties is not None:  # position j follows the drafts before it
            target = torch.stack([row.adjusted(logits[b, j], drafted[b][:j]) for j in range(k + 1)])
        accepted, token = accept_drafts(target, drafted[b], probs, row.params, row.generator)
        tokens = [*drafted[b][:accepted], int(token)]
        out.append([describe(logits[b, j], t, row.top_logprobs) for j, t in enumerate(tokens)])
        accepted_counts.append(accepted)
        next_pending.append(Pending(normed[b, : accepted + 1], tokens))
    advance(cache, 0, [1 + a for a in accepted_counts])  # t_m and the accepted drafts
    return out, accepted_counts, next_pending
