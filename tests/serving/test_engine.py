"""The serving engine without HTTP: continuous batching against one-request generation.

Batch invariance is measured here, not assumed: greedy tokens of each request served among others
(joining at different steps, prefilled in chunks, leaving at different lengths, with MTP speculation)
must equal `generate` on that request alone. Rows never attend to each other, so only floating-point
rounding of differently shaped products could change a token, and only at a near-tie of two logits;
these models and prompts have none.
"""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM
from longcat.inference.sampling import SamplingParams
from longcat.serving.engine import Engine, EngineError, QueueFull, RequestParams


class IdTokens:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module", params=[3, 8])
def model(request) -> LongcatForCausalLM:
    torch.manual_seed(request.param)
    model = LongcatForCausalLM(random_tiny_config(request.param, max_position_embeddings=160))
    model.init_weights(torch.Generator().manual_seed(request.param))
    perturb(model, request.param)
    return model.eval()


def _prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _serve(engine: Engine, prompts: list[list[int]], params: list[RequestParams], arrive: list[int] | None = None):
    """Submit request i at engine step arrive[i]; run until all end. -> (tokens, finish reasons, outputs)."""
    arrive = arrive or [0] * len(prompts)
    outs: list[list] = [[] for _ in prompts]
    step = 0
    while True:
        for i, at in enumerate(arrive):
            if at == step:
                engine.submit(prompts[i], params[i], outs[i].append)
        if step > max(arrive) and all(o and o[-1].finish_reason for o in outs):
            break
        engine.step()
        step += 1
        assert step < 2000
    tokens = [[t for o in out for t in o.token_ids] for out in outs]
    return tokens, [out[-1].finish_reason for out in outs], outs


def _reference(model: LongcatForCausalLM, prompt: list[int], n: int) -> list[int]:
    return model.generate([prompt], max_new_tokens=n, eos_token_id=[])[0, len(prompt) :].tolist()


@pytest.mark.parametrize("speculative,draft_tokens,chunk", [(False, 1, 512), (False, 1, 16), (True, 1, 512),
                                                            (True, 3, 16)])  # fmt: skip
def test_greedy_in_a_changing_batch_equals_generate_alone(model, speculative, draft_tokens, chunk) -> None:
    prompts = _prompts(model.config.vocab_size, 10)
    lengths = [3 + (7 * i) % 17 for i in range(len(prompts))]
    params = [RequestParams(max_tokens=n, ignore_eos=True) for n in lengths]
    engine = Engine(model, IdTokens(), max_batch=6, speculative=speculative, num_draft_tokens=draft_tokens,
                    prefill_chunk=chunk)  # fmt: skip
    tokens, reasons, _ = _serve(engine, prompts, params, arrive=[0, 0, 0, 1, 2, 2, 5, 9, 9, 14])
    for i, prompt in enumerate(prompts):
        assert tokens[i] == _reference(model, prompt, lengths[i]), i
    assert reasons == ["length"] * len(prompts)
    assert not engine.running and not engine.prefilling and not engine.waiting


def test_stop_rules_end_a_row_and_the_others_go_on(model) -> None:
    prompts = _prompts(model.config.vocab_size, 3, seed=1)
    ref = [_reference(model, p, 12) for p in prompts]
    eos = ref[0][4]
    model.config.eos_token_id = eos
    try:
        engine = Engine(model, IdTokens(), max_batch=4)
        stop = f"<{ref[1][6]}>"
        params = [RequestParams(max_tokens=12), RequestParams(max_tokens=12, stop=[stop], ignore_eos=True),
                  RequestParams(max_tokens=12, ignore_eos=True)]  # fmt: skip
        tokens, reasons, outs = _serve(engine, prompts, params)
    finally:
        model.config.eos_token_id = None
    first_eos = ref[0].index(eos)
    assert tokens[0] == ref[0][: first_eos + 1] and reasons[0] == "stop"
    text = "".join(o.text for o in outs[1])
    assert text == IdTokens().decode(ref[1])[: IdTokens().decode(ref[1]).index(stop)] and reasons[1] == "stop"
    assert tokens[2] == ref[2] and reasons[2] == "length"
    assert "".join(o.text for o in outs[0]) == IdTokens().decode(ref[0][:first_eos])  # the end token is not text


@pytest.mark.parametrize("speculative", [False, True])
def test_seeded_sampling_repeats_alone_and_among_others(model, speculative) -> None:
    prompts = _prompts(model.config.vocab_size, 5, seed=2)
    sampling = SamplingParams(do_sample=True, temperature=0.9, top_k=20, top_p=0.95)
    params = [RequestParams(max_tokens=10, sampling=sampling, seed=100 + i, ignore_eos=True) for i in range(5)]
    alone = [
        _serve(Engine(model, IdTokens(), speculative=speculative), [p], [q])[0][0] for p, q in zip(prompts, params)
    ]
    again = _serve(Engine(model, IdTokens(), speculative=speculative), prompts[:1], params[:1])[0][0]
    together = _serve(Engine(model, IdTokens(), speculative=speculative), prompts, params, arrive=[0, 1, 1, 3, 4])[0]
    assert again == alone[0]
    assert together == alone  # equal up to rounding at a sampling boundary, which these draws do not meet
    assert len({tuple(a) for a in alone}) > 1


