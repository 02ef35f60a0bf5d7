"""MTP speculative decoding (paper §6.1.2; about 90% acceptance at scale), for one sequence.

Each round: the MTP module drafts k tokens (the first from the main model's last hidden state, the rest
chaining its own hidden state), the main model verifies them all in one forward, and the longest
acceptable prefix is kept plus one token from the main model (the correction, or a bonus when every
draft was accepted). Greedy: a draft is accepted when it is the main model's argmax, so the output is
exactly greedy decoding. Sampling: the standard rejection rule (accept d with probability
min(1, p(d) / q(d)), else draw from normalise(max(p - q, 0))), so the output distribution is the main
model's. Both caches roll back past rejected tokens by moving their length.

Bookkeeping, with m tokens in the main cache and t_m chosen but not yet run through it: the MTP cache
holds true entries (main hidden h_i, token t_{i+1}) for positions below `mtp_len`; `pending_hidden`
[1, m - mtp_len, H] and `pending_next` [1, m - mtp_len] are the pairs it has not seen yet.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.lm import LongcatForCausalLM, build_attention_mask
from .generate import GenerationError, GenerationRequest, lm_logits, prefill
from .kv_cache import LatentCache, decode_mask
from .sampling import SamplingParams, probabilities, select


@torch.inference_mode()
def _mtp_forward(
    model: LongcatForCausalLM, cache: LatentCache, next_ids: torch.Tensor, hidden: torch.Tensor, compiled=None
) -> torch.Tensor:  # noqa: ANN001
    """MTP over T pairs at the next cache positions: next_ids [1, T], hidden [1, T, H] -> normed z [1, T, H]."""
    if compiled is not None and cache.length > 0:
        return compiled.mtp(next_ids, hidden, cache)
    T = next_ids.shape[1]
    start, _ = cache.reserve(T)
    positions = torch.arange(start, start + T, device=next_ids.device)[None]
    cos, sin = model.model.rotary_emb(positions, hidden.dtype)
    mask = build_attention_mask(None, None, T, next_ids.device) if start == 0 else decode_mask(cache, start, T)
    return model.model.mtp(next_ids, hidden, cos, sin, mask, cache, start)


def accept_drafts(
    logits: torch.Tensor,
    drafts: list[int],
    draft_probs: list[torch.Tensor | None],
    sampling: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, torch.Tensor]:
    """The verification rule. logits [k + 1, V] of the main model at the positions before each draft and
    after the last; drafts (k ids) drawn from draft_probs (k tensors [V]). Returns how many drafts are
    accepted and the main model's token that follows them (a correction or a bonus), [1]."""
    for j, d in enumerate(drafts):
        if not sampling.do_sample:
            if int(logits[j].argmax()) != d:
                return j, logits[j].argmax().view(1)
            continue
        p, q = probabilities(logits[j], sampling), draft_probs[j]
        if float(torch.rand((), generator=generator, device=p.device)) >= float(p[d] / q[d]):
            residual = (p - q).clamp(min=0)
            total = residual.sum()
            # p == q up to rounding leaves no residual mass (a rejection there has probability ~0): draw from p
            return j, torch.multinomial(residual / total if total > 0 else p, 1, generator=generator)
    return len(drafts), select(logits[len(drafts)][None], sampling, generator)


def _cut_chunk(tokens: list[int], room: int, eos: set[int]) -> tuple[list[int], bool]:
    """A round's new tokens cut to the room left and after the first end-of-sequence token; True when
    that token was reached."""
    tokens = tokens[:room]
    for j, token in enumerate(tokens):
        if token in eos:
            return tokens[: j + 1], True
    return tokens, False


