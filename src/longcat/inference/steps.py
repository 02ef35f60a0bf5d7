"""The decoding engine's model steps over consecutive cache slots: a forward of rows (a prefill chunk), a
decode step and an MTP speculation round, each one forward of every row at once, tokens chosen on the
device (sampling.py).

`decode_step` and `speculation_round` are graph-ready: they take tensors (never the cache object, whose
host lengths would become guards), read nothing to the host, and their shapes are fixed by the batch
bucket and the key width, so `torch.compile(fullgraph=True)` captures each once per bucket
(compiled.py). Run eagerly, the same code attends over the longest row instead of the whole slot.

Speculation (paper §6.1.2): the MTP module drafts k tokens per row (the first from the main model's last
hidden state, the rest chaining its own), the main model verifies [t_m, d_1 .. d_k] in one forward, and
each row keeps its longest accepted prefix plus one token of the main model (sampling.accept): exactly
greedy decoding for a greedy row, the main model's distribution for a sampled one. Per row, with m
entries in the main cache and t_m chosen but not yet run through it, the MTP cache holds the true pairs
(h_i, t_{i+1}) below its own length, and `Pending` the 1 .. k + 1 pairs it has not seen, padded to k + 1.
Drafts' MTP entries and rejected tokens' entries lie past the true ones: hidden, then overwritten.

Legend: B rows, T tokens per row, H hidden, V vocabulary, k drafts, W key width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..model import tuning
from ..model.lm import LongcatForCausalLM
from .kv_cache import Rows
from .penalties import Adjustment
from .sampling import DRAFT, RowSettings, accept, choose, distribution, draw


class Pending(NamedTuple):
    next_ids: torch.Tensor  # [B, k + 1] t_{i+1} of each pair
    hidden: torch.Tensor  # [B, k + 1, H] the main model's normed h_i
    count: torch.Tensor  # [B] true pairs, 1 .. k + 1


class Round(NamedTuple):
    tokens: torch.Tensor  # [B, k + 1] the accepted drafts, then the main model's token; padding after
    accepted: torch.Tensor  # [B]
    pending: Pending  # the next round's pairs
    logits: torch.Tensor  # [B, k + 1, V] the main model's, at [t_m, d_1 .. d_k]


def lm_logits(model: LongcatForCausalLM, normed: torch.Tensor) -> torch.Tensor:
    """normed [..., H] -> logits [..., V]. For a few rows (a speculative verify step; the range is
    tuning.TRANSPOSED_HEAD_ROWS) the CPU GEMM runs faster as W @ x^T than as x @ W^T; other shapes and
    devices take the plain linear."""
    rows = normed.numel() // normed.shape[-1]
    head = model.lm_head
    low, high = tuning.TRANSPOSED_HEAD_ROWS
    if not low <= rows <= high or normed.device.type != "cpu" or head.bias is not None:
        return head(normed)
    flat = normed.reshape(rows, normed.shape[-1])
    return torch.mm(head.weight, flat.T).T.reshape(*normed.shape[:-1], -1)


def right_padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Token lists -> ids [B, T] padded at the end with 0, and each row's true count."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return ids.to(device), [len(r) for r in rows]


def forward_rows(model: LongcatForCausalLM, rows: Rows, ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] at the rows' positions -> normed hidden [B, T, H]; the cache's lengths are the caller's."""
    hidden, _ = model.model(ids, rows.positions, rows.mask, rows)
    return model.model.norm(hidden)


