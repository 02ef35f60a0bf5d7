"""End-to-end tests of `longcat serve` through its HTTP interface, as OpenAI clients see it.

Like vLLM's RemoteOpenAIServer, every server here is a real `python -m longcat serve` subprocess on a
free port over a random tiny checkpoint (vocabulary 384, context 4096), driven with the `openai`
client and, where the wire format matters, raw HTTP. Covered: the model list; chat and text
completions, whole and streamed (SSE framing, usage chunk, stream == whole for greedy decoding);
stop strings; seeds; n choices (whole and streamed, several prompts); penalties and logit_bias against
the library's reference decoding; echo + logprobs with token-id prompts (lm-eval-harness style) checked against
the library's forward; 16 concurrent streams; a client that disconnects mid-stream (its slot is
freed); OpenAI-shaped errors for bad requests, a full queue and a wrong API key; and the SIGTERM
drain (503 for new requests, running ones end with finish_reason "abort", exit status 0).
Tool calls are left to the unit tests: a random model does not emit them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
try:
    import httpx
except ImportError:  # openai >= 3 ships its HTTP client as httpx2
    import httpx2 as httpx

from tests.conftest import random_tiny_config  # noqa: E402

from longcat import LongcatForCausalLM  # noqa: E402

MODEL = "tiny"
CONTEXT = 4096
STARTUP_TIMEOUT_S = 60


class RemoteServer:
    """`longcat serve CHECKPOINT ARGS...` in a subprocess, ready (GET /health is 200) once built."""

    def __init__(self, checkpoint: Path, *args: str, env: dict[str, str] | None = None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(checkpoint).parent / f"server-{self.port}.log"
        command = [sys.executable, "-m", "longcat", "serve", str(checkpoint), "--port", str(self.port),
                   "--served-model-name", MODEL, *args]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"longcat serve exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"longcat serve was not ready after {STARTUP_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def client(self, api_key: str = "x") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def http(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def die_with_parent() -> None:
    """The server gets SIGKILL if the test process dies first (Linux), so none outlives a killed run."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- helpers -------------------------------------------------------------------------------------


def wait_until(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def metric(server: RemoteServer, name: str) -> float:
    """One sample of GET /metrics, e.g. 'longcat_requests_finished_total{finish_reason="abort"}' (0 if absent)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_idle(server: RemoteServer, timeout: float = 10) -> None:
    wait_until(lambda: metric(server, "longcat_requests_running") == 0 and metric(server, "longcat_kv_slots_used") == 0
               and metric(server, "longcat_requests_waiting") == 0, timeout, "the server to go idle")  # fmt: skip


def events(lines) -> list[str]:  # noqa: ANN001
    """The SSE events' payloads ('data: ' removed) from response lines; every event must be 'data: ...'."""
    out = []
    for line in lines:
        if line:
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            out.append(line[len("data: ") :])
    return out


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def stream_completion(server: RemoteServer, http: httpx.Client, max_tokens: int):  # noqa: ANN201
    body = {"model": MODEL, "prompt": "In the beginning", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    return http.stream("POST", "/v1/completions", json=body)


@contextlib.contextmanager
def occupied(server: RemoteServer, http: httpx.Client):
    """A long streamed completion holds a slot for the duration (it is dropped, then awaited, on exit)."""
    with stream_completion(server, http, 3000) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        yield
    wait_idle(server)


CHAT = [{"role": "user", "content": "In the beginning God created"}]


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory) -> Path:
    from longcat.data.prepare import copy_tokenizer

    config = random_tiny_config(0, vocab_size=384, max_position_embeddings=CONTEXT, num_nextn_predict_layers=1)
    model = LongcatForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    model.save_pretrained(directory)
    copy_tokenizer([small_data / "tokenizer.json", small_data / "tokenizer_config.json"], directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(checkpoint):  # noqa: ANN201
    from longcat.inference.chat import CheckpointTokenizer

    return CheckpointTokenizer(checkpoint)


@pytest.fixture(scope="module")
def server(checkpoint):  # noqa: ANN201
    remote = RemoteServer(checkpoint, "--max-batch", "16")
    yield remote
    remote.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def guarded(checkpoint):  # noqa: ANN201
    """One slot, no queue, an API key: for 503s on a full server and 401s."""
    remote = RemoteServer(checkpoint, "--max-batch", "1", "--max-queue", "0", env={"LONGCAT_API_KEY": "secret"})
    yield remote
    remote.stop()


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


# --- 4. seeds ------------------------------------------------------------------------------------


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> str:
        response = client.completions.create(model=MODEL, prompt="In the beginning", temperature=1, max_tokens=16,
                                             seed=seed, extra_body={"ignore_eos": True})  # fmt: skip
        return response.choices[0].text

    first = sample(7)
    assert sample(7) == first
    # sampling happens at all: another seed differs (16 tokens over 384 near-uniform ones: all equal is ~impossible)
    assert any(sample(seed) != first for seed in (8, 9, 10))


# --- 4b. n choices, penalties --------------------------------------------------------------------


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

    from longcat.serving.penalties import Penalties

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


def test_full_server_answers_503(guarded):
    with guarded.http(authorization="Bearer secret") as http, occupied(guarded, http):
        response = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2})
        assert_error(response, 503, code="server_busy")
    # the slot is free again
    response = guarded.client("secret").completions.create(model=MODEL, prompt="In the", max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_full_server_503_has_retry_after(guarded):
    with guarded.http(authorization="Bearer secret") as http, occupied(guarded, http):
        response = http.post("/v1/completions", json={"prompt": "In the", "max_tokens": 2})
    assert response.status_code == 503
    assert "retry-after" in response.headers


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

            assert_error(wait_until(refused, grace * 0.75, "a 503 while draining"), 503, code="server_shutting_down")
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
