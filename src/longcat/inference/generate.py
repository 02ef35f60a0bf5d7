"""`generate` and `stream_generate`: the decoding engine's simplest client (serving/engine.py).

Each prompt row becomes one engine request (its masked positions dropped, so a left- or right-padded
batch decodes as its rows would alone); the engine prefills them together, decodes them as one batch,
plainly or with MTP speculation (`speculative="mtp"`), and ends each at its end-of-sequence token or
max_new_tokens. `stream_generate` yields new tokens [B, n] as every row has them; `generate` returns the
prompt ids followed by the new tokens (the Hugging Face convention), a row that ended padded from then on.

Legend: B batch, P prompt tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.lm import LongcatForCausalLM
from .sampling import SamplingParams


class GenerationError(ValueError):
    """A generation request cannot be served; the message names the problem."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    main_forwards: int = 0  # decode forwards of the main model after the prefill
    drafted: int = 0
    accepted: int = 0  # drafts the main model agreed with, counted before any max_new_tokens/EOS cut

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.main_forwards, 1)


def pad_prompts(
    prompts: Sequence[Sequence[int]] | torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token lists -> left-padded ids [B, P] and attention mask [B, P]."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.ndim == 2 else prompts.unsqueeze(0)
        return ids, torch.ones_like(ids)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (an empty prompt was given)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def left_aligned(ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention_mask [B, P] with every row ending in a token: a right-padded row, as tokenizers
    often produce, is rotated so that its last token lands in the last column (what `generate` returns
    it as); masked positions inside a row stay masked."""
    mask = mask.to(ids.device)
    if mask.dim() == 1 and ids.dim() == 2 and ids.shape[0] == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise GenerationError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids {tuple(ids.shape)}; pass one mask "
            "entry per prompt token"
        )
    present = mask.bool()
    if not bool(present.any(-1).all()):
        raise GenerationError("every prompt needs at least one token (an empty prompt was given)")
    if bool(present[:, -1].all()):
        return ids, mask
    width = ids.shape[1]
    last = width - 1 - present.flip(-1).int().argmax(-1)  # [B] column of each row's last token
    ids, mask = ids.clone(), mask.clone()
    for row in torch.nonzero(last < width - 1).flatten().tolist():
        shift = width - 1 - int(last[row])
        ids[row] = ids[row].roll(shift).masked_fill(~present[row].roll(shift), pad_token_id)
        mask[row] = mask[row].roll(shift)
    return ids, mask


class TokenStream:
    """The iterator stream_generate returns: new tokens [B, n] as every row has them (n = 1 a step when
    decoding plainly; with speculation, as many as the slowest row has). `input_ids` and
    `attention_mask` hold the prompt as decoded (left-aligned, on the model's device)."""

    def __init__(self, model: LongcatForCausalLM, engine, rows: list[list[int]], params: list, stats) -> None:  # noqa: ANN001
        self.model, self.engine, self.stats = model, engine, stats
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.buffers: list[list[int]] = [[] for _ in rows]
        self.ended = [params[0].max_tokens == 0] * len(rows)
        self.was_training, self._closed = model.training, False
        stats.prompt_tokens = sum(map(len, rows))
        sink = lambda b: lambda out: self._receive(b, out)  # noqa: E731
        self.requests = (
            [] if self.ended[0] else [engine.submit(r, p, sink(b)) for b, (r, p) in enumerate(zip(rows, params))]
        )
        self.input_ids = self.attention_mask = None
        self.error: str | None = None

    def _receive(self, row: int, out) -> None:  # noqa: ANN001 - serving.engine.Output
        if out.finish_reason == "error":  # raised to the caller by __next__, not into the engine
            self.error = out.error
        self.buffers[row].extend(out.token_ids)
        self.stats.new_tokens += len(out.token_ids)
        self.ended[row] |= out.finish_reason is not None

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> torch.Tensor:
        while not self._closed:
            waiting = [len(buf) for buf, ended in zip(self.buffers, self.ended) if not ended]
            n = min(waiting) if waiting else max(map(len, self.buffers))
            if n > 0:
                chunk = [buf[:n] + [self.pad] * (n - len(buf)) for buf in self.buffers]
                self.buffers = [buf[n:] for buf in self.buffers]
                return torch.tensor(chunk, dtype=torch.long, device=self.model.device)
            if not waiting:
                break
            self.model.eval()
            self.engine.step()
            if self.error is not None:
                self.close()
                raise GenerationError(f"decoding failed: {self.error}")
            stats = self.stats
            stats.main_forwards = self.engine.decode_steps
            stats.drafted, stats.accepted = (sum(getattr(r, n) for r in self.requests) for n in ("drafted", "accepted"))
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop early: ends the requests and restores the model's training mode now."""
        if not self._closed:
            self._closed = True
            self.engine.cancel_all()
            self.model.train(self.was_training)


def stream_generate(
    model: LongcatForCausalLM,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    speculative: str | None = None,
    num_draft_tokens: int = 1,
    seed: int | None = None,
    stats: GenerationStats | None = None,
    compile: bool = False,
) -> TokenStream:
    """Yields new tokens [B, n] as they are chosen. eos_token_id None uses the config's; [] never stops
    early. Row b samples with seed `seed + b` (reproducible, whatever else shares the batch). A bad
    request raises here, before the first token is asked for."""
    from ..serving.engine import Engine, EngineError, RequestParams

    config = model.config
    if speculative not in (None, "mtp"):
        raise GenerationError(f"speculative must be None or 'mtp', got {speculative!r}")
    if speculative and model.model.mtp is None:
        raise GenerationError(
            "speculative decoding needs MTP weights (model.mtp.*), and this checkpoint has none "
            "(num_nextn_predict_layers = 0); generate without speculative='mtp'"
        )
    if num_draft_tokens < 1:
        raise GenerationError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = pad_prompts(input_ids, pad)
    if ids.shape[1] == 0:
        raise GenerationError("every prompt needs at least one token (an empty prompt was given)")
    if attention_mask is not None:
        ids, mask = left_aligned(ids, attention_mask, pad)
    rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
    longest = max(map(len, rows))
    if longest + max_new_tokens > config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = {longest + max_new_tokens} exceeds "
            f"the model's max_position_embeddings ({config.max_position_embeddings}); shorten one of them"
        )
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        raise GenerationError(f"prompt token ids must lie in [0, {config.vocab_size})")
    eos = None if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    try:
        sampling = SamplingParams(do_sample, temperature, top_k, top_p).validate()
    except ValueError as err:
        raise GenerationError(str(err)) from err
    B = len(rows)
    was_training = model.training
    try:
        engine = Engine(model, None, max_batch=B, max_queue=B, speculative=speculative == "mtp",
                        num_draft_tokens=num_draft_tokens, prefill_chunk=max(512, B * longest),
                        max_model_len=max(longest + max_new_tokens, 1), compile=compile)  # fmt: skip
    except EngineError as err:
        raise GenerationError(str(err)) from err
    model.train(was_training)  # the engine put it in eval mode; the stream does so only while it decodes
    base = RequestParams(max_tokens=max_new_tokens, sampling=sampling, stop_token_ids=eos)
    params = [base if seed is None else dataclasses.replace(base, seed=seed + b) for b in range(B)]
    stream = TokenStream(model, engine, rows, params, stats if stats is not None else GenerationStats())
    stream.input_ids, stream.attention_mask = ids.to(model.device), mask.to(model.device)
    return stream


def generate(
    model: LongcatForCausalLM,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stats: GenerationStats | None = None,
    **kwargs,
) -> torch.Tensor:
    """The prompt ids (left-padded [B, P]; right-padded rows come back left-padded) followed by the new
    tokens [B, n]; one speculatively decoded sequence comes back without its padding."""
    stream = stream_generate(model, input_ids, attention_mask, stats=stats, **kwargs)
    chunks = list(stream)
    ids, mask = stream.input_ids, stream.attention_mask
    if kwargs.get("speculative") == "mtp" and ids.shape[0] == 1:
        ids = ids[:, mask[0].bool()]
    return torch.cat((ids, *chunks), dim=1) if chunks else ids