@torch.inference_mode()
def stream_speculative(
    model: LongcatForCausalLM, request: GenerationRequest, num_draft_tokens: int
) -> Iterator[torch.Tensor]:
    """Yields chunks of new tokens [1, n] (n >= 1 per main-model forward)."""
    if model.model.mtp is None:
        raise GenerationError(
            "speculative decoding needs MTP weights (model.mtp.*), and this checkpoint has none "
            "(num_nextn_predict_layers = 0); generate without speculative='mtp'"
        )
    ids, mask, stats, sampling = request.input_ids, request.attention_mask, request.stats, request.sampling
    if ids.shape[0] != 1:
        raise GenerationError(f"speculative decoding serves one sequence at a time, got a batch of {ids.shape[0]}")
    if num_draft_tokens < 1:
        raise GenerationError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    ids = ids[:, mask[0].bool()]  # one sequence: drop any padding
    P, k = ids.shape[1], num_draft_tokens
    stats.prompt_tokens = P
    if request.max_new_tokens == 0:
        return
    size = request.cache_tokens(P + request.max_new_tokens + k + 1)
    cache = LatentCache(model.config, 1, size, model.device, model.dtype)
    step_fn = request.decoder(model)
    compiled = step_fn if request.compile else None
    mtp_cache = LatentCache(model.config, 1, size, model.device, model.dtype, sublayers=1)
    eos = set(request.eos_token_ids)

    normed, _ = prefill(model, ids, torch.ones_like(ids), cache)
    token = select(lm_logits(model, normed[:, -1]), sampling, request.generator)  # t_P
    pending_hidden, pending_next = normed, torch.cat((ids[:, 1:], token[:, None]), dim=1)
    if request.compile and not sampling.do_sample:
        yield from _stream_fused_greedy(model, request, step_fn, k, cache, mtp_cache, pending_hidden, pending_next)
        return
    emitted = 0
    chunk = token[:, None]
    while True:
        kept, ended = _cut_chunk(chunk[0].tolist(), request.max_new_tokens - emitted, eos)
        chunk = chunk[:, : len(kept)]
        emitted += len(kept)
        stats.new_tokens += len(kept)
        yield chunk
        if ended or emitted >= request.max_new_tokens:
            return
        m = cache.length  # t_m = chunk[-1] is chosen but not yet in the main cache
        # draft k tokens with the MTP module
        mtp_len = mtp_cache.length
        z = _mtp_forward(model, mtp_cache, pending_next, pending_hidden, compiled)[:, -1:]
        drafts, draft_probs = [], []
        for j in range(k):
            q_logits = lm_logits(model, z[:, -1])  # [1, V]
            if sampling.do_sample:
                q = probabilities(q_logits, sampling)
                d = torch.multinomial(q, 1, generator=request.generator).squeeze(-1)
            else:  # greedy verification compares argmaxes; no draft distribution needed
                q, d = None, q_logits.argmax(-1)
            drafts.append(d)
            draft_probs.append(q)
            if j < k - 1:
                z = _mtp_forward(model, mtp_cache, d[:, None], z, compiled)
        mtp_cache.rollback(mtp_len + pending_next.shape[1])  # keep only the true entries
        stats.drafted += k
        # verify every draft in one forward of the main model: [t_m, d_1 .. d_k] at positions m .. m + k
        verify = torch.cat((chunk[:, -1:], torch.stack(drafts, dim=1)), dim=1)  # [1, k + 1]
        positions = torch.arange(m, m + k + 1, device=ids.device)[None]
        normed, logits = step_fn(verify, positions, cache)
        stats.main_forwards += 1
        logits = logits[0]  # [k + 1, V]
        drafted = [int(d) for d in drafts]
        probs = [None if q is None else q[0] for q in draft_probs]
        accepted, next_token = accept_drafts(logits, drafted, probs, sampling, request.generator)
        stats.accepted += accepted
        cache.rollback(m + 1 + accepted)  # keep t_m and the accepted drafts
        kept = verify[:, 1 : 1 + accepted]
        chunk = torch.cat((kept, next_token.view(1, 1)), dim=1)
        pending_hidden = normed[:, : accepted + 1]  # main hidden states at positions m .. m + accepted
        pending_next = chunk  # the tokens that follow each of them


