"""`longcat bench decode`: batch-1 decoding speed at 128 and 1024 tokens of context, ours (latent cache,
absorbed MLA) against transformers' `generate` on the same weights, side by side; with a trained
checkpoint also MTP speculative decoding against plain decoding and the draft acceptance rate.

Decode speed is (N - 1) / (time for N new tokens - time for 1 new token): the prefill cancels out.
Ours is measured eager and with `compile=True` (torch.compile'd static-shape decode steps: CUDA graphs on
a GPU); transformers' generate runs as it ships (eager, its dynamic cache). The first compiled call's
extra time is reported as compile (and capture) seconds.

Concurrent decoding (`batches`, 16 and 64 by default): C requests of a 128-token prompt submitted to our
engine at once, against transformers' generate over the same C prompts as one batch; output tokens/s
over the whole run, prefill included, on both sides.
Without --checkpoint the model is a preset (`small` by default, `--set model.FIELD=VALUE` to change it)
with seeded random weights; `--device` and `--dtype` choose where and in what the weights decode.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..config import LongcatConfig
from ..model.lm import LongcatForCausalLM
from .common import machine, transformers_twin, transformers_version


def _best_time(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _decode_rates(generators: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """Tokens per second of decoding alone for each generate(prompt, n): (n - 1) over the median time of
    an n-token call less the median time of a one-token call (which holds the prefill). The sides take
    turns within every repeat, in an order that rotates, so drift in machine speed hits them alike."""
    names = list(generators)
    one: dict[str, list[float]] = {name: [] for name in names}
    full: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            for count, samples in ((1, one), (new_tokens, full)):
                start = time.perf_counter()
                generators[name](prompt, count)
                samples[name].append(time.perf_counter() - start)
    return {
        name: (new_tokens - 1) / max(statistics.median(full[name]) - statistics.median(one[name]), 1e-9)
        for name in names
    }


def _held_out_prompts(tokenizer, count: int, length: int) -> list[list[int]]:  # noqa: ANN001
    """Openings of validation documents of the embedded corpus (held out from `longcat train`)."""
    from ..data.corpus import embedded_documents
    from ..data.prepare import split_documents

    _, val = split_documents(list(embedded_documents()), 0.02)
    prompts = []
    for domain_docs in val.values():
        for doc in domain_docs[: count // len(val)]:
            ids = tokenizer.encode(doc.text)[:length]
            if len(ids) >= 8:
                prompts.append(ids)
    return prompts


def run(
    checkpoint: str | None = None,
    contexts: tuple[int, ...] = (128, 1024),
    new_tokens: int = 64,
    repeats: int = 3,
    spec_prompts: int = 32,
    draft_tokens: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    preset: str = "small",
    overrides: dict | None = None,
    batches: tuple[int, ...] = (16, 64),
    batch_prompt: int = 128,
) -> dict:
    """Without a checkpoint the model is `preset` with `overrides` (model fields) and seeded random
    weights; either way it decodes on `device` with weights in `dtype` (transformers' twin too)."""
    weights = getattr(torch, dtype)
    if checkpoint:
        model = LongcatForCausalLM.from_pretrained(checkpoint, device=device, dtype=weights).eval()
    else:
        overrides = {"max_position_embeddings": max(contexts) + new_tokens + 8, **(overrides or {})}
        config = LongcatConfig.from_preset(preset, **overrides)
        model = LongcatForCausalLM(config, seed=0, device=device, dtype=weights).eval()
    V = model.config.vocab_size
    result: dict = {
        "preset": None if checkpoint else preset,
        "overrides": {} if checkpoint else overrides,
        "dtype": dtype,
        "checkpoint": checkpoint,
        "new_tokens": new_tokens,
        "transformers": transformers_version(),
        "machine": machine(),
        "tokens_per_s": {},
    }
    ours = lambda prompt, n: model.generate(prompt, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    ours_compiled = lambda prompt, n: model.generate(prompt, max_new_tokens=n, eos_token_id=[], compile=True)  # noqa: E731
    twin = transformers_twin(model).eval() if result["transformers"] is not None else None
    if twin is not None:

        def theirs(prompt: torch.Tensor, n: int) -> torch.Tensor:
            with torch.inference_mode():  # as ours decodes
                return twin.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    for context in contexts:
        if context + new_tokens > model.config.max_position_embeddings:
            continue
        prompt = torch.randint(3, V, (1, context), generator=torch.Generator().manual_seed(context)).to(model.device)
        calls = []
        for _ in range(2):  # compile outside the timing; the first call's extra time is the compilation
            start = time.perf_counter()
            ours_compiled(prompt, new_tokens)
            calls.append(time.perf_counter() - start)
        sides = {"longcat": ours, "longcat_compiled": ours_compiled}
        if twin is not None:
            sides["transformers"] = theirs
        rates = _decode_rates(sides, prompt, new_tokens, repeats)
        if twin is not None:
            reference = theirs(prompt, new_tokens)
            same = torch.equal(ours(prompt, new_tokens), reference) and torch.equal(
                ours_compiled(prompt, new_tokens), reference
            )
            result[f"same_greedy_output_{context}"] = same
            result[f"speedup_vs_transformers_{context}"] = rates["longcat_compiled"] / rates["transformers"]
            result[f"speedup_vs_transformers_{context}_eager"] = rates["longcat"] / rates["transformers"]
        result["tokens_per_s"][str(context)] = rates
        result.setdefault("compile_s", {})[str(context)] = max(calls[0] - calls[1], 0.0)
    for clients in batches:
        if batch_prompt + new_tokens <= model.config.max_position_embeddings:
            result.setdefault("concurrent", {})[str(clients)] = _concurrent(model, twin, clients, batch_prompt,
                                                                            new_tokens)  # fmt: skip
    if checkpoint and model.model.mtp is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        result.update(_speculative(model, checkpoint, new_tokens, spec_prompts, draft_tokens, repeats))
    return result


def _concurrent(model, twin, clients: int, prompt_tokens: int, new_tokens: int) -> dict:  # noqa: ANN001
    """Output tokens/s of `clients` requests decoded together: our engine (eager, then compiled: its
    first run includes compiling the bucket) against transformers' batched generate."""
    from ..serving.engine import Engine, RequestParams

    g = torch.Generator().manual_seed(clients)
    prompts = torch.randint(3, model.config.vocab_size, (clients, prompt_tokens), generator=g)

    def engine_run(compile: bool) -> float:
        engine = Engine(model, None, max_batch=clients, max_queue=clients, prefill_chunk=clients * prompt_tokens,
                        max_model_len=prompt_tokens + new_tokens, compile=compile)  # fmt: skip
        done: list = []
        start = time.perf_counter()
        for row in prompts.tolist():
            engine.submit(row, RequestParams(max_tokens=new_tokens, ignore_eos=True),
                          lambda out: out.finish_reason and done.append(out))  # fmt: skip
        while len(done) < clients:
            engine.step()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    tokens = clients * new_tokens
    out: dict = {"longcat": tokens / engine_run(False)}
    first = engine_run(True)
    again = engine_run(True)
    out["longcat_compiled"], out["compile_s"] = tokens / again, max(first - again, 0.0)
    if twin is not None:
        ids = prompts.to(model.device)
        with torch.inference_mode():
            start = time.perf_counter()
            twin.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
            out["transformers"] = tokens / (time.perf_counter() - start)
        out["speedup_vs_transformers"] = out["longcat_compiled"] / out["transformers"]
    return out


def _speculative(model, checkpoint: str, new_tokens: int, count: int, draft_tokens: int, repeats: int) -> dict:  # noqa: ANN001
    """Plain vs MTP speculative greedy decoding over held-out prompts: same output, acceptance, speed."""
    from ..inference.chat import CheckpointTokenizer
    from ..inference.generate import GenerationStats

    tokenizer = CheckpointTokenizer(checkpoint)
    prompts = _held_out_prompts(tokenizer, count, 32)
    stats = GenerationStats()
    plain = {"max_new_tokens": new_tokens, "eos_token_id": []}
    variants = {
        "plain": plain,
        "spec": {**plain, "speculative": "mtp", "num_draft_tokens": draft_tokens},
        "plain_compiled": {**plain, "compile": True},
        "spec_compiled": {**plain, "speculative": "mtp", "num_draft_tokens": draft_tokens, "compile": True},
    }
    for kwargs in variants.values():  # compile outside the timing
        model.generate([prompts[0]], **kwargs)
    seconds = dict.fromkeys(variants, 0.0)
    identical = True
    for prompt in prompts:
        outputs: dict[str, torch.Tensor] = {}
        for name, kwargs in variants.items():
            seconds[name] += _best_time(
                lambda p=prompt, k=kwargs, n=name, o=outputs: o.__setitem__(n, model.generate([p], **k)), repeats
            )
        model.generate([prompt], stats=stats, **variants["spec"])
        identical &= all(torch.equal(outputs["plain"], out) for out in outputs.values())
    tokens = len(prompts) * new_tokens
    return {
        "speculative_prompts": len(prompts),
        "draft_tokens": draft_tokens,
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_main_forward": stats.tokens_per_forward,
        "plain_tokens_per_s": tokens / seconds["plain"],
        "speculative_tokens_per_s": tokens / seconds["spec"],
        "speculative_speedup": seconds["plain"] / seconds["spec"],
        "plain_compiled_tokens_per_s": tokens / seconds["plain_compiled"],
        "speculative_compiled_tokens_per_s": tokens / seconds["spec_compiled"],
        "speculative_speedup_compiled": seconds["plain_compiled"] / seconds["spec_compiled"],
        "speculative_output_identical": identical,
    }


def report(result: dict) -> str:
    what = f"checkpoint {result['checkpoint']}" if result["checkpoint"] else f"preset {result['preset']}"
    if result.get("overrides"):
        what += " with " + ", ".join(f"{k}={v}" for k, v in result["overrides"].items())
    lines = [f"Batch-1 greedy decoding, {what}, {result['dtype']} weights"]
    for context, rates in result["tokens_per_s"].items():
        line = (
            f"  context {context:>5}: longcat {rates['longcat']:7.1f} tokens/s eager, "
            f"{rates['longcat_compiled']:7.1f} compiled"
        )
        if "transformers" in rates:
            line += (
                f" | transformers {rates['transformers']:7.1f} | speed-up "
                f"{result[f'speedup_vs_transformers_{context}_eager']:.2f}x eager, "
                f"{result[f'speedup_vs_transformers_{context}']:.2f}x compiled"
                f" | same output: {result[f'same_greedy_output_{context}']}"
            )
        lines.append(line)
    for context, seconds in result.get("compile_s", {}).items():
        lines.append(f"  compiling (and capturing) the batch-1 decode step at context {context}: {seconds:.1f} s")
    for clients, rates in result.get("concurrent", {}).items():
        line = (f"  {clients:>3} concurrent requests: longcat {rates['longcat']:8.1f} tokens/s eager, "
                f"{rates['longcat_compiled']:8.1f} compiled (compiling {rates['compile_s']:.1f} s)")  # fmt: skip
        if "transformers" in rates:
            line += f" | transformers {rates['transformers']:8.1f} | speed-up {rates['speedup_vs_transformers']:.2f}x"
        lines.append(line)
    if "acceptance_rate" in result:
        lines.append(
            f"  MTP speculative ({result['draft_tokens']} draft token(s), {result['speculative_prompts']} held-out "
            f"prompts): acceptance {result['acceptance_rate']:.1%}, {result['tokens_per_main_forward']:.2f} tokens "
            f"per main forward, {result['speculative_tokens_per_s']:.1f} vs {result['plain_tokens_per_s']:.1f} "
            f"tokens/s plain: {result['speculative_speedup']:.2f}x eager; compiled "
            f"{result['speculative_compiled_tokens_per_s']:.1f} vs {result['plain_compiled_tokens_per_s']:.1f}: "
            f"{result['speculative_speedup_compiled']:.2f}x "
            f"(identical output: {result['speculative_output_identical']})"
        )
    m = result["machine"]
    lines.append(f"{m['date']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['device']}")
    return "\n".join(lines)
