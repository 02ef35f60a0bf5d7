"""`longcat bench serve`: our server under 1, 4 and 16 concurrent streaming clients, side by side with
`transformers serve` on the same checkpoint.

Both servers run as processes on this machine and face the same client loop: C threads, each sending
its share of the requests one after another as streaming text completions of the same prompts, greedy,
a fixed number of output tokens (our `ignore_eos`; transformers' `min_new_tokens`). Measured per level:
output tokens/s over the wall time of the level, time to first token and time per output token
(p50/p99 over requests). The anchor is the faster of transformers serve with and without its
continuous batching, among the modes that serve the checkpoint; a mode that fails (to start, or on
any request) is reported with its error and is not an anchor. (transformers 5.24 served LongCat
without continuous batching; its paged cache cannot hold MLA's latent: docs/benchmarks.md.)
Ratios: ours / anchor at 16 clients, and ours at 16 clients / ours at 1.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .common import machine

LEVELS = (1, 4, 16)
PROMPTS = (
    "In the beginning God created",
    "And the LORD said unto Moses,",
    "The os.path module",
    "To open a file for reading,",
    "Blessed are the meek:",
    "A list comprehension",
    "And it came to pass",
    "The following example shows",
)


@dataclass
class Level:
    clients: int
    requests: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return {
            "clients": self.clients, "requests": self.requests, "failed": self.failed,
            "output_tokens": self.tokens, "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
            "ttft_p50_ms": _ms(pct(self.ttft, 0.5)), "ttft_p99_ms": _ms(pct(self.ttft, 0.99)),
            "tpot_p50_ms": _ms(pct(self.tpot, 0.5)), "tpot_p99_ms": _ms(pct(self.tpot, 0.99)),
            "errors": self.errors[:3],
        }  # fmt: skip


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server started as a process on a free local port, waited for on /health, stopped with SIGTERM."""

    def __init__(self, command: list[str], port: int, env: dict | None = None, startup_s: float = 180) -> None:
        self.port, self.log = port, tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs
        started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = started + startup_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {self.process.returncode}: {self.output()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    self.ready_s = time.monotonic() - started  # process start to a healthy server
                    return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{command[:4]} did not answer /health within {startup_s} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stream_once(
    connection: http.client.HTTPConnection, path: str, body: dict
) -> tuple[int, float | None, float | None]:
    """One streaming completion -> (output tokens, time to first token, time per output token). The
    client is the standard library's, so it costs the machine little next to the servers it measures."""
    start = time.perf_counter()
    first = last = None
    tokens = None
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(str(chunk["error"])[:300])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            now = time.perf_counter()
            first = now if first is None else first
            last = now
    if tokens is None:  # the count comes from the server's tokenizer only: text chunks may merge tokens
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
    ttft = None if first is None else first - start
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return tokens, ttft, tpot


def run_level(url: str, bodies: list[dict], clients: int, timeout: float) -> Level:
    level = Level(clients)
    address = urllib.parse.urlsplit(url)
    lock = threading.Lock()
    queue = list(bodies)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
            try:
                tokens, ttft, tpot = stream_once(connection, address.path, body)
            except Exception as err:  # noqa: BLE001 - a failed request is counted, not fatal
                with lock:
                    level.requests += 1
                    level.failed += 1
                    level.errors.append(f"{type(err).__name__}: {err}"[:300])
                continue
            finally:
                connection.close()
            with lock:
                level.requests += 1
                level.tokens += tokens
                if ttft is not None:
                    level.ttft.append(ttft)
                if tpot is not None:
                    level.tpot.append(tpot)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - start
    return level


def measure(url: str, body_for, levels: tuple[int, ...], requests_per_client: int, timeout: float) -> dict:  # noqa: ANN001
    out = {}
    run_level(url, [body_for(i) for i in range(2)], 1, timeout)  # warm-up: first-call costs
    for clients in levels:
        bodies = [body_for(i) for i in range(clients * requests_per_client)]
        out[str(clients)] = run_level(url, bodies, clients, timeout).summary()
    return out


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("LONGCAT_API_KEY", None)
    return env


def transformers_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint in the layout the installed transformers reads (checkpoint.save_pretrained): a
    checkpoint of either layout is rewritten, so the anchor serves the same weights whichever was saved.
    Widths transformers' default expert path cannot run get its per-expert loop, named in config.json
    (common.transformers_experts_choice), since `transformers serve` takes no such option."""
    from ..checkpoint import installed_transformers_version, transformers_needs_zero_expert_stubs
    from ..data.prepare import copy_tokenizer
    from ..model.lm import LongcatForCausalLM
    from .common import transformers_experts_choice

    version = installed_transformers_version()
    stubs = version is not None and transformers_needs_zero_expert_stubs(version)
    model = LongcatForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(out, zero_expert_stubs=stubs)
    choice = transformers_experts_choice(model.config, model.dtype)
    if choice:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, **choice}, indent=2) + "\n")
    copy_tokenizer([p for p in (checkpoint / "tokenizer.json", checkpoint / "tokenizer_config.json") if p.is_file()],
                   out)  # fmt: skip
    return out


def run(checkpoint: str, max_tokens: int = 64, requests_per_client: int = 2, speculative: bool = False,
        levels: tuple[int, ...] = LEVELS, anchor: bool = True, timeout: float = 600,
        compile: bool = False, device: str = "cpu", dtype: str = "auto") -> dict:  # fmt: skip
    """device and dtype: where and in what our server holds the weights (the anchors serve on the CPU
    as the checkpoint stores them, so compare against them only on the CPU)."""
    from ..inference.chat import CheckpointTokenizer

    root = Path(checkpoint)
    CheckpointTokenizer(root)  # a checkpoint without a tokenizer fails here, before any server starts
    eos = json.loads((root / "config.json").read_text()).get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    threads = os.cpu_count() or 1
    result: dict = {"machine": machine(), "checkpoint": str(root), "max_tokens": max_tokens,
                    "requests_per_client": requests_per_client, "speculative": speculative,
                    "compile": compile, "device": device, "dtype": dtype}  # fmt: skip

    port = free_port()
    command = [sys.executable, "-m", "longcat", "serve", str(root), "--port", str(port), "--served-model-name",
               "bench", "--max-batch", str(max(levels))] + (["--speculative"] if speculative else [])  # fmt: skip
    command += (["--compile"] if compile else []) + ["--device", device, "--dtype", dtype]
    server = ServerProcess(command, port, _env(threads), startup_s=900 if compile else 180)  # compiles first
    result["longcat_ready_s"] = server.ready_s  # loading, and with --compile compiling every bucket
    try:

        def ours(i: int) -> dict:
            return {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip

        result["longcat"] = measure(f"http://127.0.0.1:{port}/v1/completions", ours, levels, requests_per_client,
                                    timeout)  # fmt: skip
    finally:
        server.stop()

    if anchor:
        result["anchors"] = transformers_anchors(root, eos, max_tokens, requests_per_client, levels,
                                                 threads, timeout)  # fmt: skip
        served = {name: r for name, r in result["anchors"].items() if "levels" in r}
        if served:
            top = str(max(levels))
            name = max(served, key=lambda n: served[n]["levels"][top]["tokens_per_s"])
            result["anchor"] = name
            anchor_tps = served[name]["levels"][top]["tokens_per_s"]
            ours_tps = result["longcat"][top]["tokens_per_s"]
            result["throughput_ratio_vs_anchor"] = round(ours_tps / anchor_tps, 2) if anchor_tps else None
    low, top = str(min(levels)), str(max(levels))
    ours_low = result["longcat"][low]["tokens_per_s"]
    result[f"throughput_ratio_{top}_vs_{low}"] = (
        round(result["longcat"][top]["tokens_per_s"] / ours_low, 2) if ours_low else None
    )
    result["requests_failed"] = sum(level["failed"] for level in result["longcat"].values())
    return result


def transformers_anchors(root: Path, eos: int, max_tokens: int, requests_per_client: int,  # noqa: ANN001
                         levels: tuple[int, ...], threads: int, timeout: float) -> dict:  # fmt: skip
    anchors: dict = {}
    work = Path(tempfile.mkdtemp(prefix="longcat-bench-serve-"))
    try:
        copy = transformers_copy(root, work / "checkpoint")
        model_id = str(copy)
        generation = json.dumps({"eos_token_id": eos, "min_new_tokens": max_tokens, "max_new_tokens": max_tokens,
                                 "do_sample": False})  # fmt: skip

        def theirs(i: int) -> dict:
            return {"model": model_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}, "generation_config": generation}  # fmt: skip

        cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
        for name, flags in (("transformers serve", []), ("transformers serve --continuous-batching",
                                                           ["--continuous-batching"])):  # fmt: skip
            port = free_port()
            command = [cli, "serve", model_id, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags]
            try:
                server = ServerProcess(command, port, _env(threads))
            except (RuntimeError, OSError) as err:
                anchors[name] = {"error": str(err)[-600:]}
                continue
            try:
                url = f"http://127.0.0.1:{port}/v1/completions"
                levels_out = measure(url, theirs, levels, requests_per_client, timeout)
            finally:
                server.stop()
            failed = sum(level["failed"] for level in levels_out.values())
            if failed:
                first = next(e for level in levels_out.values() for e in level["errors"])
                anchors[name] = {"error": f"{failed} requests failed, e.g. {first}", "partial": levels_out}
            else:
                anchors[name] = {"levels": levels_out}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return anchors


def report(result: dict) -> str:
    lines = [f"serving benchmark: {result['checkpoint']} ({result['max_tokens']} output tokens a request, "
             f"{result['requests_per_client']} requests a client; {result['machine']['cpu']})"]  # fmt: skip
    lines.append(f"longcat serve on {result.get('device', 'cpu')} ({result.get('dtype', 'auto')}) answered /health "
                 f"{result.get('longcat_ready_s', float('nan')):.1f} s after it started")  # fmt: skip
    header = (
        f"{'server':44} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8} {'failed':>6}"
    )
    lines.append(header)
    flags = (" --speculative" if result["speculative"] else "") + (" --compile" if result.get("compile") else "")
    flags += f" --device {result['device']}" if result.get("device", "cpu") != "cpu" else ""
    rows = [("longcat serve" + flags, result["longcat"])]
    for name, anchor in result.get("anchors", {}).items():
        if "levels" in anchor:
            rows.append((name, anchor["levels"]))
    for name, levels in rows:
        for clients, level in levels.items():
            lines.append(f"{name:44} {clients:>7} {level['tokens_per_s']:>8.1f} {_fmt(level['ttft_p50_ms']):>9} "
                         f"{_fmt(level['ttft_p99_ms']):>8} {_fmt(level['tpot_p50_ms']):>9} "
                         f"{_fmt(level['tpot_p99_ms']):>8} {level['failed']:>6}")  # fmt: skip
    for name, anchor in result.get("anchors", {}).items():
        if "error" in anchor:
            lines.append(f"{name}: not usable: {anchor['error'][:300]}")
    if "anchor" in result:
        lines.append(f"anchor: {result['anchor']}; ours / anchor at {max(map(int, result['longcat']))} clients: "
                     f"{result['throughput_ratio_vs_anchor']}x")  # fmt: skip
    for key, value in result.items():
        if key.startswith("throughput_ratio_") and key != "throughput_ratio_vs_anchor":
            lines.append(f"{key}: {value}x")
    lines.append(f"requests failed (ours): {result['requests_failed']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
