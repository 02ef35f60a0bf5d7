"""Generation with the latent KV cache: prefill on the naive MLA path, decode on the absorbed one.

`stream_generate` yields new tokens as they are chosen; `generate` collects them and returns the ids
including the prompt (the Hugging Face convention). Prompts of different lengths are left-padded;
rows that reach an end-of-sequence token are padded from then on. MTP speculative decoding
(`speculative="mtp"`) lives in speculative.py and is reached through the same two functions.

Legend: B batch, P prompt tokens, V vocabulary, H hidden.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model import tuning
from ..model.lm import LongcatForCausalLM, build_attention_mask
from .kv_cache import LatentCache, decode_mask
from .sampling import SamplingParams, select


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


@dataclass
class GenerationRequest:
    input_ids: torch.Tensor  # [B, P] left-padded
    attention_mask: torch.Tensor  # [B, P]
    max_new_tokens: int
    sampling: SamplingParams
    eos_token_ids: list[int]
    pad_token_id: int
    generator: torch.Generator | None
    stats: GenerationStats = field(default_factory=GenerationStats)
    compile: bool = False  # decode with torch.compile'd static-shape steps (CompiledDecoder)

    def cache_tokens(self, needed: int) -> int:
        """Cache length: exact in eager mode; rounded up to 256 when compiled, so one compiled graph
        serves many request sizes."""
        return -(-needed // 256) * 256 if self.compile else needed

    def decoder(self, model: LongcatForCausalLM):  # noqa: ANN201 - a decode-step callable
        if not self.compile:

            def eager(tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache):  # noqa: ANN202
                normed = decode_step(model, tokens, positions, cache)
                return normed, lm_logits(model, normed)

            return eager
        decoder = _COMPILED.get(model)
        if decoder is None or decoder.weights_version != weights_version(model):
            decoder = _COMPILED[model] = CompiledDecoder(model)
        return decoder


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
    """ids and attention_mask [B, P] with every row ending in a token, the layout decoding needs: a
    right-padded row, as tokenizers often produce, would otherwise continue from a pad. Such a row is
    rotated so that its last token lands in the last column; masked positions inside a row stay masked."""
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


def build_request(
    model: LongcatForCausalLM,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | list[int] | None,
    seed: int | None,
) -> GenerationRequest:
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids, mask = pad_prompts(input_ids, pad)  # token lists are checked for emptiness there
    if ids.shape[1] == 0:
        raise GenerationError("every prompt needs at least one token (an empty prompt was given)")
    if attention_mask is not None:
        ids, mask = left_aligned(ids, attention_mask, pad)
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
    total = int(mask.sum(-1).max()) + max_new_tokens
    if total > config.max_position_embeddings:
        raise GenerationError(
            f"prompt ({int(mask.sum(-1).max())} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_position_embeddings ({config.max_position_embeddings}); shorten one of them"
        )
    if int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
        raise GenerationError(f"prompt token ids must lie in [0, {config.vocab_size})")
    eos = (
        config.eos_token_ids
        if eos_token_id is None
        else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    try:
        sampling = SamplingParams(do_sample, temperature, top_k, top_p).validate()
    except ValueError as err:
        raise GenerationError(str(err)) from err
    device = model.device
    return GenerationRequest(ids.to(device), mask.to(device), max_new_tokens, sampling, eos, pad, generator)


@torch.inference_mode()
def prefill(
    model: LongcatForCausalLM, ids: torch.Tensor, mask: torch.Tensor, cache: LatentCache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt through the model on the naive path, filling the cache.
    Returns normed hidden states [B, P, H] and each row's next position [B]."""
    P = ids.shape[1]
    cache.reserve(P, mask.bool())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    attn = build_attention_mask(mask, None, P, ids.device)
    hidden, _ = model.model(ids, positions, attn, cache, 0)
    return model.model.norm(hidden), mask.sum(-1)


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


@torch.inference_mode()
def decode_step(
    model: LongcatForCausalLM, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache
) -> torch.Tensor:
    """tokens [B, T] at positions [B, T] after the cached ones -> normed hidden [B, T, H] (absorbed MLA)."""
    start, _ = cache.reserve(tokens.shape[1])
    hidden, _ = model.model(tokens, positions, decode_mask(cache, start, tokens.shape[1]), cache, start)
    return model.model.norm(hidden)


