"""Presence, frequency and repetition penalties, logit_bias and min_p in the serving engine, against
slow, obvious references: a per-token loop for the adjustment, a full forward per token for decoding."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config
from tests.serving.test_engine import IdTokens, _prompts, _serve

from longcat import LongcatForCausalLM
from longcat.inference.penalties import Penalties, PenaltyTable
from longcat.inference.sampling import RowSettings, SamplingParams, distribution
from longcat.serving.engine import Engine, EngineError, RequestParams


def reference_adjust(logits: torch.Tensor, prompt: list[int], output: list[int], p: Penalties) -> torch.Tensor:
    x = logits.float().clone()
    for token in set(prompt) | set(output):
        x[token] = x[token] / p.repetition if x[token] > 0 else x[token] * p.repetition
    for token in set(output):
        x[token] -= p.frequency * output.count(token) + p.presence
    for token, value in p.bias:
        x[token] += value
    return x


def reference_decode(model: LongcatForCausalLM, prompt: list[int], n: int, p: Penalties) -> list[int]:
    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + output])).logits[0, -1]
            output.append(int(reference_adjust(logits, prompt, output, p).argmax()))
    return output


PENALTIES = [
    Penalties(frequency=3.0),
    Penalties(presence=1.5, bias=((3, -100.0), (5, 2.0))),
    Penalties(repetition=1.6, frequency=-0.3),
]


def test_adjustment_equals_the_per_token_reference() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, prompt = 50, [1, 4, 4, 9, 30]
    for p in PENALTIES:
        table = PenaltyTable(3, vocab, torch.device("cpu"))
        table.admit(1, p, prompt)  # the slot between two neutral ones
        output = []
        for step in range(6):
            logits = torch.randn(3, 1, vocab, generator=g) * 3
            ahead = [7, 4, 7][: step % 4]
            counts = torch.zeros(3, 1, vocab)
            counts[:, 0].index_add_(1, torch.tensor(ahead, dtype=torch.long), torch.ones(3, len(ahead)))
            got = table.rows(0, 3).apply(logits, counts)
            torch.testing.assert_close(got[1, 0], reference_adjust(logits[1, 0], prompt, output + ahead, p))
            assert torch.equal(got[[0, 2]], logits[[0, 2]])  # neutral slots: the model's own logits, exactly
            token = int(torch.randint(0, vocab, (1,), generator=g))
            output.append(token)
            table.record(1, torch.tensor([[token]]))
    assert not Penalties().active and all(p.active for p in PENALTIES)


def test_min_p_keeps_tokens_within_a_factor_of_the_best() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    rows = RowSettings.of([SamplingParams(do_sample=True, min_p=0.15)], [0], 5, torch.device("cpu"))
    probs = distribution(logits[None, None], rows)[0, 0]  # floor 0.075
    assert probs[3] == 0 and probs[4] == 0
    torch.testing.assert_close(probs[:3], torch.tensor([0.5, 0.3, 0.1]) / 0.9)


@pytest.fixture(scope="module")
def model() -> LongcatForCausalLM:
    torch.manual_seed(5)
    model = LongcatForCausalLM(random_tiny_config(5, max_position_embeddings=160))
    model.init_weights(torch.Generator().manual_seed(5))
    perturb(model, 5)
    return model.eval()


@pytest.mark.parametrize("speculative", [False, True])
def test_penalised_greedy_rows_among_plain_ones_equal_the_reference(model, speculative) -> None:
    prompts = _prompts(model.config.vocab_size, 5, seed=6)
    penalties = [PENALTIES[0], Penalties(), PENALTIES[1], Penalties(), PENALTIES[2]]
    params = [RequestParams(max_tokens=14, ignore_eos=True, penalties=p) for p in penalties]
    engine = Engine(model, IdTokens(), max_batch=4, speculative=speculative, num_draft_tokens=2)
    tokens, _, _ = _serve(engine, prompts, params, arrive=[0, 0, 1, 3, 3])
    for i, (prompt, p) in enumerate(zip(prompts, penalties, strict=True)):
        assert tokens[i] == reference_decode(model, prompt, 14, p), i
    assert 3 not in tokens[2]  # banned by its logit_bias
    changed = [tokens[i] != reference_decode(model, prompts[i], 14, Penalties()) for i in (0, 2, 4)]
    assert sum(changed) >= 2, changed  # the penalties change what is chosen


def test_seeded_penalised_sampling_repeats(model) -> None:
    prompt = _prompts(model.config.vocab_size, 1, seed=7)[0]
    sampling = SamplingParams(do_sample=True, temperature=0.8, min_p=0.05)
    params = RequestParams(max_tokens=12, sampling=sampling, seed=11, ignore_eos=True, penalties=PENALTIES[1])
    first = _serve(Engine(model, IdTokens()), [prompt], [params])[0][0]
    again = _serve(Engine(model, IdTokens()), [prompt, prompt], [params, params])[0]
    assert again == [first, first] and 3 not in first


def test_logit_bias_outside_the_vocabulary_is_refused(model) -> None:
    vocab = model.config.vocab_size
    params = RequestParams(max_tokens=4, penalties=Penalties(bias=((vocab, 1.0),)))
    with pytest.raises(EngineError, match="logit_bias names token id"):
        Engine(model, IdTokens()).submit([1, 2], params, lambda out: None)
