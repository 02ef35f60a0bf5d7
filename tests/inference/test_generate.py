"""The latent cache, absorbed decode, generation and MTP speculative decoding against slow references."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM
from longcat.inference.generate import GenerationError, GenerationStats
from longcat.inference.kv_cache import LatentCache, Rows
from longcat.inference.steps import forward_rows
from longcat.model.attention import MLA


def _model(seed: int = 0, **overrides) -> LongcatForCausalLM:
    model = LongcatForCausalLM(random_tiny_config(seed, max_position_embeddings=64, **overrides), seed=seed).eval()
    perturb(model, seed)
    return model


@pytest.mark.parametrize("split", [1, 5, 11])
def test_cached_logits_equal_uncached_across_splits(split: int) -> None:
    """A fresh prefill (naive attention), then uneven chunks on the absorbed path, eagerly (keys up to the
    longest row) and graph-ready (the whole slot, positions as a tensor): the logits of one full forward."""
    model = _model(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(split))
    with torch.no_grad():
        full = model(ids).logits
        for static in (False, True):
            cache = LatentCache(model.config, 2, 20, "cpu", torch.float32)
            pieces, t = [], 0
            while t < 14:  # the prompt, then 1 token, then 3 at a time
                n = split if t == 0 else 1 if t == split else 3
                chunk = ids[:, t : t + n]
                rows = cache.rows(0, 2, chunk.shape[1])
                if static and t > 0:
                    rows = Rows(*cache.tensors, 0, rows.positions, cache.max_tokens)
                pieces.append(model.lm_head(forward_rows(model, rows, chunk)))
                cache.advance(0, [chunk.shape[1]] * 2)
                t += chunk.shape[1]
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    assert (
        cache.nbytes
        == 2 * model.config.num_layers * 2 * 20 * (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * 4
    )


def test_absorbed_equals_naive_attention() -> None:
    config = random_tiny_config(2)
    torch.manual_seed(0)
    mla = MLA(config)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.3)
    from longcat.model.norm_rope import RotaryEmbedding

    rope = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)
    rope.reset_parameters()
    x = torch.randn(2, 9, config.hidden_size)
    cos, sin = rope(torch.arange(9).expand(2, 9), torch.float32)
    q_nope, q_rope = mla.query(x, cos, sin)
    latent, k_rope = mla.latent(x, cos, sin)
    with torch.no_grad():
        naive = mla.naive(q_nope, q_rope, latent, k_rope, None)
        absorbed = mla.absorbed(q_nope, q_rope, latent, k_rope, None)
    torch.testing.assert_close(absorbed, naive, rtol=1e-4, atol=1e-5)


def _greedy_reference(model: LongcatForCausalLM, ids: list[int], steps: int) -> list[int]:
    """Re-run the whole sequence without a cache for every new token."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq


def test_greedy_generation_matches_uncached_reference_and_batches() -> None:
    model = _model(3)
    prompts = [[5, 9, 2, 7, 11], [4, 8]]
    out = model.generate(prompts, max_new_tokens=8, eos_token_id=[])
    assert out.shape == (2, 5 + 8)
    for row, prompt in enumerate(prompts):
        expected = _greedy_reference(model, prompt, 8)
        assert out[row, 5 - len(prompt) :].tolist() == expected


def test_eos_stops_and_pads() -> None:
    """A row that emits EOS keeps it and is padded from then on; the other row decodes as it would alone;
    decoding ends when every row has finished (or at max_new_tokens)."""
    model = _model(4)
    prompts = [[3, 6, 9], [7, 6]]
    free = [model.generate([p], max_new_tokens=6, eos_token_id=[])[0, len(p) :].tolist() for p in prompts]
    stop = free[0][2]
    pad = 17
    model.config.pad_token_id = pad
    out = model.generate(prompts, max_new_tokens=6, eos_token_id=stop)
    ends = [row.index(stop) + 1 if stop in row else 6 for row in free]
    assert out.shape == (2, 3 + max(ends))
    for row, (tokens, end) in enumerate(zip(free, ends)):
        new = out[row, 3:].tolist()
        assert new[:end] == tokens[:end]
        assert new[end:] == [pad] * (len(new) - end)
    assert ends[0] <= 3 and out[0, 3 + ends[0] - 1] == stop


