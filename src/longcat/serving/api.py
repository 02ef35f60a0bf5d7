"""The OpenAI-compatible HTTP layer: FastAPI routes over the engine, nothing more.

Each request is rendered to token ids (chat template, tokenizer), checked, and handed to the engine,
whose outputs come back through an asyncio queue; responses and stream chunks take OpenAI's shapes.
Every error is `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.generate import GenerationError
from .engine import Choice, Engine, EngineError, Output, QueueFull, RequestParams
from .engine import Request as EngineRequest
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, RequestError
from .tool_calls import ToolCallStream

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 5


class Gate:
    """API key and shutdown checks for /v1, as plain ASGI middleware: Starlette's BaseHTTPMiddleware
    (what `@app.middleware` builds) would hide client disconnects from the routes."""

    def __init__(self, app, state: ServerState) -> None:  # noqa: ANN001
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            refusal = None
            if self.state.api_key is not None:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not secrets.compare_digest(given, f"Bearer {self.state.api_key}".encode("latin-1")):
                    refusal = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                             code="invalid_api_key")  # fmt: skip
            if refusal is None and self.state.draining:
                refusal = error_response(503, "the server is shutting down", code="server_shutting_down",
                                         headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str | None = None, headers: dict | None = None) -> JSONResponse:  # fmt: skip
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ServerState:
    def __init__(self, engine: Engine, tokenizer, model_name: str, metrics: Metrics, api_key: str | None) -> None:  # noqa: ANN001
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.metrics, self.api_key = metrics, api_key
        self.draining = False
        self.created = int(time.time())


class Submission:
    """The engine requests of one HTTP request (each prompt's n choices) seen from the event loop: their
    outputs arrive on one asyncio queue as (choice index, Output)."""

    def __init__(self, state: ServerState, items: list[tuple[list[int], RequestParams]]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.state = state
        self.requests: list[EngineRequest] = []
        self.open: set[int] = set()
        try:
            for index, (prompt, params) in enumerate(items):
                self.requests.append(state.engine.submit(prompt, params, functools.partial(self._sink, index)))
                self.open.add(index)
        except Exception:  # a full queue part-way: the choices already queued go too
            self.cancel()
            raise

    def _sink(self, index: int, out: Output) -> None:  # the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

    async def outputs(self, client: Request | None = None) -> AsyncIterator[tuple[int, Output]]:
        """The engine's outputs until every choice's last. With `client` (a whole, non-streamed response)
        the connection is checked every DISCONNECT_POLL_S whether or not outputs arrive, and a client that
        went away cancels the requests (a stream's generator is cancelled by Starlette instead)."""
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while self.open:
            try:
                item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                item = None
            if client is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await client.is_disconnected():
                    self.cancel()
                    return
            if item is None:
                continue
            index, out = item
            if out.finish_reason is not None:
                self.open.discard(index)
            yield index, out

    def cancel(self) -> None:
        for index in sorted(self.open):
            self.state.engine.cancel(self.requests[index])
        self.open.clear()


def token_text(tokenizer, token: int) -> str:  # noqa: ANN001
    return tokenizer.decode([token])


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_usage(lasts: dict[int, Output], n: int) -> dict:
    """Each prompt counted once (choice index p * n + j belongs to prompt p), every completion."""
    prompt = sum(out.prompt_tokens for index, out in lasts.items() if index % n == 0)
    return usage(prompt, sum(out.completion_tokens for out in lasts.values()))


def choice_params(params: RequestParams, n: int) -> list[RequestParams]:
    """A prompt's n choices: seeded requests get seeds seed, seed + 1, ..., so each choice differs and the
    request as a whole repeats."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + j) for j in range(n)]


def chat_logprobs(tokenizer, choices: list[Choice]) -> dict:  # noqa: ANN001
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in c.top or []]}
                        for c in choices]}  # fmt: skip


def completion_logprobs(tokenizer, choices: list[Choice | None], offset: int) -> dict:  # noqa: ANN001
    """OpenAI's legacy form; a None entry is the prompt's first token (no log-probability)."""
    tokens, values, tops, offsets = [], [], [], []
    for choice in choices:
        text = token_text(tokenizer, choice.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(choice.logprob)
        tops.append(None if choice.top is None else {token_text(tokenizer, t): lp for t, lp in choice.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="longcat", docs_url=None, redoc_url=None)
    app.state.longcat = state

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
        message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=where or None, code="invalid_value")

    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
        return error_response(err.status, str(err), err.param, err.code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
        return error_response(err.status_code, str(err.detail), code=None, headers=getattr(err, "headers", None))

    app.add_middleware(Gate, state=state)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return error_response(503, "the server is shutting down", code="server_shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "longcat",
                "max_model_len": state.engine.context}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, client: Request) -> Response:
        body.check()
        check_model(state, body.model)
        messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None

        def render() -> list[int]:  # off the event loop: a long conversation would stall every stream
            try:
                text = state.tokenizer.chat(messages, tools, body.tool_choice or "auto")
            except GenerationError as err:
                raise RequestError(str(err), param="messages") from err
            return state.tokenizer.encode(text)

        prompt = await asyncio.to_thread(render)
        params = body.engine_params(body.limit(), len(prompt), state.engine.context)
        if body.logprobs:
            params.logprobs = body.top_logprobs or 0
        submission = submit(state, [(prompt, p) for p in choice_params(params, body.n or 1)])
        if body.stream:
            return sse(chat_stream(state, body, submission))
        return await chat_whole(state, body, submission, client)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, client: Request) -> Response:
        body.check()
        check_model(state, body.model)
        encode = lambda: [p if isinstance(p, list) else state.tokenizer.encode(p) for p in body.prompts()]  # noqa: E731
        prompts = await asyncio.to_thread(encode)
        if body.stream and len(prompts) > 1:
            raise RequestError("stream = true takes one prompt per request", param="prompt")
        items = []
        for ids in prompts:
            params = body.engine_params(body.max_tokens, len(ids), state.engine.context)
            params.logprobs = body.logprobs
            if body.echo and body.logprobs is not None:
                params.prompt_logprobs = body.logprobs
            items += [(ids, p) for p in choice_params(params, body.n or 1)]
        submission = submit(state, items)
        if body.stream:
            return sse(completion_stream(state, body, submission))
        return await completion_whole(state, body, submission, client)

    return app


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise RequestError(f"The model '{model}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found", status=404)  # fmt: skip


def submit(state: ServerState, items: list[tuple[list[int], RequestParams]]) -> Submission:
    capacity = state.engine.max_batch + state.engine.max_queue
    if len(items) > capacity:  # never servable, so not a 503 to retry
        raise RequestError(f"this request asks for {len(items)} choices (prompts x n); this server holds at most "
                           f"{capacity} requests (--max-batch + --max-queue): lower n or split the prompts",
                           param="n")  # fmt: skip
    try:
        return Submission(state, items)
    except EngineError as err:
        raise RequestError(str(err), param=err.param, code=err.code) from err
    except QueueFull as err:
        raise RequestError(f"the server is busy ({err}); retry later", code="server_busy", status=503) from err


def sse(chunks: AsyncIterator[dict | str]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False)}\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def failure(out: Output) -> dict:
    return {"error": {"message": f"generation failed: {out.error}", "type": "server_error", "param": None,
                      "code": "generation_failed"}}  # fmt: skip


async def chat_stream(state: ServerState, body: ChatCompletionRequest, submission: Submission) -> AsyncIterator:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": state.model_name}  # fmt: skip

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    choices = len(submission.requests)
    tools = {i: ToolCallStream() for i in range(choices)} if body.uses_tools else None
    calls = dict.fromkeys(range(choices), 0)
    lasts: dict[int, Output] = {}
    try:
        for index in range(choices):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, out in submission.outputs():
            lasts[index] = out
            if out.finish_reason == "error":
                yield failure(out)
                break
            text, new_calls = tools[index].push(out.text) if tools else (out.text, [])
            if out.finish_reason is not None and tools:
                more, _ = tools[index].finish()
                text += more
            logprobs = chat_logprobs(state.tokenizer, out.logprobs) if out.logprobs else None
            if text or logprobs:
                yield chunk(index, {"content": text}, logprobs=logprobs)
            for call in new_calls:
                yield chunk(index, {"tool_calls": [call.to_openai(calls[index])]})
                calls[index] += 1
            if out.finish_reason is not None:
                reason = "tool_calls" if calls[index] and out.finish_reason == "stop" else out.finish_reason
                yield chunk(index, {}, reason)
        if lasts and body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": total_usage(lasts, choices)}
        yield "[DONE]"
    finally:
        submission.cancel()  # a client gone mid-stream: the engine frees the slots at the next step


async def whole_outputs(submission: Submission, client: Request) -> dict[int, list[Output]] | Response:
    """Every choice's outputs; or the response that ends the request instead: 499 when the client went
    away, 500 with the failure when a choice's generation failed."""
    outs: dict[int, list[Output]] = {i: [] for i in range(len(submission.requests))}
    try:
        async for index, out in submission.outputs(client):
            outs[index].append(out)
    finally:
        submission.cancel()
    if any(not o or o[-1].finish_reason is None for o in outs.values()):
        return Response(status_code=499)
    failed = [o[-1] for o in outs.values() if o[-1].finish_reason == "error"]
    return JSONResponse(failure(failed[0]), status_code=500) if failed else outs


async def chat_whole(state: ServerState, body: ChatCompletionRequest, submission: Submission,
                     client: Request) -> Response:  # fmt: skip
    outs = await whole_outputs(submission, client)
    if isinstance(outs, Response):
        return outs
    choices = []
    for index, chunks in outs.items():
        last = chunks[-1]
        content, calls = "".join(o.text for o in chunks), []
        if body.uses_tools:
            from .tool_calls import parse_tool_calls

            content, calls = parse_tool_calls(content)
        message = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        reason = "tool_calls" if calls and last.finish_reason == "stop" else last.finish_reason
        logprobs = [c for o in chunks for c in o.logprobs]
        choices.append({"index": index, "message": message, "logprobs": chat_logprobs(state.tokenizer, logprobs)
                        if body.logprobs else None, "finish_reason": reason})  # fmt: skip
    lasts = {index: chunks[-1] for index, chunks in outs.items()}
    return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                         "created": int(time.time()), "model": state.model_name, "choices": choices,
                         "usage": total_usage(lasts, len(choices))})  # fmt: skip


