"""`longcat serve`: load a checkpoint, start the engine thread, run the HTTP app under uvicorn.

Shutdown (SIGTERM or Ctrl-C): new requests get 503 at once; running ones may finish for up to
`shutdown_timeout` seconds; the rest are then ended with finish_reason `abort` (their streams get a
last chunk and `[DONE]`); uvicorn closes the connections and the process exits with status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import uvicorn

from .api import ServerState, create_app
from .engine import Engine
from .metrics import Metrics

log = logging.getLogger("longcat.serve")


@dataclass
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    speculative: bool = False
    num_draft_tokens: int = 1
    prefill_chunk: int = 512
    max_model_len: int | None = None
    compile: bool = False
    shutdown_timeout: float = 10.0
    dtype: str | None = None
    device: str | None = None
    log_level: str = "warning"


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the shutdown above instead of its own (which waits for every connection
    without limit and then re-raises the signal, so the process would not exit 0)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, timeout: float) -> None:
        super().__init__(config)
        self.state, self.timeout = state, timeout
        self.draining_since: float | None = None

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        if self.draining_since is not None:
            if sig == signal.SIGINT:  # a second Ctrl-C: stop now
                self.state.engine.cancel_all()
                self.force_exit = self.should_exit = True
            return
        self.draining_since = time.monotonic()
        self.state.draining = True
        threading.Thread(target=self._drain, name="longcat-drain", daemon=True).start()

    def _drain(self) -> None:
        engine = self.state.engine
        deadline = self.draining_since + self.timeout
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.02)
        if engine.active:
            log.warning("shutdown: ending %d unfinished requests (finish_reason 'abort')", engine.active)
            engine.cancel_all()
            end = time.monotonic() + 5.0
            while engine.active and time.monotonic() < end:
                time.sleep(0.02)
        time.sleep(0.2)  # let the last chunks reach the sockets before uvicorn closes them
        self.should_exit = True


def build_state(options: ServeOptions) -> ServerState:
    from ..inference.chat import CheckpointTokenizer
    from ..model.lm import LongcatForCausalLM

    tokenizer = CheckpointTokenizer(options.checkpoint)  # first: a missing tokenizer fails before loading weights
    model = LongcatForCausalLM.from_pretrained(options.checkpoint, dtype=options.dtype, device=options.device)
    metrics = Metrics()
    metrics.slots_total.set(options.max_batch)
    engine = Engine(
        model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
        speculative=options.speculative, num_draft_tokens=options.num_draft_tokens,
        prefill_chunk=options.prefill_chunk, metrics=metrics, max_model_len=options.max_model_len,
        compile=options.compile,
    )  # fmt: skip
    if engine.compiled is not None:  # before the port opens: no request waits for a compilation
        started = time.monotonic()
        sizes = engine.warm_up()
        what = "speculation rounds" if engine.speculative else "decode steps"
        log.warning("compiled %s for batches of %s in %.0f s", what, sizes, time.monotonic() - started)
    name = options.served_model_name or options.checkpoint
    return ServerState(engine, tokenizer, name, metrics, os.environ.get("LONGCAT_API_KEY") or None)


def serve(options: ServeOptions) -> int:
    state = build_state(options)
    app = create_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            access_log=False, timeout_graceful_shutdown=5)  # fmt: skip
    server = DrainingServer(config, state, options.shutdown_timeout)
    state.engine.start()
    try:
        server.run()
    finally:
        state.engine.stop()
    return 0 if server.started else 1
