"""End-to-end tests of `longcat serve` through its HTTP interface, as OpenAI clients see it.

Every server here is a real `python -m longcat serve` subprocess on a free port over a random tiny
checkpoint (tests/serving/remote.py), driven with the `openai` client and, where the wire format
matters, raw HTTP. Covered: the model list; chat and text completions, whole and streamed (SSE
framing, usage chunk, stream == whole for greedy decoding); stop strings; echo + logprobs with
token-id prompts (lm-eval-harness style) checked against the library's forward; 16 concurrent
streams; a client that disconnects mid-stream (its slot is freed); OpenAI-shaped errors for bad
requests, a full queue and a wrong API key; and the SIGTERM drain (503 for new requests, running ones
end with finish_reason "abort", exit status 0). Seeds, n choices and penalties: test_server_sampling.py.
Tool calls are left to the unit tests: a random model does not emit them.
"""

from __future__ import annotations

import json
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serving.remote import (  # noqa: E402
    CHAT,
    CONTEXT,
    MODEL,
    RemoteServer,
    assert_error,
    events,
    httpx,
    metric,
    occupied,
    stream_completion,
    wait_idle,
    wait_until,
)

from longcat import LongcatForCausalLM  # noqa: E402
from longcat.serving.api import RETRY_AFTER_S  # noqa: E402

# --- 1. models, whole responses ------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def check_usage(usage, prompt_tokens: int | None, finish_reason: str, max_tokens: int) -> None:  # noqa: ANN001
    assert usage.prompt_tokens > 0 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens <= max_tokens
    if finish_reason == "length":
        assert usage.completion_tokens == max_tokens
    if prompt_tokens is not None:
        assert usage.prompt_tokens == prompt_tokens


def test_chat_completion(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=8)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert abs(response.created - time.time()) < 600
    assert response.model == MODEL and len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    check_usage(response.usage, len(tokenizer.encode(tokenizer.chat(CHAT))), choice.finish_reason, 8)


def test_text_completion(client, tokenizer):
    prompt = "In the beginning God created"
    response = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert abs(response.created - time.time()) < 600
    assert response.model == MODEL and len(response.choices) == 1
    choice = response.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    check_usage(response.usage, len(tokenizer.encode(prompt)), choice.finish_reason, 8)


# --- 2. streaming --------------------------------------------------------------------------------