def echo_prefix(state: ServerState, prompt: list[int], first: Output, logprobs: bool) -> tuple[str, list]:
    """The prompt's text and, with logprobs, its tokens' entries (the first has no log-probability)."""
    text = state.tokenizer.decode(prompt)
    if not logprobs:
        return text, []
    entries = [Choice(prompt[0], None, None), *(first.prompt_logprobs or [])]
    return text, entries


async def completion_stream(state: ServerState, body: CompletionRequest, submission: Submission) -> AsyncIterator:
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}  # fmt: skip
    offsets: dict[int, int] = {}
    lasts: dict[int, Output] = {}
    try:
        async for index, out in submission.outputs():
            lasts[index] = out
            if out.finish_reason == "error":
                yield failure(out)
                break
            text, entries = out.text, list(out.logprobs)
            if index not in offsets and body.echo:
                prompt = submission.requests[index].prompt
                prefix, prompt_entries = echo_prefix(state, prompt, out, body.logprobs is not None)
                text, entries = prefix + text, prompt_entries + entries
            offset = offsets.get(index, 0)
            logprobs = completion_logprobs(state.tokenizer, entries, offset) if body.logprobs is not None else None
            offsets[index] = offset + len(text)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
            yield {**head, "choices": [choice]}
        if lasts and body.stream_options and body.stream_options.include_usage:
            yield {**head, "choices": [], "usage": total_usage(lasts, len(submission.requests))}
        yield "[DONE]"
    finally:
        submission.cancel()


async def completion_whole(state: ServerState, body: CompletionRequest, submission: Submission,
                           client: Request) -> Response:  # fmt: skip
    outs = await whole_outputs(submission, client)
    if isinstance(outs, Response):
        return outs
    choices = []
    for index, chunks in outs.items():
        last = chunks[-1]
        text, entries = "".join(o.text for o in chunks), [c for o in chunks for c in o.logprobs]
        if body.echo:
            prompt = submission.requests[index].prompt
            prefix, prompt_entries = echo_prefix(state, prompt, chunks[0], body.logprobs is not None)
            text, entries = prefix + text, prompt_entries + entries
        logprobs = completion_logprobs(state.tokenizer, entries, 0) if body.logprobs is not None else None
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": last.finish_reason})
    lasts = {index: chunks[-1] for index, chunks in outs.items()}
    return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                         "model": state.model_name, "choices": choices,
                         "usage": total_usage(lasts, body.n or 1)})  # fmt: skip