def mtp_rows(model: LongcatForCausalLM, rows: Rows, next_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The MTP layer over (h_i [B, T, H], t_{i+1} [B, T]) pairs at the rows' positions in its own cache
    -> normed MTP hidden [B, T, H]."""
    cos, sin = model.model.rotary_emb(rows.positions, hidden.dtype)
    return model.model.mtp(next_ids, hidden, cos, sin, rows.mask, rows)


def decode_step(
    model: LongcatForCausalLM,
    cache: tuple[torch.Tensor, torch.Tensor],
    tokens: torch.Tensor,
    positions: torch.Tensor,
    width: int,
    settings: RowSettings,
    adjustment: Adjustment | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's newest token [B, 1] at its position [B, 1] (slots 0 .. B - 1) -> the next token [B]
    and the model's logits [B, V]."""
    normed = forward_rows(model, Rows(*cache, 0, positions, width), tokens)
    logits = lm_logits(model, normed)  # [B, 1, V]
    adjusted = logits if adjustment is None else adjustment.apply(logits)
    return choose(adjusted, settings, positions + 1)[:, 0], logits[:, 0]


def speculation_round(
    model: LongcatForCausalLM,
    cache: tuple[torch.Tensor, torch.Tensor],
    mtp_cache: tuple[torch.Tensor, torch.Tensor],
    pending: Pending,
    lengths: torch.Tensor,
    mtp_lengths: torch.Tensor,
    widths: tuple[int, int],
    settings: RowSettings,
    adjustment: Adjustment | None,
    k: int,
) -> Round:
    """One round for rows at slots 0 .. B - 1: lengths, mtp_lengths [B] are the caches' true entries
    (m for the main one); widths the (main, MTP) key widths."""
    device = lengths.device
    span = torch.arange(k + 1, device=device)
    z = mtp_rows(model, Rows(*mtp_cache, 0, mtp_lengths[:, None] + span, widths[1]), pending.next_ids, pending.hidden)
    last = (pending.count - 1)[:, None]  # [B, 1] the newest pair
    z = z.gather(1, last[..., None].expand(-1, 1, z.shape[-1]))  # [B, 1, H]
    drafts, draft_probs, ahead = [], [], None  # ahead: [B, 1, V] counts of the drafts so far (penalties)
    aheads = []
    for j in range(k):
        logits = lm_logits(model, z)  # [B, 1, V]
        if adjustment is not None:
            aheads.append(torch.zeros_like(logits, dtype=torch.float32) if ahead is None else ahead)
            logits = adjustment.apply(logits, aheads[-1])
        position = (lengths + 1 + j)[:, None]  # the sequence position d_{j+1} is drafted for
        if settings.sampled:
            draft_probs.append(distribution(logits, settings))
            drafts.append(draw(draft_probs[-1], settings.seed, position, DRAFT))  # [B, 1]
        else:
            drafts.append(logits.argmax(-1))
        if adjustment is not None:
            ahead = aheads[-1].scatter_add(-1, drafts[-1][..., None], torch.ones_like(aheads[-1][..., :1]))
        if j < k - 1:
            rows = Rows(*mtp_cache, 0, mtp_lengths[:, None] + pending.count[:, None] + j, widths[1])
            z = mtp_rows(model, rows, drafts[-1], z)
    drafted = torch.cat(drafts, dim=1)  # [B, k]
    verify = torch.cat((pending.next_ids.gather(1, last), drafted), dim=1)  # [t_m, d_1 .. d_k]
    positions = lengths[:, None] + span  # [B, k + 1]
    normed = forward_rows(model, Rows(*cache, 0, positions, widths[0]), verify)
    logits = lm_logits(model, normed)  # [B, k + 1, V]
    target = logits
    if adjustment is not None:  # the position after d_j counts d_1 .. d_j
        target = adjustment.apply(logits, torch.cat((*aheads, ahead), dim=1) if k > 0 else None)
    if settings.sampled:
        accepted, following = accept(distribution(target, settings), torch.cat(draft_probs, dim=1), drafted,
                                     settings, positions + 1)  # fmt: skip
    else:
        choice = target.argmax(-1)  # [B, k + 1]
        accepted = (drafted == choice[:, :k]).long().cumprod(-1).sum(-1)
        following = choice.gather(1, accepted[:, None])[:, 0]
    tokens = torch.cat((drafted, drafted[:, :1]), dim=1).scatter(1, accepted[:, None], following[:, None])
    return Round(tokens, accepted, Pending(tokens, normed, accepted + 1), logits)
