"""`longcat serve`'s sampling features through HTTP, as OpenAI clients use them: seeds, n choices (whole,
streamed, several prompts) and penalties and logit_bias against the library's reference decoding. The
server is a real subprocess (tests/serving/remote.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serving.remote import CHAT, MODEL  # noqa: E402

from longcat import LongcatForCausalLM  # noqa: E402

# --- seeds ------------------------------------------------------------------------------------


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> str:
        response = client.completions.create(model=MODEL, prompt="In the beginning", temperature=1, max_tokens=16,
                                             seed=seed, extra_body={"ignore_eos": True})  # fmt: skip
        return response.choices[0].text

    first = sample(7)
    assert sample(7) == first
    # sampling happens at all: another seed differs (16 tokens over 384 near-uniform ones: all equal is ~impossible)
    assert any(sample(seed) != first for seed in (8, 9, 10))


# --- n choices, penalties --------------------------------------------------------------------


def test_n_choices_whole_and_streamed(client, tokenizer):
    request = dict(model=MODEL, messages=CHAT, temperature=1, max_tokens=10, seed=3, n=3,
                   extra_body={"ignore_eos": True})  # fmt: skip
    whole = client.chat.completions.create(**request)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # seeds 3, 4, 5: the choices differ
    assert whole.usage.prompt_tokens == len(tokenizer.encode(tokenizer.chat(CHAT)))  # the prompt counted once
    assert whole.usage.completion_tokens == 30
    assert [c.message.content for c in client.chat.completions.create(**request).choices] == texts  # repeatable
    single = client.chat.completions.create(**{**request, "n": 1, "seed": 4})
    assert single.choices[0].message.content == texts[1]  # choice j is the request with seed + j

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert [streamed[i] for i in range(3)] == texts and finished == {0, 1, 2}
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_n_choices_of_several_prompts(client, tokenizer):
    prompts = ["In the beginning", "The module"]
    response = client.completions.create(model=MODEL, prompt=prompts, temperature=0, max_tokens=5, n=2,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    texts = [c.text for c in response.choices]
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # greedy: prompt p at 2p, 2p + 1
    assert response.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
    assert response.usage.completion_tokens == 20


def test_penalties_and_logit_bias(client, checkpoint, tokenizer):
    from tests.serving.test_penalties import reference_decode

    from longcat.inference.penalties import Penalties

    model = LongcatForCausalLM.from_pretrained(checkpoint).eval()
    prompt = tokenizer.encode("In the beginning")
    request = dict(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, logprobs=0)
    plain = client.completions.create(**request, extra_body={"ignore_eos": True}).choices[0]
    first = reference_decode(model, prompt, 1, Penalties())[0]
    banned = client.completions.create(**request, logit_bias={str(first): -100},
                                       extra_body={"ignore_eos": True}).choices[0]  # fmt: skip
    assert banned.logprobs.token_logprobs[0] < plain.logprobs.token_logprobs[0]  # the runner-up was chosen
    cases = [  # request fields, the same as Penalties
        ({"frequency_penalty": 1.5}, Penalties(frequency=1.5)),
        ({"presence_penalty": 1.0, "logit_bias": {str(first): 3}}, Penalties(presence=1.0, bias=((first, 3.0),))),
        ({"extra_body": {"ignore_eos": True, "repetition_penalty": 1.3}}, Penalties(repetition=1.3)),
    ]
    for fields, penalties in cases:
        extra = fields.pop("extra_body", {"ignore_eos": True})
        text = client.completions.create(**request, **fields, extra_body=extra).choices[0].text
        assert text == tokenizer.decode(reference_decode(model, prompt, 12, penalties)), fields
