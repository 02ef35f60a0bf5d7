"""The serving engine: one thread owns the model and batches every request continuously.

Requests join the running batch between steps and leave it when they finish, each with its own
sampling settings, stop rules and cache slot. Each turn of the loop:

1. takes new requests and cancellations from its inbox, and frees the slots of requests that ended
   (running slots stay contiguous: the last ones move down into the gaps, one slot copy each);
2. when no prefill is in flight, admits waiting requests into free slots: one long prompt alone, or
   several short ones together when their padded size fits the prefill chunk;
3. runs one prefill chunk of those (a long prompt takes several turns, so running streams keep
   flowing between its chunks); a request whose prompt is done gets its first token and joins
   the running rows;
4. runs one decode step for every running row: one token each, or an MTP speculation round
   (`speculative=True`: k drafts per row, verified in one forward, per-row acceptance).

Slots: running requests at 0 .. R - 1, the prefill in flight at R .. R + g - 1.

Batch invariance: a row's result depends on the other rows only through floating-point rounding
(matrix products of another shape may sum in another order; rows never attend to each other), so a
greedy request served among others gives the same tokens as alone except where two candidates tie
to within rounding. tests/serving/test_engine.py measures it.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inference.generate import lm_logits
from ..inference.kv_cache import SlotCache
from ..inference.sampling import SamplingParams
from ..model.lm import LongcatForCausalLM
from . import batch
from .batch import Choice, Pending, RowSampling
from .detokenize import TextStream
from .penalties import Penalties, PenaltyState


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
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: None off, n >= 0 the chosen one's and n alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI `echo` with `logprobs`)
    penalties: Penalties = field(default_factory=Penalties)


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
    done_prompt: int = 0  # prompt tokens in the cache
    output: list[int] = field(default_factory=list)
    text: TextStream | None = None
    sampling: RowSampling | None = None
    pending: Pending | None = None  # speculative decoding: the MTP layer's unseen pairs
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False


class Engine:
    def __init__(
        self,
        model: LongcatForCausalLM,
        tokenizer,  # noqa: ANN001 - inference.chat.CheckpointTokenizer or anything with decode(ids)
        max_batch: int = 16,
        max_queue: int = 64,
        speculative: bool = False,
        num_draft_tokens: int = 1,
        prefill_chunk: int = 512,
        metrics=None,  # noqa: ANN001 - serving.metrics.Metrics
        max_model_len: int | None = None,
        compile: bool = False,
    ) -> None:
        """max_model_len: prompt + output tokens a request may reach (default and upper bound: the model's
        max_position_embeddings); the cache holds max_batch slots of about this many tokens."""
        if speculative and model.model.mtp is None:
            raise EngineError(
                "speculative decoding needs MTP weights (model.mtp.*); this checkpoint has none "
                "(num_nextn_predict_layers = 0): serve without --speculative"
            )
        if compile and speculative:
            raise EngineError(
                "--compile compiles the plain decode step; with --speculative the engine decodes eagerly: choose one"
            )
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or num_draft_tokens < 1:
            raise EngineError(
                f"max_batch ({max_batch}), prefill_chunk ({prefill_chunk}) and num_draft_tokens "
                f"({num_draft_tokens}) must be positive and max_queue ({max_queue}) non-negative"
            )
        self.model = model.eval()  # once: the engine never switches modes
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
        self.eos = set(model.config.eos_token_ids)
        # speculative drafts are written up to k + 1 entries past a row's true ones (padded prefill rows
        # never pass the context: a group of prompts starts at 0 and its longest prompt fits)
        room = self.context + num_draft_tokens + 1
        device, dtype = model.device, model.dtype
        self.cache = SlotCache(model.config, max_batch, room, device, dtype)
        self.mtp_cache = SlotCache(model.config, max_batch, room, device, dtype, sublayers=1) if speculative else None
        self.compiled = None
        if compile:
            from .compiled import CompiledSteps

            self.compiled = CompiledSteps(model, self.cache)
        self.running: list[Request] = []
        self.prefilling: list[Request] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._inbox: list[Request] = []
        self._lock = threading.Condition()
        self._next_id = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

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
            except Exception:  # a failed forward ends the requests it served; the engine goes on
                message = traceback.format_exc(limit=3)
                for request in (*self.running, *self.prefilling):
                    self._end(request, "error", error=message)
                self._release()
        for request in (*self.running, *self.prefilling, *self.waiting, *self._inbox):
            self._end(request, "abort")

    @torch.inference_mode()
    def step(self) -> None:
        """One turn of the loop (see the module docstring). Public so tests can drive the engine
        without its thread."""
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
        if self.prefilling:
            self._prefill()
        if self.running:
            self._decode()
            self._release()
        self.steps += 1
        self._report()

    def _report(self) -> None:
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
                request.slot = slot
        self.running, self.prefilling = alive, filling

    def _admit(self) -> None:
        free = self.max_batch - len(self.running)
        group: list[Request] = []
        with self._lock:
            while self.waiting and len(group) < free:
                candidate = self.waiting[0]
                longest = max([len(r.prompt) for r in group] + [len(candidate.prompt)])
                if group and longest * (len(group) + 1) > self.prefill_chunk:
                    break  # a long prompt waits for its own turn, prefilled alone in chunks
                request = self.waiting.popleft()
                try:
                    self._prepare(request)
                except Exception:  # a request that cannot start ends alone (a seed torch refuses, say)
                    self._end(request, "error", error=traceback.format_exc(limit=2))
                    continue
                group.append(request)
        for offset, request in enumerate(group):
            request.slot = len(self.running) + offset
            self.cache.lengths[request.slot] = 0
            if self.mtp_cache is not None:
                self.mtp_cache.lengths[request.slot] = 0
        self.prefilling = group

    def _prepare(self, request: Request) -> None:
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        request.sampling = RowSampling(params.sampling, generator, params.logprobs)
        if params.penalties.active:
            vocab = self.model.config.vocab_size
            request.sampling.penalties = PenaltyState(params.penalties, request.prompt, vocab, self.model.device)
        request.text = TextStream(self.tokenizer.decode, params.stop)

    def _prefill(self) -> None:
        group, first = self.prefilling, len(self.running)
        share = max(1, self.prefill_chunk // len(group))
        pieces = [r.prompt[r.done_prompt : r.done_prompt + share] for r in group]
        ids, counts = batch.right_padded(pieces, self.model.device)
        normed = batch.forward_rows(self.model, self.cache, first, ids)  # [g, T, H]
        if self.mtp_cache is not None:
            self._prefill_mtp(group, first, ids, normed, counts)
        batch.advance(self.cache, first, counts)
        for b, request in enumerate(group):
            if request.params.prompt_logprobs is not None:
                request.prompt_logits.append(lm_logits(self.model, normed[b, : counts[b]]))
            request.done_prompt += counts[b]
        if any(r.done_prompt < len(r.prompt) for r in group):
            return
        last = normed[torch.arange(len(group)), torch.tensor(counts) - 1]  # [g, H]
        choices = batch.choose(lm_logits(self.model, last), [r.sampling for r in group])
        for b, (request, choice) in enumerate(zip(group, choices)):
            if self.mtp_cache is not None:
                request.pending = Pending(normed[b, counts[b] - 1 : counts[b]], [choice.token])
            self._deliver(request, [choice], prompt=True)
        self.running.extend(group)
        self.prefilling = []

    def _prefill_mtp(
        self, group: list[Request], first: int, ids: torch.Tensor, normed: torch.Tensor, counts: list[int]
    ) -> None:
        """The MTP layer over this chunk's (h_i, t_{i+1}) pairs whose next token is a prompt token; the
        prompt's last pair waits for the first generated token (it is the first round's pending pair)."""
        pairs = []
        for b, request in enumerate(group):
            start, end = request.done_prompt, request.done_prompt + counts[b]
            pairs.append(request.prompt[start + 1 : min(end + 1, len(request.prompt))])
        if not any(pairs):
            return
        next_ids, pair_counts = batch.right_padded([p or [0] for p in pairs], self.model.device)
        batch.mtp_rows(self.model, self.mtp_cache, first, next_ids, normed[:, : next_ids.shape[1]])
        batch.advance(self.mtp_cache, first, [len(p) for p in pairs])

    def _decode(self) -> None:
        rows = self.running
        if self.mtp_cache is not None:
            chunks, accepted, pending = batch.speculation_round(
                self.model, self.cache, self.mtp_cache, [r.pending for r in rows], [r.sampling for r in rows], self.k
            )
            for request, chunk, hits, nxt in zip(rows, chunks, accepted, pending):
                request.pending = nxt
                if self.metrics is not None:
                    self.metrics.speculation(self.k, hits)
                self._deliver(request, chunk)
            return
        if self.compiled is not None:
            logits = self.compiled.decode([r.output[-1] for r in rows])  # [R, V]
        else:
            last = torch.tensor([[r.output[-1]] for r in rows], device=self.model.device)  # [R, 1]
            logits = lm_logits(self.model, batch.forward_rows(self.model, self.cache, 0, last)[:, 0])
        batch.advance(self.cache, 0, [1] * len(rows))
        choices = batch.choose(logits, [r.sampling for r in rows])
        for request, choice in zip(rows, choices):
            self._deliver(request, [choice])

    def _deliver(self, request: Request, choices: list[Choice], prompt: bool = False) -> None:
        """Hand a row's new tokens to its client, cut at the first end-of-sequence token, max_tokens or
        stop string; a failure here ends this request alone."""
        if request.finish_reason is not None:
            return
        try:
            params, kept, reason = request.params, [], None
            for choice in choices:
                kept.append(choice)
                if not params.ignore_eos and choice.token in self.eos:
                    reason = "stop"
                    break
                if len(request.output) + len(kept) >= params.max_tokens:
                    reason = "length"
                    break
            tokens = [c.token for c in kept if params.ignore_eos or c.token not in self.eos]
            request.output.extend(c.token for c in kept)
            if request.sampling.penalties is not None:
                request.sampling.penalties.record([c.token for c in kept])
            text = request.text.push(tokens)
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
                    out.prompt_logprobs = self._prompt_logprobs(request)
            if self.metrics is not None:
                self.metrics.tokens(len(kept))
            request.finish_reason = reason
            self._send(request, out)
        except Exception:
            self._end(request, "error", error=traceback.format_exc(limit=3))

    def _prompt_logprobs(self, request: Request) -> list[Choice]:
        logits = torch.cat(request.prompt_logits)  # [P, V]
        request.prompt_logits = []
        return batch.prompt_logprobs(logits[:-1], request.prompt[1:], request.params.prompt_logprobs)

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
            request.cancelled = True