@pytest.mark.parametrize("drafts", [1, 3])
def test_greedy_speculative_equals_plain_greedy(drafts: int) -> None:
    model = _model(5)
    prompt = [7, 1, 8, 2, 8, 1, 8]
    plain = model.generate([prompt], max_new_tokens=20, eos_token_id=[])
    stats = GenerationStats()
    spec = model.generate([prompt], max_new_tokens=20, eos_token_id=[], speculative="mtp", num_draft_tokens=drafts,
                          stats=stats)  # fmt: skip
    assert torch.equal(spec, plain)
    assert stats.new_tokens == 20 and stats.drafted > 0 and stats.main_forwards < 20
    if drafts == 1:  # acceptance against the slow reference: the MTP head run over the final sequence
        seq = model.generate([prompt], max_new_tokens=23, eos_token_id=[])[0].tolist()
        with torch.no_grad():
            draft_of = model(torch.tensor([seq]), return_mtp=True).mtp_logits[0].argmax(-1)  # [i]: token i + 2
        m, emitted, forwards, accepted = len(prompt), 1, 0, 0  # m: the chosen token not yet in the cache
        while emitted < 20:
            hit = int(draft_of[m - 1]) == seq[m + 1]
            forwards, accepted, emitted, m = forwards + 1, accepted + hit, emitted + 1 + hit, m + 1 + hit
        assert (stats.main_forwards, stats.accepted) == (forwards, accepted) and accepted > 0


@pytest.mark.slow
def test_compiled_decoding_matches_eager() -> None:
    model = _model(5)
    prompt = [7, 1, 8, 2, 8, 1, 8]
    eager = model.generate([prompt], max_new_tokens=12, eos_token_id=[])
    assert torch.equal(model.generate([prompt], max_new_tokens=12, eos_token_id=[], compile=True), eager)
    # a left-padded batch: the static cache's key mask keeps the pads out
    batch = [[5, 9, 2, 7, 11], [4, 8]]
    assert torch.equal(
        model.generate(batch, max_new_tokens=6, eos_token_id=[], compile=True),
        model.generate(batch, max_new_tokens=6, eos_token_id=[]),
    )
    # greedy speculation compiles one graph per round; two drafts also chain through the MTP layer, and
    # accepted drafts leave several pending pairs for the next round: same rounds as the eager loop
    stats, eager_stats = GenerationStats(), GenerationStats()
    kwargs = dict(max_new_tokens=12, eos_token_id=[], speculative="mtp", num_draft_tokens=2)
    spec = model.generate([prompt], compile=True, stats=stats, **kwargs)
    assert torch.equal(spec, eager) and torch.equal(model.generate([prompt], stats=eager_stats, **kwargs), eager)
    assert stats.drafted == 2 * stats.main_forwards and stats.new_tokens == 12
    assert (stats.main_forwards, stats.accepted) == (eager_stats.main_forwards, eager_stats.accepted)
    assert stats.accepted > 0


@pytest.mark.slow
def test_compiled_cpu_decoder_fuses_few_row_gemms() -> None:
    """The CPU decode options rewrite GEMMs of up to FEW_ROWS rows into Inductor loops (not library
    calls), and the rewritten product equals the plain one."""
    from torch._dynamo.utils import counters

    from longcat.inference.compiled import _cpu_compile_options
    from longcat.model.tuning import FEW_ROWS

    options = _cpu_compile_options()
    if "post_grad_fusion_options" not in options:
        pytest.skip("this torch build has no Inductor decompose_mm_pass")
    weight = torch.randn(40, 24)  # [in, out] contiguous: W^T as the decoder's transposed-storage copy holds it
    x = torch.randn(FEW_ROWS, 40)
    before = counters["inductor"]["decompose_mm"]
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(lambda a, b: torch.relu(a @ b), dynamic=False, options=options)(x, weight)
    assert counters["inductor"]["decompose_mm"] > before
    torch.testing.assert_close(out, torch.relu(x @ weight), rtol=1e-5, atol=1e-5)


