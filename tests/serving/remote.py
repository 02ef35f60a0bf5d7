"""The harness of the server tests: `longcat serve` as a real subprocess on a free port over a random tiny
checkpoint (as vLLM's tests use RemoteOpenAIServer), and helpers for SSE, OpenAI errors and /metrics.
Test modules import it after `pytest.importorskip` of the server's dependencies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

try:
    import httpx
except ImportError:  # openai >= 3 ships its HTTP client as httpx2
    import httpx2 as httpx

from tests.conftest import random_tiny_config

from longcat import LongcatForCausalLM

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


def make_checkpoint(small_data: Path, directory: Path) -> Path:
    """A random tiny model (vocabulary 384, context CONTEXT, one MTP layer) with the test corpus's tokenizer."""
    from longcat.data.prepare import copy_tokenizer

    config = random_tiny_config(0, vocab_size=384, max_position_embeddings=CONTEXT, num_nextn_predict_layers=1)
    model = LongcatForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(directory)
    copy_tokenizer([small_data / "tokenizer.json", small_data / "tokenizer_config.json"], directory)
    return directory
