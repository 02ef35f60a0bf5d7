"""The engine's graph-ready steps and its one sampler: compiled whole (fullgraph) without recompiling as
sequences grow, one host read per engine step, and the batched sampler against a per-row reference."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config
from tests.op_counts import host_reads

from longcat import LongcatForCausalLM
from longcat.inference.penalties import Penalties
from longcat.inference.sampling import RowSettings, SamplingParams, choose, distribution
from longcat.model import tuning
from longcat.serving.engine import Engine, RequestParams

SAMPLED = SamplingParams(do_sample=True, temperature=0.8, top_k=30, top_p=0.9)


def _model(context: int) -> LongcatForCausalLM:
    model = LongcatForCausalLM(random_tiny_config(4, max_position_embeddings=context), seed=4).eval()
    perturb(model, 4)
    return model


def _requests(engine: Engine, count: int, max_tokens: int) -> list[list]:
    """A mix of greedy, sampled and penalised rows, so every part of the step is in the graph."""
    outs: list[list] = [[] for _ in range(count)]
    for i in range(count):
        params = RequestParams(max_tokens=max_tokens, ignore_eos=True, seed=i)
        if i % 2:
            params.sampling = SAMPLED
        if i == 2:
            params.penalties = Penalties(frequency=0.5, bias=((3, -100.0),))
        engine.submit([5 + i, 9, 2, 7][: 2 + i % 3], params, outs[i].append)
    return outs


@pytest.mark.parametrize("speculative", [False, True])
def test_compiled_steps_are_whole_graphs_that_never_recompile(speculative: bool) -> None:
    """fullgraph=True (a graph break raises), then 200 steps at one bucket with every recompilation
    refused: the key width is the whole slot, so growing sequences change no shape."""
    model = _model(640)
    engine = Engine(model, None, max_batch=4, speculative=speculative, num_draft_tokens=2, compile=True,
                    compile_backend="eager")  # fmt: skip
    outs = _requests(engine, 4, 620)
    while len(engine.running) < 4:
        engine.step()
    engine.step()  # the bucket's graph compiles here
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(200):
            engine.step()
    assert len(engine.running) == 4 and all(not o[-1].finish_reason for o in outs)
    assert min(len(r.output) for r in engine.running) > 200
    assert engine.cache.max_tokens == 768  # 640 + 2k + 2, rounded up to 256: one graph for many sizes


@pytest.mark.parametrize("speculative", [False, True])
def test_one_host_read_per_engine_step(speculative: bool, monkeypatch) -> None:
    """Whatever a step does (a prefill that ends while other rows decode, a decode step, a speculation
    round of greedy, sampled and penalised rows), the host reads the device once: the chosen tokens.
    The MoE takes its accelerator path, as on a GPU (the CPU's own path reads expert counts)."""
    monkeypatch.setattr(tuning, "ACCELERATOR_PATH", True)
    model = _model(160)
    engine = Engine(model, None, max_batch=4, speculative=speculative, num_draft_tokens=2, prefill_chunk=4)
    _requests(engine, 3, 40)
    engine.step()  # prefills the first group
    _requests(engine, 1, 40)  # a long prompt for chunked prefill, while three rows decode
    counts = []
    for _ in range(8):
        with host_reads() as reads:
            engine.step()
        counts.append(dict(reads))
    assert counts == [{"Tensor.tolist": 1}] * 8


def reference_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row, step by step: temperature, top-k over logits, softmax, min-p, top-p (logits [V])."""
    if not params.do_sample:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p is not None and params.top_p < 1:
        kept, mass = torch.zeros_like(probs), 0.0
        for index in probs.argsort(descending=True).tolist():
            if mass >= params.top_p:
                break
            kept[index], mass = probs[index], mass + float(probs[index])
        probs = kept / kept.sum()
    return probs


def test_batched_sampler_equals_the_per_row_reference() -> None:
    g = torch.Generator().manual_seed(0)
    sample = lambda **kw: SamplingParams(True, **kw)  # noqa: E731
    params = [SamplingParams(), sample(), SAMPLED, sample(top_k=1), sample(min_p=0.2, temperature=1.5)]
    params.append(sample(top_p=0.5))
    logits = torch.randn(len(params), 3, 50, generator=g) * 3
    rows = RowSettings.of(params, list(range(len(params))), 50, torch.device("cpu"), rows=8)
    padded = torch.cat((logits, torch.randn(2, 3, 50, generator=g)))
    got = distribution(padded, rows)
    for b, p in enumerate(params):
        for t in range(3):
            torch.testing.assert_close(got[b, t], reference_distribution(logits[b, t], p), rtol=1e-5, atol=1e-6)
    # each row's draw depends on its seed and position only, not on the rows beside it
    positions = torch.arange(3).expand(8, 3) + 10
    together = choose(padded, rows, positions)
    for b, p in enumerate(params):
        alone = RowSettings.of([p, SamplingParams(do_sample=True)], [b, 99], 50, torch.device("cpu"))
        assert torch.equal(choose(padded[[b, 0]], alone, positions[:2])[0], together[b])
    assert torch.equal(together[0], logits[0].argmax(-1)) and torch.equal(together[3], logits[3].argmax(-1))
    reseeded = RowSettings.of(params, [s + 100 for s in range(len(params))], 50, torch.device("cpu"), rows=8)
    assert not torch.equal(choose(padded, reseeded, positions)[1], together[1])