def test_cancel_frees_the_slot_and_moved_rows_stay_correct(model) -> None:
    prompts = _prompts(model.config.vocab_size, 4, seed=3)
    engine = Engine(model, IdTokens(), max_batch=4)
    outs = [[] for _ in prompts]
    requests = [engine.submit(p, RequestParams(max_tokens=20, ignore_eos=True), outs[i].append)
                for i, p in enumerate(prompts)]  # fmt: skip
    for _ in range(4):
        engine.step()
    engine.cancel(requests[1])  # a middle slot: the last row moves into it
    engine.step()
    assert outs[1][-1].finish_reason == "abort"
    assert len(engine.running) == 3 and [r.slot for r in engine.running] == [0, 1, 2]
    while engine.running:
        engine.step()
    for i in (0, 2, 3):
        assert [t for o in outs[i] for t in o.token_ids] == _reference(model, prompts[i], 20), i


def test_a_failing_request_ends_alone(model) -> None:
    prompts = _prompts(model.config.vocab_size, 3, seed=4)
    engine = Engine(model, IdTokens(), max_batch=4)
    outs = [[] for _ in prompts]
    requests = [engine.submit(p, RequestParams(max_tokens=8, ignore_eos=True), outs[i].append)
                for i, p in enumerate(prompts)]  # fmt: skip
    engine.step()

    def broken(ids: list[int]) -> str:
        raise RuntimeError("detokenizer exploded")

    requests[1].text.decode = broken
    while engine.running or engine.prefilling:
        engine.step()
    assert outs[1][-1].finish_reason == "error" and "exploded" in outs[1][-1].error
    for i in (0, 2):
        assert outs[i][-1].finish_reason == "length"
        assert [t for o in outs[i] for t in o.token_ids] == _reference(model, prompts[i], 8)