@torch.inference_mode()
def stream_plain(model: LongcatForCausalLM, request: GenerationRequest) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, [B], until max_new_tokens or every row has ended."""
    ids, mask, stats = request.input_ids, request.attention_mask, request.stats
    B = ids.shape[0]
    stats.prompt_tokens = int(mask.sum())
    if request.max_new_tokens == 0:
        return
    cache = LatentCache(
        model.config, B, request.cache_tokens(ids.shape[1] + request.max_new_tokens), model.device, model.dtype
    )
    step_fn = request.decoder(model)
    normed, positions = prefill(model, ids, mask, cache)
    logits = lm_logits(model, normed[:, -1])  # [B, V]
    eos = torch.tensor(request.eos_token_ids, device=ids.device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    alive = B  # rows still generating; read from the device once per step
    for step in range(request.max_new_tokens):
        token = select(logits, request.sampling, request.generator)
        token = torch.where(finished, request.pad_token_id, token)
        stats.new_tokens += alive
        yield token
        finished |= torch.isin(token, eos)
        alive = int((~finished).sum())
        if step == request.max_new_tokens - 1 or alive == 0:
            return
        _, logits = step_fn(token[:, None], positions[:, None], cache)
        stats.main_forwards += 1
        positions = positions + 1
        logits = logits[:, -1]


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
) -> Iterator[torch.Tensor]:
    """Yields new tokens [B, n] as they are chosen (n = 1 per step; up to num_draft_tokens + 1 per
    main-model forward with speculative="mtp"). eos_token_id None uses the config's; [] never stops early.
    A bad request raises here, before the first token is asked for."""
    if speculative not in (None, "mtp"):
        raise GenerationError(f"speculative must be None or 'mtp', got {speculative!r}")
    request = build_request(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                            top_p, eos_token_id, seed)  # fmt: skip
    if stats is not None:
        request.stats = stats
    request.compile = compile
    return TokenStream(request, _chunks(model, request, speculative, num_draft_tokens))


class TokenStream:
    """The iterator stream_generate returns: new tokens [B, n] as they are chosen. `request` holds the
    prompt as it is decoded (left-aligned ids and mask on the model's device)."""

    def __init__(self, request: GenerationRequest, chunks: Iterator[torch.Tensor]) -> None:
        self.request, self._chunks = request, chunks

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._chunks)

    def close(self) -> None:
        """Stop early: restores the model's training mode now rather than when collected."""
        self._chunks.close()


def _chunks(
    model: LongcatForCausalLM, request: GenerationRequest, speculative: str | None, num_draft_tokens: int
) -> Iterator[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        if speculative == "mtp":
            from .speculative import stream_speculative

            for chunk in stream_speculative(model, request, num_draft_tokens):
                yield chunk.clone()  # decoding runs in inference mode; hand out ordinary tensors
        else:
            for token in stream_plain(model, request):
                yield token[:, None].clone()
    finally:
        model.train(was_training)


def generate(
    model: LongcatForCausalLM,
    input_ids: Sequence[Sequence[int]] | torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stats: GenerationStats | None = None,
    **kwargs,
) -> torch.Tensor:
    """The prompt ids (left-padded [B, P]; right-padded rows come back left-padded) followed by the new
    tokens [B, n]."""
    stream = stream_generate(model, input_ids, attention_mask, stats=stats, **kwargs)
    chunks = list(stream)
    ids, mask = stream.request.input_ids, stream.request.attention_mask
    if kwargs.get("speculative") == "mtp":  # one sequence, decoded without its padding
        ids = ids[:, mask[0].bool()]
    return torch.cat((ids, *chunks), dim=1) if chunks else ids


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever any parameter or buffer is modified in place (an optimizer step, a load) or
    replaced (`model.to(dtype or device)`): a compiled decoder that froze the old weights is then rebuilt."""
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def _decoding_copy(model: LongcatForCausalLM, transpose_linear: bool) -> LongcatForCausalLM:
    """A copy of `model`'s modules for a compiled decoder, sharing its tensors, so that the decoder (kept
    in a cache weakly keyed by the model) does not keep the model itself alive. With transpose_linear
    every nn.Linear weight instead holds the same values in transposed storage (a [out, in] view of a
    contiguous [in, out] tensor)."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} if transpose_linear else set()
    memo = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in linear}
    shadow = copy.deepcopy(model, memo)
    if transpose_linear:
        for module in shadow.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
    return shadow.eval()