def test_compiled_decoder_copy_and_rebuild_on_weight_change() -> None:
    """The compiled steps run a transposed-storage copy of the linear weights, sharing everything
    else, and are rebuilt (not reused with stale frozen weights) once any weight changes in place."""
    from longcat.inference.compiled import compiled_steps, decoding_copy

    model = _model(4)
    copy = decoding_copy(model, transpose_linear=True)
    for (name, ours), theirs in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(ours, theirs), name
        if "proj" in name and ours.ndim == 2:
            assert theirs.t().is_contiguous() and theirs.data_ptr() != ours.data_ptr(), name
        elif ours.ndim == 3:
            assert theirs is ours, name
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    first = compiled_steps(model)
    assert compiled_steps(model) is first
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert compiled_steps(model) is not first


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = _model(6)
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, eos_token_id=[])
    a = model.generate([[1, 2, 3]], seed=11, **kwargs)
    b = model.generate([[1, 2, 3]], seed=11, **kwargs)
    c = model.generate([[1, 2, 3]], seed=12, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    s1 = model.generate([[1, 2, 3]], seed=3, speculative="mtp", num_draft_tokens=2, **kwargs)
    s2 = model.generate([[1, 2, 3]], seed=3, speculative="mtp", num_draft_tokens=2, **kwargs)
    assert torch.equal(s1, s2)


def test_sampling_with_top_k_1_is_greedy_plain_and_speculative() -> None:
    """A one-token nucleus leaves nothing to chance: the sampled paths (the speculative one through its
    rejection rule, drafting by sampling) must then give exactly the greedy output."""
    model = _model(5)
    prompt = [7, 1, 8, 2, 8, 1, 8]
    greedy = model.generate([prompt], max_new_tokens=16, eos_token_id=[])
    sampled = dict(max_new_tokens=16, eos_token_id=[], do_sample=True, top_k=1, seed=0)
    assert torch.equal(model.generate([prompt], **sampled), greedy)
    stats = GenerationStats()
    spec = model.generate([prompt], speculative="mtp", num_draft_tokens=2, stats=stats, **sampled)
    assert torch.equal(spec, greedy) and stats.accepted > 0


@pytest.mark.slow
def test_sampled_decoding_follows_the_model_distribution() -> None:
    """End to end over a 6-token vocabulary: the first two sampled tokens, plain and speculative
    (drafts sampled from the MTP head, then the rejection rule), against the exact pair distribution
    p(a) p(b | a) from uncached forwards. Seeds are fixed, so the empirical frequencies are too."""
    import collections

    model = LongcatForCausalLM(random_tiny_config(7, vocab_size=6), seed=7).eval()
    perturb(model, 7)
    prompt, n = [1, 2, 3], 1500
    with torch.no_grad():
        first = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        exact = {
            (a, b): float(first[a] * p_b)
            for a in range(6)
            for b, p_b in enumerate(model(torch.tensor([[*prompt, a]])).logits[0, -1].softmax(-1))
        }
    for kwargs in ({}, {"speculative": "mtp"}):
        counts = collections.Counter(
            tuple(
                model.generate([prompt], max_new_tokens=2, eos_token_id=[], do_sample=True, seed=s, **kwargs)[
                    0, 3:
                ].tolist()
            )
            for s in range(n)
        )
        distance = 0.5 * sum(abs(counts[pair] / n - p) for pair, p in exact.items())
        assert distance < 0.12, (kwargs, distance)  # sampling noise ~0.045; drafting by argmax gives ~0.23


def test_rejection_rule_keeps_the_main_distribution() -> None:
    """Draft d ~ q, accept with min(1, p(d)/q(d)), else draw from normalise(max(p - q, 0)): the emitted
    token follows p, however far q is from it. 20000 rows, each its own seed, in one batched call."""
    from longcat.inference.sampling import DRAFT, RowSettings, SamplingParams, accept, draw

    g = torch.Generator().manual_seed(0)
    target = (torch.randn(2, 6, generator=g) * 2).softmax(-1)  # p at the draft's position, then after it
    q = torch.softmax(torch.randn(6, generator=g) * 2, -1)
    p = target[0]
    assert 0.5 * (p - q).abs().sum() > 0.3
    n = 20000
    rows = RowSettings.of([SamplingParams(do_sample=True)] * n, list(range(n)), 6, torch.device("cpu"))
    positions = torch.arange(2).expand(n, 2) + 7
    drafts = draw(q.expand(n, 1, 6), rows.seed, positions[:, :1], DRAFT)  # [n, 1]
    accepted, following = accept(target.expand(n, 2, 6), q.expand(n, 1, 6), drafts, rows, positions)
    emitted = torch.where(accepted == 1, drafts[:, 0], following)
    assert 0.5 * (torch.bincount(emitted, minlength=6) / n - p).abs().sum() < 0.02
    assert 0.5 * (torch.bincount(drafts[:, 0], minlength=6) / n - q).abs().sum() < 0.02
    # one-hot (greedy) distributions: accepted exactly while the argmaxes agree, then the main argmax
    one_hot = torch.eye(6)
    best = int(p.argmax())
    greedy = RowSettings.of([SamplingParams()], [0], 6, torch.device("cpu"))
    for draft, expected in ((best, (1, int(target[1].argmax()))), ((best + 1) % 6, (0, best))):
        got = accept(one_hot[target.argmax(-1)][None], one_hot[[draft]][None], torch.tensor([[draft]]), greedy,
                     positions[:1])  # fmt: skip
        assert (int(got[0][0]), int(got[1][0])) == expected


def test_bad_requests_are_named() -> None:
    model = _model(8)
    with pytest.raises(GenerationError, match="empty prompt"):
        model.generate([[]], max_new_tokens=2)
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        model.generate([[1, 2, 3]], max_new_tokens=100)
    no_mtp = _model(9, num_nextn_predict_layers=0)
    with pytest.raises(GenerationError, match="MTP weights"):
        no_mtp.generate([[1, 2]], max_new_tokens=2, speculative="mtp")
    # a batch decodes speculatively as its rows do plainly
    batch = [[1, 2], [3, 4, 5, 6]]
    plain = model.generate(batch, max_new_tokens=9, eos_token_id=[])
    assert torch.equal(model.generate(batch, max_new_tokens=9, eos_token_id=[], speculative="mtp", num_draft_tokens=2),
                       plain)  # fmt: skip


def test_right_padded_prompts_decode_as_left_padded_ones() -> None:
    """Tokenizers often pad on the right; decoding must not continue from the pads."""
    model = _model(8)
    prompts = [[5, 9, 2, 7, 11], [4, 8]]
    left = model.generate(prompts, max_new_tokens=4, eos_token_id=[])
    ids = torch.tensor([[5, 9, 2, 7, 11], [4, 8, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), left)
    # masked positions inside a right-padded row stay masked: it decodes as the same row shifted right
    gapped = model.generate(
        torch.tensor([[5, 9, 2, 7, 11], [4, 8, 6, 0, 0]]), attention_mask=torch.tensor([[1] * 5, [1, 0, 1, 0, 0]]),
        max_new_tokens=3, eos_token_id=[],
    )  # fmt: skip
    shifted = model.generate(
        torch.tensor([[5, 9, 2, 7, 11], [0, 0, 4, 8, 6]]), attention_mask=torch.tensor([[1] * 5, [0, 0, 1, 0, 1]]),
        max_new_tokens=3, eos_token_id=[],
    )  # fmt: skip
    assert torch.equal(gapped[:, 5:], shifted[:, 5:])
    with pytest.raises(GenerationError, match="attention_mask has shape"):
        model.generate(ids, attention_mask=mask[:, :3], max_new_tokens=2)
    with pytest.raises(GenerationError, match="empty prompt"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]), max_new_tokens=2)