def test_chat_stream_equals_whole(client):
    request = dict(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_stream_wire_format(server, endpoint):
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    body.update({"messages": CHAT} if endpoint.startswith("chat") else {"prompt": "In the beginning"})
    with server.http() as http, http.stream("POST", f"/v1/{endpoint}", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    payloads = events(raw.split("\n"))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


# --- 3. stop strings -----------------------------------------------------------------------------


def test_stop_string(client):
    request = dict(model=MODEL, prompt="In the beginning God created", temperature=0, max_tokens=20,
                   extra_body={"ignore_eos": True})  # fmt: skip
    text = client.completions.create(**request).choices[0].text
    # a short piece from the middle, of whole characters, that does not start the text
    candidates = [text[i : i + 3] for i in range(len(text) // 3, 2 * len(text) // 3)]
    candidates = [s for s in candidates if len(s) == 3 and "\ufffd" not in s and text.find(s) > 0]
    assert candidates, f"no usable stop string in {text!r}"
    stop = candidates[0]
    expected = text[: text.find(stop)]

    stopped = client.completions.create(**request, stop=[stop])
    assert stopped.choices[0].text == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 20

    chunks = list(client.completions.create(**request, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- 5. echo + logprobs --------------------------------------------------------------------------


def test_echo_logprobs_match_library(client, checkpoint, tokenizer):
    short = tokenizer.encode("In the beginning God created the heaven and the earth.")
    long = tokenizer.encode(" ".join(["And the earth was without form, and void."] * 60))
    assert len(long) > 512  # more than one prefill chunk (--prefill-chunk's default)
    response = client.completions.create(model=MODEL, prompt=[short, long], max_tokens=1, logprobs=1, echo=True,
                                         temperature=0)  # fmt: skip
    assert [c.index for c in response.choices] == [0, 1]
    model = LongcatForCausalLM.from_pretrained(checkpoint).eval()
    for ids, choice in zip((short, long), response.choices):
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [P, V]
        got = choice.logprobs
        assert len(got.token_logprobs) == len(got.tokens) == len(got.top_logprobs) == len(ids) + 1
        assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
        values = got.token_logprobs[1:]
        assert all(math.isfinite(v) and v < 0 for v in values)
        expected = [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))] + [logprobs[-1].max().item()]
        assert values == pytest.approx(expected, abs=1e-3)
        for top, value in zip(got.top_logprobs[1:], values):
            assert isinstance(top, dict) and len(top) == 1 and max(top.values()) >= value - 1e-6
        assert choice.text.startswith(tokenizer.decode(ids))
        assert got.text_offset == sorted(got.text_offset) and got.text_offset[0] == 0


# --- 6. concurrency ------------------------------------------------------------------------------


def test_concurrent_streams(client):
    def run(i: int) -> tuple[int, int, str | None]:
        max_tokens = 8 + 2 * i  # 8 .. 38
        common = dict(model=MODEL, max_tokens=max_tokens, temperature=0, stream=True,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
        if i % 2:
            stream = client.chat.completions.create(messages=[{"role": "user", "content": f"Count to {i}"}], **common)
        else:
            stream = client.completions.create(prompt=f"Chapter {i}: in the beginning", **common)
        chunks = list(stream)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return max_tokens, chunks[-1].usage.completion_tokens, reasons[-1] if reasons else None

    with ThreadPoolExecutor(16) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(run, i) for i in range(16)]]
    for max_tokens, completion_tokens, reason in results:
        assert (completion_tokens, reason) == (max_tokens, "length")


# --- 7. a client that goes away ------------------------------------------------------------------


ABORTED = 'longcat_requests_finished_total{finish_reason="abort"}'


def test_disconnect_frees_the_slot(server):
    before = metric(server, ABORTED)
    with server.http() as http, stream_completion(server, http, 3000) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(server, "longcat_requests_running") == 1
        assert metric(server, "longcat_kv_slots_used") == 1
    # leaving the block closed the connection mid-stream
    wait_idle(server)
    assert metric(server, ABORTED) >= before + 1


def test_disconnect_frees_the_slot_non_streaming(server):
    before = metric(server, ABORTED)
    body = {"prompt": "In the beginning", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1)
    wait_until(lambda: metric(server, ABORTED) >= before + 1, 3, "the abandoned request to be aborted")
    wait_idle(server)


# --- 8. errors -----------------------------------------------------------------------------------

BAD_REQUESTS = {  # name: (endpoint, body, status, param, code)
    "missing messages": ("chat/completions", {"model": MODEL}, 400, "messages", None),
    "ill-typed max_tokens": ("chat/completions", {"messages": CHAT, "max_tokens": "many"}, 400, "max_tokens", None),
    "messages not a list": ("chat/completions", {"messages": "hi"}, 400, "messages", None),
    "empty messages": ("chat/completions", {"messages": []}, 400, "messages", None),
    "bad role": ("chat/completions", {"messages": [{"role": "wiz", "content": "hi"}]}, 400, "messages.0.role", None),
    "max_tokens 0": ("chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    "temperature -1": ("chat/completions", {"messages": CHAT, "temperature": -1}, 400, "temperature", None),
    "unknown model": ("chat/completions", {"messages": CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    "n 0": ("chat/completions", {"messages": CHAT, "n": 0}, 400, "n", None),
    "n 129": ("completions", {"prompt": "In the", "n": 129}, 400, "n", None),
    "n beyond the queue": ("completions", {"prompt": "In the", "n": 100}, 400, "n", None),  # 16 + 64 fit
    "penalty 3": ("chat/completions", {"messages": CHAT, "frequency_penalty": 3}, 400, "frequency_penalty", None),
    "repetition 0": ("completions", {"prompt": "In the", "repetition_penalty": 0}, 400, "repetition_penalty", None),
    "bias key": ("chat/completions", {"messages": CHAT, "logit_bias": {"the": 5}}, 400, "logit_bias", None),
    "bias value": ("chat/completions", {"messages": CHAT, "logit_bias": {"7": 101}}, 400, "logit_bias", None),
    "bias token": ("completions", {"prompt": "In the", "logit_bias": {"384": 1}}, 400, "logit_bias", None),
    "min_p 2": ("completions", {"prompt": "In the", "min_p": 2}, 400, "min_p", None),
    "json mode": (
        "chat/completions",
        {"messages": CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "unsupported_parameter",
    ),
    "five stops": ("chat/completions", {"messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    "completion max_tokens 0": ("completions", {"prompt": "In the", "max_tokens": 0}, 400, "max_tokens", None),
    "token out of vocabulary": ("completions", {"prompt": [5, 384], "max_tokens": 2}, 400, "prompt", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request(server, name):
    endpoint, body, status, param, code = BAD_REQUESTS[name]
    with server.http() as http:
        assert_error(http.post(f"/v1/{endpoint}", json={"max_tokens": 4, **body}), status, param, code)


def test_invalid_json(server):
    with server.http() as http:
        response = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_neutral_unsupported_value_is_accepted(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                              response_format={"type": "text"})  # fmt: skip
    assert response.choices[0].finish_reason in ("stop", "length")


def test_context_length_exceeded(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": list(range(10, 20)), "max_tokens": CONTEXT - 6})
    error = assert_error(response, 400, code="context_length_exceeded")
    assert str(CONTEXT) in error["message"] and str(CONTEXT + 4) in error["message"]
    with server.http() as http:  # no max_tokens: the rest of the context, and a full prompt leaves none
        response = http.post("/v1/completions", json={"prompt": [5] * CONTEXT})
    error = assert_error(response, 400, param="prompt", code="context_length_exceeded")
    assert f"{CONTEXT} tokens and the prompt has {CONTEXT}" in error["message"]


def test_seed_out_of_range(server):
    with server.http() as http:
        response = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2, "seed": 2**64}, timeout=10)
    assert_error(response, 400, param="seed")


def test_unknown_route_and_method_are_openai_shaped(server):
    with server.http() as http:
        assert_error(http.get("/v1/nonexistent"), 404)
        assert_error(http.get("/v1/completions"), 405)


def test_healthy_after_bad_requests(server, client):
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    response = client.completions.create(model=MODEL, prompt="In the", max_tokens=3, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3


def test_full_server_answers_503_with_retry_after(guarded):
    with guarded.http(authorization="Bearer secret") as http, occupied(guarded, http):
        response = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2})
        assert_error(response, 503, code="server_busy")
    # the wait in whole seconds (RFC 9110 delay-seconds), as the openai client's retry reads it
    assert response.headers.get("retry-after") == str(RETRY_AFTER_S)
    # the slot is free again
    response = guarded.client("secret").completions.create(model=MODEL, prompt="In the", max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_api_key(guarded):
    with guarded.http() as anonymous:
        assert_error(anonymous.get("/v1/models"), 401, code="invalid_api_key")
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    with guarded.http(authorization="Bearer wrong") as wrong:
        assert_error(wrong.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2}), 401)
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    assert [m.id for m in guarded.client("secret").models.list().data] == [MODEL]


# --- 9. SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_drains_then_aborts(checkpoint):
    grace = 2.0
    server = RemoteServer(checkpoint, "--shutdown-timeout", str(grace))
    try:
        with server.http() as http, stream_completion(server, http, 4000) as response:
            lines = response.iter_lines()
            before = events(next(lines) for _ in range(10))
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            def refused() -> httpx.Response | None:  # the signal is handled asynchronously
                reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "In", "max_tokens": 1}, timeout=10)
                return reply if reply.status_code == 503 else None

            draining = wait_until(refused, grace * 0.75, "a 503 while draining")
            assert_error(draining, 503, code="server_shutting_down")
            assert draining.headers.get("retry-after") == str(RETRY_AFTER_S)
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
            after = events(lines)
            ended = time.monotonic()
        assert after[-1] == "[DONE]"
        chunks = [json.loads(p) for p in before + after[:-1]]
        reasons = [c["choices"][0]["finish_reason"] for c in chunks]
        assert reasons[-1] == "abort" and not any(reasons[:-1])
        assert len(after) > 10, "the running request should go on during the grace period"
        assert ended - signalled > grace * 0.75, "the request was aborted before --shutdown-timeout"
        assert server.proc.wait(timeout=15) == 0
    finally:
        server.stop()