def _cpu_compile_options() -> dict:
    """Inductor options for decoding on the CPU. Besides freezing and the C++ wrapper: the GEMMs of a
    few-row step (x [T <= tuning.FEW_ROWS, in] @ W) become Inductor's own fused multiply-and-sum loops
    instead of library calls, since a small-M library GEMM has a fixed cost per call and the loops fuse
    with their neighbours (why and how much: model/tuning.py, docs/benchmarks.md). The pass is
    Inductor's `decompose_mm_pass`, which on the CPU takes only one-row GEMMs unless its module-level
    limit is raised; that limit is read only by the pass, which runs only where it is asked for, as
    here. Torch builds without it keep the library calls."""
    options = {"freezing": True, "cpp_wrapper": True}
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_module
    except ImportError:
        return options
    limit = getattr(pass_module, "cpu_max_first_dimension_decomposition", None)
    if isinstance(limit, int):
        pass_module.cpu_max_first_dimension_decomposition = max(limit, tuning.FEW_ROWS)
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
    return options


class CompiledDecoder:
    """torch.compile'd decode steps over a static-shape cache (gpt-fast style): every step attends over the
    whole preallocated cache under a mask, writes at tensor positions, and runs the MoE on its
    static-shape path, so each distinct step width compiles once. Decoding at batch 1 is bound by
    per-operator overhead, which the compiled graph removes.

    On the CPU four more things (their effect is measured in docs/benchmarks.md, "Decode"): Inductor
    freezes the weights (constant folding) and calls its kernels from a generated C++ wrapper instead
    of Python; steps of up to tuning.FEW_ROWS tokens compute their GEMMs as fused loops
    (`_cpu_compile_options`); and the decoder runs a copy of the model whose linear weights are stored
    transposed, since a one-row GEMM (x [1, in] @ W^T) streams a contiguous [in, out] matrix faster
    than an [out, in] one. That copy and the frozen constants are a snapshot, so the decoder is
    rebuilt when any weight changes (see `weights_version`)."""

    def __init__(self, model: LongcatForCausalLM) -> None:
        self.weights_version = weights_version(model)
        on_cpu = model.device.type == "cpu"
        self.model = _decoding_copy(model, transpose_linear=on_cpu)
        self.options = _cpu_compile_options() if on_cpu else {}
        self._step = torch.compile(self._forward, dynamic=False, options=self.options)
        self._mtp_step = torch.compile(self._mtp_forward, dynamic=False, options=self.options)
        self.fused_rounds: dict = {}  # draft count -> speculative.FusedGreedyRound

    def _mtp_forward(self, next_ids, hidden, cache_positions, cache):  # noqa: ANN001, ANN202
        from .kv_cache import static_decode_mask

        mask = static_decode_mask(cache, cache_positions)
        cos, sin = self.model.model.rotary_emb(cache_positions[None], hidden.dtype)
        return self.model.model.mtp(next_ids, hidden, cos, sin, mask, cache, cache_positions)

    @torch.inference_mode()
    def mtp(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache: LatentCache) -> torch.Tensor:
        """The MTP layer over T pairs after its cached ones (never the first, prefill call)."""
        start, end = cache.reserve(next_ids.shape[1])
        return self._mtp_step(next_ids, hidden, torch.arange(start, end, device=next_ids.device), cache)

    def _forward(self, tokens, positions, cache_positions, cache):  # noqa: ANN001, ANN202
        from .kv_cache import static_decode_mask

        mask = static_decode_mask(cache, cache_positions)
        hidden, _ = self.model.model(tokens, positions, mask, cache, cache_positions)
        normed = self.model.model.norm(hidden)
        return normed, self.model.lm_head(normed)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: LatentCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> normed hidden states [B, T, H] and logits [B, T, V]."""
        start, end = cache.reserve(tokens.shape[1])
        cache_positions = torch.arange(start, end, device=tokens.device)
        return self._step(tokens, positions, cache_positions, cache)