def test_prompt_logprobs_match_the_full_forward(model) -> None:
    prompt = _prompts(model.config.vocab_size, 1, seed=5)[0] + [1, 2, 3]
    engine = Engine(model, IdTokens(), prefill_chunk=8)  # several chunks
    params = RequestParams(max_tokens=2, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    _, _, outs = _serve(engine, [prompt], [params])
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    got = outs[0][0].prompt_logprobs
    assert len(got) == len(prompt) - 1
    for i, choice in enumerate(got):
        assert choice.token == prompt[i + 1]
        assert choice.logprob == pytest.approx(float(logprobs[i, prompt[i + 1]]), abs=1e-4)
        assert choice.top[0][0] == int(logprobs[i].argmax())
    first = outs[0][0].logprobs[0]
    assert first.logprob == pytest.approx(float(logprobs[-1].max()), abs=1e-4) and len(first.top) == 2


def test_bad_requests_and_a_full_queue_are_refused(model) -> None:
    engine = Engine(model, IdTokens(), max_batch=1, max_queue=1)
    context = model.config.max_position_embeddings
    with pytest.raises(EngineError, match="empty"):
        engine.submit([], RequestParams(max_tokens=1), print)
    with pytest.raises(EngineError, match=r"160 tokens.*\(150 in the prompt, 11") as err:
        engine.submit([1] * 150, RequestParams(max_tokens=11), print)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(EngineError, match="token ids"):
        engine.submit([model.config.vocab_size], RequestParams(max_tokens=1), print)
    engine.submit([1], RequestParams(max_tokens=context - 1), lambda o: None)
    engine.submit([1], RequestParams(max_tokens=5), lambda o: None)  # one running slot free + one queued
    with pytest.raises(QueueFull):
        engine.submit([1], RequestParams(max_tokens=5), lambda o: None)
    short = Engine(model, IdTokens(), max_model_len=50)
    with pytest.raises(EngineError, match=r"maximum context length is 50 tokens") as err:
        short.submit([1] * 45, RequestParams(max_tokens=6), print)
    assert short.cache.max_tokens < 160  # the slots are sized for 50 tokens, not the model's 160
    with pytest.raises(EngineError, match=r"max_model_len must lie in \[1, 160\]"):
        Engine(model, IdTokens(), max_model_len=161)
    with pytest.raises(EngineError, match="MTP"):
        Engine(LongcatForCausalLM(random_tiny_config(1, num_nextn_predict_layers=0)), IdTokens(), speculative=True)


def test_engine_thread_serves_and_stops(model) -> None:
    import threading

    engine = Engine(model, IdTokens()).start()
    done = threading.Event()
    outs = []

    def sink(out) -> None:  # noqa: ANN001
        outs.append(out)
        if out.finish_reason:
            done.set()

    prompt = _prompts(model.config.vocab_size, 1, seed=6)[0]
    engine.submit(prompt, RequestParams(max_tokens=6, ignore_eos=True), sink)
    assert done.wait(30)
    engine.stop()
    assert [t for o in outs for t in o.token_ids] == _reference(model, prompt, 6)


@pytest.mark.slow
def test_compiled_decode_steps_equal_eager(model) -> None:
    """--compile: static-shape graphs per batch bucket (rows padded, each attending over its whole slot)
    give the eager engine's tokens, with rows joining and leaving between steps; so does the compiled
    speculation round (traced by the quick aot_eager backend: Inductor compiles each for tens of seconds)."""
    if model.config.vocab_size != random_tiny_config(3).vocab_size:
        pytest.skip("one model is enough: each bucket compiles for tens of seconds")
    prompts = _prompts(model.config.vocab_size, 3, seed=7)
    lengths = [6, 9, 4]
    params = [RequestParams(max_tokens=n, ignore_eos=True) for n in lengths]
    for speculative, backend in ((False, "inductor"), (True, "aot_eager")):
        engine = Engine(model, IdTokens(), max_batch=2, compile=True, compile_backend=backend, speculative=speculative,
                        num_draft_tokens=2)  # fmt: skip
        assert [engine.bucket(n) for n in (1, 2, 3)] == [1, 2, 2]
        tokens, _, _ = _serve(engine, prompts, params, arrive=[0, 2, 3])
        for i, prompt in enumerate(prompts):
            assert tokens[i] == _reference(model, prompt, lengths[i]), (speculative, i)


def test_a_request_being_admitted_is_counted_as_active(model) -> None:
    """The drain waits while `active` > 0: a request moving from the queue to the prefill is counted
    at every moment. The engine is held inside admission (its tokenizer is asked for `decode` there)."""
    import threading

    class HeldTokens(IdTokens):
        inside, go = threading.Event(), threading.Event()

        def __getattribute__(self, name: str):  # noqa: ANN204
            if name == "decode":
                HeldTokens.inside.set()
                assert HeldTokens.go.wait(30)
            return super().__getattribute__(name)

    engine = Engine(model, HeldTokens())
    engine.submit([1, 2, 3], RequestParams(max_tokens=2, ignore_eos=True), lambda out: None)
    stepping = threading.Thread(target=engine.step)
    stepping.start()
    assert HeldTokens.inside.wait(30)
    try:
        assert engine.active == 1 and engine.prefilling and not engine.waiting
    finally:
        HeldTokens.go.set()
        stepping.join(30)
    assert engine.active == 1 and len(engine.running) == 1


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_a_failure_ends_only_its_request(model, monkeypatch, caplog, where) -> None:
    """A fault injected into one request's prefill chunk, or into every decode step that contains its
    row (the step is retried on halves of its rows, then alone): that request ends with an error the
    server's log names; the others give the tokens they give without the fault."""
    import logging

    from longcat.inference import steps

    vocab = model.config.vocab_size
    prompts = [p[:8] for p in _prompts(vocab, 4, seed=9)]
    prompts[2] = [vocab - 1, *prompts[2]] if where == "prefill" else [3] * 37
    references = {i: _reference(model, p, 12) for i, p in enumerate(prompts) if i != 2}
    real_forward, real_decode = steps.forward_rows, steps.decode_step

    def forward_rows(model, rows, ids):  # noqa: ANN001, ANN202
        if where == "prefill" and ids.shape[1] > 1 and bool((ids == vocab - 1).any()):
            raise RuntimeError("injected prefill fault")
        return real_forward(model, rows, ids)

    def decode_step(model, cache, tokens, positions, *rest):  # noqa: ANN001, ANN002, ANN202
        if where == "decode" and bool((positions == 39).any()):  # request 2's third decode step
            raise RuntimeError("injected decode fault")
        return real_decode(model, cache, tokens, positions, *rest)

    monkeypatch.setattr(steps, "forward_rows", forward_rows)
    monkeypatch.setattr(steps, "decode_step", decode_step)
    engine = Engine(model, IdTokens(), max_batch=4)
    params = [RequestParams(max_tokens=12, ignore_eos=True) for _ in prompts]
    with caplog.at_level(logging.WARNING, logger="longcat.serve"):
        tokens, reasons, outs = _serve(engine, prompts, params, arrive=[0, 0, 3, 4])
    assert reasons[2] == "error" and "injected" in outs[2][-1].error
    assert f"request 2: its {where}" in caplog.text
    for i, expected in references.items():
        assert tokens[i] == expected and reasons[i] == "length", i