def _causal_mask(positions: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """bool [1, 1, T, M]: the queries at cache positions [T] see every key at or before their own (one
    sequence, no padding; entries past a query, stale or padded, stay hidden)."""
    keys = torch.arange(max_tokens, device=positions.device)
    return (keys[None, :] <= positions[:, None])[None, None]


class FusedGreedyRound:
    """A whole greedy speculation round as one compiled graph (compile=True, batch 1): the MTP layer over
    the pending (main hidden, next token) pairs, k chained drafts by argmax, and the main model's verify
    forward over [t_m, d_1 .. d_k] with its argmaxes. Separate compiled calls would each pay Dynamo's
    guard check and the wrapper, which at these sizes cost as much as the drafting itself.

    Static shapes: the pending pairs (1 .. k + 1 of them) arrive padded to k + 1. Padded pairs and
    drafts are written to the caches past the true entries, where causal masks hide them until the
    next round overwrites them, so rolling back is only a change of the lengths kept in Python."""

    def __init__(self, decoder, k: int) -> None:  # noqa: ANN001 - a generate.CompiledDecoder
        self.model = decoder.model
        self.k = k
        self._graph = torch.compile(self._forward, dynamic=False, options=decoder.options)

    def _forward(self, last, pending_next, pending_hidden, pending_count, mtp_start, main_start, cache, mtp_cache):  # noqa: ANN001, ANN202, PLR0913
        lm, k = self.model, self.k
        span = torch.arange(k + 1, device=last.device)
        positions = mtp_start + span  # [k + 1]
        cos, sin = lm.model.rotary_emb(positions[None], pending_hidden.dtype)
        mask = _causal_mask(positions, mtp_cache.max_tokens)
        z = lm.model.mtp(pending_next, pending_hidden, cos, sin, mask, mtp_cache, positions)  # [1, k + 1, H]
        z = z.index_select(1, (pending_count - 1).view(1))  # [1, 1, H] at the last true pair
        drafts = []
        for j in range(k):
            drafts.append(lm.lm_head(z).argmax(-1))  # [1, 1]
            if j < k - 1:
                position = (mtp_start + pending_count + j).view(1)
                cos, sin = lm.model.rotary_emb(position[None], z.dtype)
                mask = _causal_mask(position, mtp_cache.max_tokens)
                z = lm.model.mtp(drafts[-1], z, cos, sin, mask, mtp_cache, position)
        tokens = torch.cat((last, *drafts), dim=1)  # [1, k + 1]
        positions = main_start + span
        hidden, _ = lm.model(tokens, positions[None], _causal_mask(positions, cache.max_tokens), cache, positions)
        normed = lm.model.norm(hidden)
        return tokens[:, 1:], lm.lm_head(normed).argmax(-1), normed

    def __call__(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN002
        """-> drafts [1, k], the main model's argmax after each of [t_m, d_1 .. d_k] [1, k + 1], and its
        normed hidden states there [1, k + 1, H]."""
        return self._graph(*args)


def _stream_fused_greedy(
    model: LongcatForCausalLM,
    request: GenerationRequest,
    decoder,  # noqa: ANN001 - the request's generate.CompiledDecoder
    k: int,
    cache: LatentCache,
    mtp_cache: LatentCache,
    pending_hidden: torch.Tensor,
    pending_next: torch.Tensor,
) -> Iterator[torch.Tensor]:
    """Greedy speculation with one compiled graph per round (see FusedGreedyRound); after the prefill,
    one host read per round. Same chunks as the general loop in stream_speculative."""
    stats, device = request.stats, request.input_ids.device
    fused = decoder.fused_rounds.get(k)
    if fused is None:
        fused = decoder.fused_rounds[k] = FusedGreedyRound(decoder, k)
    # every prompt pair but the last goes through the MTP layer now (eager prefill of its cache)
    P = pending_next.shape[1]
    if P > 1:
        _mtp_forward(model, mtp_cache, pending_next[:, :-1], pending_hidden[:, :-1])
    last = pending_next[:, -1:]  # t_P [1, 1]
    next_padded = torch.zeros(1, k + 1, dtype=torch.long, device=device)
    next_padded[0, 0] = last[0, 0]
    hidden_padded = pending_hidden.new_zeros(1, k + 1, pending_hidden.shape[-1])
    hidden_padded[:, 0] = pending_hidden[:, -1]
    count = 1  # true pending pairs; the caches' lengths count their true entries (MTP: P - 1, main: P)
    eos = set(request.eos_token_ids)
    chunk, emitted = [int(last[0, 0])], 0
    while True:
        chunk, ended = _cut_chunk(chunk, request.max_new_tokens - emitted, eos)
        emitted += len(chunk)
        stats.new_tokens += len(chunk)
        yield torch.tensor([chunk], dtype=torch.long, device=device)
        if ended or emitted >= request.max_new_tokens:
            return
        drafts, choices, normed = fused(
            last, next_padded, hidden_padded,
            *(torch.tensor(n, device=device) for n in (count, mtp_cache.length, cache.length)),
            cache, mtp_cache,
        )  # fmt: skip
        drafted, chosen = drafts[0].tolist(), choices[0].tolist()
        accepted = 0
        while accepted < k and drafted[accepted] == chosen[accepted]:
            accepted += 1
        stats.main_forwards += 1
        stats.drafted += k
        stats.accepted += accepted
        chunk = drafted[:accepted] + [chosen[accepted]]
        mtp_cache.length += count  # this round's pending pairs are true entries now
        cache.length += 1 + accepted  # t_m and the accepted drafts
        count = accepted + 1
        next_padded = torch.tensor([chunk + [0] * (k + 1 - len(chunk))], dtype=torch.long, device=device)
        hidden_padded = normed  # rows past `accepted` are padding
        last = next_padded[:, accepted : accepted + 1]