def test_bad_sampling_and_stream_requests_fail_at_the_call() -> None:
    model = _model(8)
    for bad in ({"temperature": 0.0}, {"top_p": 2.0}, {"top_k": 0}):
        with pytest.raises(GenerationError):
            model.generate([[1, 2]], max_new_tokens=2, do_sample=True, **bad)
    for temperature in (-1.0, float("nan")):  # refused for greedy decoding too, not silently ignored
        with pytest.raises(GenerationError, match="temperature"):
            model.generate([[1, 2]], max_new_tokens=2, temperature=temperature)
    with pytest.raises(GenerationError, match="empty prompt"):
        model.stream_generate([[]], max_new_tokens=2)  # before any token is asked for


def test_compiled_decoder_follows_dtype_changes_and_frees_the_model() -> None:
    """The compiled steps are kept weakly by the model and hold a copy of its modules sharing the
    tensors, not the model, so a dropped model is freed; converting the model's dtype builds new steps
    rather than reusing graphs for the old one."""
    import gc
    import weakref

    from longcat.inference.compiled import compiled_steps, decoding_copy

    model = _model(4)
    model.train()
    for moe in model.moe_layers():  # as the trainer leaves it: a routing with autograd history
        moe.keep_routing = True
    model(torch.randint(0, model.config.vocab_size, (1, 6)))
    model.eval()
    shared = decoding_copy(model, transpose_linear=False)
    assert all(moe.last_routing is None for moe in shared.moe_layers())
    assert all(a is b for a, b in zip(model.parameters(), shared.parameters()))
    first = compiled_steps(model)
    model.double()
    second = compiled_steps(model)
    assert second is not first
    model.float()
    assert compiled_steps(model) is not second
    alive = weakref.ref(model)
    del model, first, second, shared
    gc.collect()
    assert alive() is None


