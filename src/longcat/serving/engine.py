"""The decoding engine: the one place tokens are generated. `generate`, `longcat generate` and
`longcat serve` are all its clients; one thread (the server's, or the caller's) drives it.

Requests join the running batch between steps and leave it when they finish, each with its own
sampling settings, seed, stop rules and cache slot. Each turn of the loop (`step`):

1. takes new requests and cancellations from its inbox, and frees the slots of requests that ended
   (running slots stay contiguous: the last ones move down into the gaps, one slot copy each);
2. when no prefill is in flight, admits waiting requests into free slots: one long prompt alone, or
   several short ones together when their padded size fits the prefill chunk;
3. runs one prefill chunk of those (a long prompt takes several turns, so running streams keep
   flowing between its chunks); when their prompts are done they get their first tokens and join the
   running rows for the next turn;
4. runs one decode step for every running row (inference/steps.py): one token each, or an MTP
   speculation round (`speculative=True`: k drafts per row, verified in one forward, per-row acceptance);
5. reads the turn's chosen tokens to the host in one copy, and hands each request its new tokens.

Slots: running requests at 0 .. R - 1, the prefill in flight at R .. R + g - 1. With `compile=True` the
decode step and the speculation round run as compiled graphs (inference/compiled.py) over rows padded
to a bucket of 1, 2, 4, ... up to max_batch.

Batch invariance: rows never attend to each other and each row's random numbers are its own
(sampling.py), so a request gives the same tokens among others as alone except where two candidates
tie to within the rounding of differently shaped products (tests/serving/test_engine.py).
A failure ends only the requests it concerns (a prefill chunk's; a decode step is bisected).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from ..inference import steps
from ..inference.kv_cache import BLOCK_TOKENS, LatentCache
from ..inference.penalties import Penalties, PenaltyTable
from ..inference.sampling import RowSettings, SamplingParams, choose
from ..model.lm import LongcatForCausalLM
from .detokenize import TextStream

log = logging.getLogger("longcat.serve")


class EngineError(ValueError):
    """A request the engine cannot take; `code` says which kind (OpenAI's error codes where one fits)."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue holds --max-queue requests."""


@dataclass
class RequestParams:
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # tokens that end the request; None: the model's end-of-sequence ones
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: None off, n >= 0 the chosen one's and n alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI `echo` with `logprobs`)
    penalties: Penalties = field(default_factory=Penalties)


@dataclass
class Choice:
    """A chosen token and, when asked for, its log-probability and the n most likely alternatives."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class Output:
    """What a request receives from the engine: new text and tokens, and at the end a finish reason
    (`stop`, `length`, `abort` or `error`)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Choice] = field(default_factory=list)
    prompt_logprobs: list[Choice] | None = None  # once, with the first output; position 0 has none
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt: list[int]
    params: RequestParams
    sink: Callable[[Output], None]
    id: int = 0
    submitted: float = 0.0
    slot: int = -1
    seed: int = 0
    done_prompt: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    text: TextStream | None = None
    pending_pairs: int = 1  # speculative decoding: pairs the MTP cache has not seen (host copy)
    drafted: int = 0
    accepted: int = 0
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False


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


class Engine:
    def __init__(
        self,
        model: LongcatForCausalLM,
        tokenizer,  # noqa: ANN001 - inference.chat.CheckpointTokenizer, anything with decode(ids), or None
        max_batch: int = 16,
        max_queue: int = 64,
        speculative: bool = False,
        num_draft_tokens: int = 1,
        prefill_chunk: int = 512,
        metrics=None,  # noqa: ANN001 - serving.metrics.Metrics
        max_model_len: int | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        """max_model_len: prompt + output tokens a request may reach (default and upper bound: the model's
        max_position_embeddings); the cache holds max_batch slots of about this many tokens. Without a
        tokenizer (generate) outputs carry tokens only, and stop strings are refused."""
        if speculative and model.model.mtp is None:
            raise EngineError(
                "speculative decoding needs MTP weights (model.mtp.*); this checkpoint has none "
                "(num_nextn_predict_layers = 0): serve without --speculative"
            )
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or num_draft_tokens < 1:
            raise EngineError(
                f"max_batch ({max_batch}), prefill_chunk ({prefill_chunk}) and num_draft_tokens "
                f"({num_draft_tokens}) must be positive and max_queue ({max_queue}) non-negative"
            )
        self.model = model.eval()  # the engine never switches modes; generate restores the caller's
        self.tokenizer = tokenizer
        self.context = model.config.max_position_embeddings
        if max_model_len is not None:
            if not 1 <= max_model_len <= self.context:
                raise EngineError(
                    f"max_model_len must lie in [1, {self.context}] (the model's max_position_embeddings), "
                    f"got {max_model_len}"
                )
            self.context = max_model_len
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.speculative, self.k = speculative, num_draft_tokens
        self.metrics = metrics
        self.eos = list(model.config.eos_token_ids)
        # a round writes up to 2k entries past a row's true ones (k + 1 verified, chained drafts in the MTP
        # cache), padding rows write k + 1 past `self.pad_length`; compiled slots round up to 256, so
        # one graph serves many request sizes
        unit = 256 if compile else BLOCK_TOKENS
        room = -(-(self.context + 2 * num_draft_tokens + 2) // unit) * unit
        device, dtype = model.device, model.dtype
        self.cache = LatentCache(model.config, max_batch, room, device, dtype)
        self.pad_length = room - (num_draft_tokens + 1 if speculative else 1)
        self.mtp_cache = self.pending = None
        if speculative:
            self.mtp_cache = LatentCache(model.config, max_batch, room, device, dtype, sublayers=1)
            H, k = model.config.hidden_size, num_draft_tokens
            self.pending = steps.Pending(torch.zeros(max_batch, k + 1, dtype=torch.long, device=device),
                                         torch.zeros(max_batch, k + 1, H, dtype=dtype, device=device),
                                         torch.ones(max_batch, dtype=torch.long, device=device))  # fmt: skip
        self.penalties: PenaltyTable | None = None  # made when a request first asks for one
        self.compiled = None
        if compile:
            from ..inference.compiled import compiled_steps

            self.compiled = compiled_steps(model, compile_backend)
            self.compiled.mark_static(*self.cache.tensors, *(self.mtp_cache.tensors if speculative else ()))
        self._settings: tuple[tuple, RowSettings] | None = None
        self.running: list[Request] = []
        self.prefilling: list[Request] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._inbox: list[Request] = []
        self._lock = threading.Condition()
        self._next_id = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.decode_steps = 0  # forwards of the main model over running rows (prefill chunks not counted)

    # --- the caller's side (any thread) ---

    def check(self, prompt: list[int], params: RequestParams) -> None:
        """Raises EngineError for a request that cannot be served, before it is queued."""
        if not prompt:
            raise EngineError("the prompt is empty; send at least one token", param="prompt")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise EngineError(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        outside = [token for token, _ in params.penalties.bias if not 0 <= token < vocab]
        if outside:
            raise EngineError(f"logit_bias names token id {outside[0]}, outside the vocabulary [0, {vocab})",
                              param="logit_bias")  # fmt: skip
        if params.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {params.max_tokens}", param="max_tokens")
        if params.stop and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer; this engine has none", param="stop")
        if len(prompt) + params.max_tokens > self.context:
            raise EngineError(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens.",
                code="context_length_exceeded",
                param="max_tokens",
            )

    def submit(self, prompt: list[int], params: RequestParams, sink: Callable[[Output], None]) -> Request:
        """Queue a request; `sink` is then called from the engine thread with each Output, the last one
        carrying a finish_reason. Raises EngineError (bad request) or QueueFull."""
        self.check(prompt, params)
        request = Request(list(prompt), params, sink, submitted=time.perf_counter())
        with self._lock:
            free = self.max_batch - len(self.running) - len(self.prefilling)
            if len(self.waiting) + len(self._inbox) >= self.max_queue + max(free, 0):
                raise QueueFull(f"{self.max_batch} requests are running and {self.max_queue} waiting")
            request.id = self._next_id
            self._next_id += 1
            self._inbox.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """The client went away: the request ends (finish_reason `abort`) and frees its slot at the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def cancel_all(self) -> None:
        with self._lock:
            for request in (*self.running, *self.prefilling, *self.waiting, *self._inbox):
                request.cancelled = True
            self._lock.notify()

    @property
    def active(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self.running) + len(self.prefilling) + len(self.waiting) + len(self._inbox)

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="longcat-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def bucket(self, rows: int) -> int:  # a compiled step's padded batch: the next power of two, <= max_batch
        return min(1 << max(rows - 1, 0).bit_length(), self.max_batch)

    @torch.inference_mode()
    def warm_up(self) -> list[int]:
        """Compile every bucket's decode step (or speculation round), greedy and sampling, now rather
        than at a request's first use, with padding rows only. Returns the bucket sizes."""
        sizes = sorted({self.bucket(n) for n in range(1, self.max_batch + 1)})
        for size in sizes:
            for sampled in (False, True):
                params = [SamplingParams(do_sample=sampled)] * size
                settings = RowSettings.of(params, [0] * size, self.model.config.vocab_size, self.model.device)
                self._settings = ((), size), settings  # what _row_settings returns for no rows
                self._forward(0, 0, size, self.compiled)
        return sizes

    # --- the engine thread ---

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self.running or self.prefilling or self.waiting):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception:  # outside the steps' own isolation: end what is in flight; the engine goes on
                log.error("an engine step failed; ending the requests in flight", exc_info=True)
                message = traceback.format_exc(limit=3)
                for request in (*self.running, *self.prefilling):
                    self._end(request, "error", error=message)
                self._release()
        for request in (*self.running, *self.prefilling, *self.waiting, *self._inbox):
            self._end(request, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        """One turn of the loop (see the module docstring). Public so clients and tests can drive the
        engine without its thread."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox.clear()
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._end(request, "abort")
        for request in (*self.running, *self.prefilling):
            if request.cancelled and request.finish_reason is None:
                self._end(request, "abort")
        self._release()
        if not self.prefilling:
            self._admit()
        first = None  # (tokens [g], logits [g, V]) when the group's prompts are done
        try:
            first = self._prefill() if self.prefilling else None
        except Exception:  # ends the requests of this chunk alone
            for request in self.prefilling:
                log.error("request %d: its prefill chunk failed; ending it", request.id, exc_info=True)
                self._end(request, "error", error=traceback.format_exc(limit=3))
        decoded = self._decode() if self.running else None  # (tokens [R, n], accepted [R] | None, logits)
        parts = [t.flatten() for t in (first[0] if first else None, decoded[0] if decoded else None) if t is not None]
        values = torch.cat(parts).tolist() if parts else []  # the step's one host read
        if decoded is not None:
            self._deliver_decoded(values[len(values) - decoded[0].numel() :], decoded)
        if first is not None:
            for b, request in enumerate(self.prefilling):
                self._deliver(request, [describe(first[1][b], values[b], request.params.logprobs)], prompt=True)
            with self._lock:  # one move, so `active` never misses the group
                self.running, self.prefilling = self.running + self.prefilling, []
        self._release()
        self.steps += 1
        if self.metrics is not None:
            self.metrics.update_load(len(self.running) + len(self.prefilling), len(self.waiting) + len(self._inbox))

    def _release(self) -> None:
        """Drop ended requests and move the rest down so slots stay contiguous."""
        alive = [r for r in self.running if r.finish_reason is None]
        filling = [r for r in self.prefilling if r.finish_reason is None]
        for slot, request in enumerate((*alive, *filling)):
            if request.slot != slot:
                self.cache.move(request.slot, slot)
                if self.mtp_cache is not None:
                    self.mtp_cache.move(request.slot, slot)
                    for tensor in self.pending:
                        tensor[slot] = tensor[request.slot]
                if self.penalties is not None:
                    self.penalties.move(request.slot, slot)
                request.slot = slot
        with self._lock:
            self.running, self.prefilling = alive, filling

    def _admit(self) -> None:
        free = self.max_batch - len(self.running)
        group: list[Request] = []
        with self._lock:  # from the queue to the prefill in one move, so `active` counts it throughout
            while self.waiting and len(group) < free:
                candidate = self.waiting[0]
                longest = max([len(r.prompt) for r in group] + [len(candidate.prompt)])
                if group and longest * (len(group) + 1) > self.prefill_chunk:
                    break  # a long prompt waits for its own turn, prefilled alone in chunks
                group.append(self.waiting.popleft())
            self.prefilling = group
        for offset, request in enumerate(group):
            request.slot = len(self.running) + offset
            params = request.params
            request.seed = random.getrandbits(62) if params.seed is None else params.seed
            request.text = None if self.tokenizer is None else TextStream(self.tokenizer.decode, params.stop)
            self.cache.lengths[request.slot] = 0
            if self.mtp_cache is not None:
                self.mtp_cache.lengths[request.slot] = 0
            if self.penalties is None and params.penalties.active:
                vocab = self.model.config.vocab_size
                self.penalties = PenaltyTable(self.max_batch, vocab, self.model.device)
            if self.penalties is not None:
                self.penalties.admit(request.slot, params.penalties, request.prompt)

    def _row_settings(self, rows: list[Request], size: int) -> RowSettings:
        """The rows' sampling settings padded to `size`, rebuilt only when the rows change."""
        key = (tuple(r.id for r in rows), size)
        if self._settings is None or self._settings[0] != key:
            params, seeds = [r.params.sampling for r in rows], [r.seed for r in rows]
            vocab, device = self.model.config.vocab_size, self.model.device
            self._settings = key, RowSettings.of(params, seeds, vocab, device, size)
        return self._settings[1]

    def _prefill(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        group, first = self.prefilling, len(self.running)
        share = max(1, self.prefill_chunk // len(group))
        pieces = [r.prompt[r.done_prompt : r.done_prompt + share] for r in group]
        ids, counts = steps.right_padded(pieces, self.model.device)
        normed = steps.forward_rows(self.model, self.cache.rows(first, len(group), ids.shape[1]), ids)  # [g, T, H]
        if self.mtp_cache is not None:
            self._prefill_mtp(group, first, normed, counts)
        self.cache.advance(first, counts)
        for b, request in enumerate(group):
            if request.params.prompt_logprobs is not None:
                request.prompt_logits.append(steps.lm_logits(self.model, normed[b, : counts[b]]))
            request.done_prompt += counts[b]
        if any(r.done_prompt < len(r.prompt) for r in group):
            return None
        device = self.model.device
        last = normed[torch.arange(len(group), device=device), torch.tensor(counts, device=device) - 1]  # [g, H]
        logits = steps.lm_logits(self.model, last)[:, None]  # [g, 1, V]
        positions = torch.tensor([[len(r.prompt)] for r in group], device=device)
        settings = RowSettings.of([r.params.sampling for r in group], [r.seed for r in group],
                                  self.model.config.vocab_size, device)  # fmt: skip
        adjusted = logits if self.penalties is None else self.penalties.rows(first, len(group)).apply(logits)
        tokens = choose(adjusted, settings, positions)[:, 0]
        if self.penalties is not None:
            self.penalties.record(first, tokens[:, None])
        if self.pending is not None:  # the prompt's last pair waits for this token: the first round's pair
            rows = slice(first, first + len(group))
            self.pending.next_ids[rows, 0], self.pending.hidden[rows, 0] = tokens, last
            self.pending.count[rows] = 1
        return tokens, logits[:, 0]

    def _prefill_mtp(self, group: list[Request], first: int, normed: torch.Tensor, counts: list[int]) -> None:
        """The MTP layer over this chunk's (h_i, t_{i+1}) pairs whose next token is a prompt token; the
        prompt's last pair waits for the first generated token."""
        pairs = []
        for b, request in enumerate(group):
            start, end = request.done_prompt, request.done_prompt + counts[b]
            pairs.append(request.prompt[start + 1 : min(end + 1, len(request.prompt))])
        if not any(pairs):
            return
        next_ids, _ = steps.right_padded([p or [0] for p in pairs], self.model.device)
        rows = self.mtp_cache.rows(first, len(group), next_ids.shape[1])
        steps.mtp_rows(self.model, rows, next_ids, normed[:, : next_ids.shape[1]])
        self.mtp_cache.advance(first, [len(p) for p in pairs])

    def _decode(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One step for every running row -> (tokens [R, n], accepted [R] or None, logits [R, n, V]). A
        failed step is retried eagerly on each half of its rows, down to single rows, and only rows that
        fail alone end (a row's lengths advance only after its step succeeds, so a retry is safe): an
        out-of-memory in a large batch degrades instead of ending every stream."""
        R = len(self.running)
        self.decode_steps += 1
        try:
            return self._forward(0, R, self.bucket(R) if self.compiled is not None else R, self.compiled)
        except Exception:
            log.warning("a decode step of %d rows failed; retrying each half", R, exc_info=True)
        parts = self._bisect(0, R)
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    def _bisect(self, first: int, count: int) -> list[tuple]:
        try:
            return [self._forward(first, count, count, None)]
        except Exception as err:
            if count > 1:
                return self._bisect(first, count // 2) + self._bisect(first + count // 2, count - count // 2)
            failure = err
        request = self.running[first]
        log.error("request %d: its decode step fails alone; ending it", request.id, exc_info=failure)
        self._end(request, "error", error="".join(traceback.format_exception(failure, limit=3)))
        n, device = self.k + 1 if self.speculative else 1, self.model.device  # filler, delivered to no one
        accepted = torch.zeros(1, dtype=torch.long, device=device) if self.speculative else None
        return [(torch.zeros(1, n + self.speculative, dtype=torch.long, device=device), accepted,
                 torch.zeros(1, n, self.model.config.vocab_size, device=device))]  # fmt: skip

    def _forward(self, first: int, R: int, size: int, compiled) -> tuple:  # noqa: ANN001
        """The decode step or speculation round over running rows first .. first + R - 1, padded to `size`
        rows -> (tokens [R, n], accepted [R] or None, the model's logits [R, n, V]); lengths advanced."""
        device, k = self.model.device, self.k
        rows, span = self.running[first : first + R], slice(first, first + size)
        settings = self._row_settings(rows, size)
        view = lambda cache: tuple(t[:, first:] for t in cache.tensors)  # noqa: E731 - slots from `first`
        lengths = self.cache.lengths[first : first + R] + [self.pad_length] * (size - R)
        adjustment = None if self.penalties is None else self.penalties.rows(first, size)
        if not self.speculative:
            last = [r.output[-1] for r in rows] + [0] * (size - R)
            tokens = torch.tensor(last, device=device)[:, None]
            positions = torch.tensor(lengths, device=device)[:, None]
            width = self.cache.max_tokens if compiled else max(lengths) + 1
            step = compiled.decode if compiled else partial(steps.decode_step, self.model)
            chosen, logits = step(view(self.cache), tokens, positions, width, settings, adjustment)
            chosen, logits = chosen[:R, None], logits[:R, None]
            if self.penalties is not None and R:
                self.penalties.record(first, chosen)
            self.cache.advance(first, [1] * R)
            return chosen, None, logits
        mtp_lengths = self.mtp_cache.lengths[first : first + R] + [self.pad_length] * (size - R)
        widths = (self.cache.max_tokens,) * 2 if compiled else (max(lengths) + k + 1, max(mtp_lengths) + 2 * k)
        pending = steps.Pending(*(t[span] for t in self.pending))
        step = compiled.round if compiled else partial(steps.speculation_round, self.model)
        result = step(view(self.cache), view(self.mtp_cache), pending, torch.tensor(lengths, device=device),
                      torch.tensor(mtp_lengths, device=device), widths, settings, adjustment, k)  # fmt: skip
        for mine, new in zip(self.pending, result.pending):
            mine[first : first + R] = new[:R]
        if self.penalties is not None and R:
            kept = torch.arange(k + 1, device=device) <= result.accepted[:R, None]
            self.penalties.record(first, result.tokens[:R], kept)
        tokens = torch.cat((result.accepted[:R, None], result.tokens[:R]), dim=1)
        return tokens, result.accepted[:R], result.logits[:R]

    def _deliver_decoded(self, values: list[int], decoded: tuple) -> None:
        """Hand each running row its new tokens from the step's host copy `values`."""
        rows, logits = self.running, decoded[2]
        width = len(values) // max(len(rows), 1)
        for b, request in enumerate(rows):
            row = values[b * width : (b + 1) * width]
            if not self.speculative:
                self._deliver(request, [describe(logits[b, 0], row[0], request.params.logprobs)])
                continue
            accepted, tokens = row[0], row[1 : row[0] + 2]
            self.cache.lengths[b] += 1 + accepted  # t_m and the accepted drafts
            self.mtp_cache.lengths[b] += request.pending_pairs  # this round's pairs are true entries now
            request.pending_pairs = accepted + 1
            request.drafted, request.accepted = request.drafted + self.k, request.accepted + accepted
            if self.metrics is not None:
                self.metrics.speculation(self.k, accepted)
            top = request.params.logprobs
            self._deliver(request, [describe(logits[b, j], t, top) for j, t in enumerate(tokens)])

    def _deliver(self, request: Request, choices: list[Choice], prompt: bool = False) -> None:
        """Hand a row's new tokens to its client, cut at the first end-of-sequence token, max_tokens or
        stop string; a failure here ends this request alone."""
        if request.finish_reason is not None:
            return
        try:
            params, kept, reason = request.params, [], None
            stop_ids = self.eos if params.stop_token_ids is None else params.stop_token_ids
            ends = set() if params.ignore_eos else set(stop_ids)
            for choice in choices:
                kept.append(choice)
                if choice.token in ends:
                    reason = "stop"
                    break
                if len(request.output) + len(kept) >= params.max_tokens:
                    reason = "length"
                    break
            request.output.extend(c.token for c in kept)
            text = ""
            if request.text is not None:
                text = request.text.push([c.token for c in kept if c.token not in ends])
                if request.text.stopped:
                    reason = "stop"
                if reason is not None:
                    text += request.text.finish()
            now = time.perf_counter()
            out = Output(
                text, [c.token for c in kept], kept if params.logprobs is not None else [], finish_reason=reason
            )
            if prompt:
                request.first_token_at = now
                if self.metrics is not None:
                    self.metrics.first_token(now - request.submitted)
                if params.prompt_logprobs is not None:
                    logits = torch.cat(request.prompt_logits)  # [P, V]
                    request.prompt_logits = []
                    out.prompt_logprobs = [describe(logits[i], t, params.prompt_logprobs)
                                           for i, t in enumerate(request.prompt[1:])]  # fmt: skip
            if self.metrics is not None:
                self.metrics.tokens(len(kept))
            request.finish_reason = reason
            self._send(request, out)
        except Exception:
            self._end(request, "error", error=traceback.format_exc(limit=3))

    def _end(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        text = request.text.finish() if request.text is not None and reason != "error" else ""
        self._send(request, Output(text, finish_reason=reason, error=error))

    def _send(self, request: Request, out: Output) -> None:
        out.prompt_tokens, out.completion_tokens = len(request.prompt), len(request.output)
        if out.finish_reason is not None and self.metrics is not None:
            self.metrics.finished(request, out.finish_reason)
        try:
            request.sink(out)
        except Exception:  # a consumer that fails must not stop the engine
            log.warning("request %d: its output sink failed; the request is cancelled", request.id, exc_info=True)
            request.cancelled = True