def test_generated_ids_can_feed_training() -> None:
    """Decoding runs in inference mode; what it hands out must still work in an autograd graph."""
    model = _model(2)
    for kwargs in ({}, {"speculative": "mtp"}):
        ids = model.generate([[3, 4, 5]], max_new_tokens=3, eos_token_id=[], **kwargs)
        chunk = next(iter(model.stream_generate([[3, 4, 5]], max_new_tokens=2, eos_token_id=[], **kwargs)))
        assert not ids.is_inference() and not chunk.is_inference()
        model.train()
        model(ids, labels=ids).loss.backward()
        model.eval()


def test_few_row_logits_equal_the_lm_head() -> None:
    from longcat.inference.steps import lm_logits

    model = _model(3)
    with torch.no_grad():
        for rows in range(1, 10):
            normed = torch.randn(1, rows, model.config.hidden_size)
            torch.testing.assert_close(lm_logits(model, normed), model.lm_head(normed), rtol=1e-5, atol=1e-5)


def test_a_decoding_failure_reaches_the_caller(monkeypatch) -> None:
    """The engine ends a request whose step fails alone; generate raises that to its caller (with the
    cause) instead of returning a short output, and leaves the model's mode as it found it."""
    from longcat.inference import steps

    model = _model(2).train()

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("injected decode fault")

    monkeypatch.setattr(steps, "decode_step", broken)
    with pytest.raises(GenerationError, match="injected decode fault"):
        model.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=[])
    assert model.training
