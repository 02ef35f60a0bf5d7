"""The OpenAI request schemas we accept, and their translation into engine parameters.

Fields OpenAI defines that we do not implement are refused (400, naming the field) unless they hold
their neutral value (`UNSUPPORTED`); fields nobody defines are ignored (`extra="allow"`), as OpenAI
clients add their own. Extensions beyond OpenAI: `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`
(vLLM's names).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..inference.penalties import Penalties
from ..inference.sampling import SamplingParams
from .engine import RequestParams


class RequestError(ValueError):
    """A request we answer with an OpenAI-shaped error: status, message, the field at fault, a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


# field -> the values that mean "not used" (a request may send them; anything else is refused)
UNSUPPORTED: dict[str, tuple] = {
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}
MAX_STOP = 4
MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Function(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"messages[{index}].content: only text parts are supported, got type {part.get('type')!r}",
                    param=f"messages.{index}.content",
                )
            parts.append(part["text"])
        return "".join(parts)

    def for_template(self, index: int) -> dict:
        """The dict a chat template reads (developer messages are system messages to this model)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        message["content"] = self.text(index)
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class SamplingFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in UNSUPPORTED.items():
            if name in extra and extra[name] not in neutral:
                raise RequestError(
                    f"{name} is not supported by this server; leave it out (or send its neutral value "
                    f"{neutral[1] if len(neutral) > 1 else None!r})",
                    param=name,
                    code="unsupported_parameter",
                )
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise RequestError(f"n must lie in [1, {MAX_N}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream = true", param="stream_options")

    def engine_params(self, max_tokens: int | None, prompt_tokens: int, context: int) -> RequestParams:
        """An omitted max_tokens takes the rest of the context after the prompt."""
        if max_tokens is None:
            if prompt_tokens >= context:
                raise RequestError(
                    f"This model's maximum context length is {context} tokens and the prompt has {prompt_tokens}, "
                    "which leaves none to generate; shorten the prompt",
                    param="messages" if hasattr(self, "messages") else "prompt", code="context_length_exceeded",
                )  # fmt: skip
            max_tokens = context - prompt_tokens
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        temperature = 1.0 if self.temperature is None else self.temperature
        if not temperature >= 0 or temperature > 2:
            raise RequestError(f"temperature must lie in [0, 2], got {temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must lie in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise RequestError(f"top_k must be positive (or -1 / 0 for no limit), got {self.top_k}", param="top_k")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise RequestError(f"seed must lie in [-2**63, 2**64), got {self.seed}", param="seed")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must lie in [0, 1], got {self.min_p}", param="min_p")
        top_k = self.top_k if self.top_k not in (None, 0, -1) else None
        sampling = SamplingParams(
            do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0, top_k=top_k,
            top_p=self.top_p, min_p=self.min_p or None,
        )  # fmt: skip
        return RequestParams(max_tokens=max_tokens, sampling=sampling, seed=self.seed, stop=stop,
                             ignore_eos=self.ignore_eos, penalties=self.penalties())  # fmt: skip

    def penalties(self) -> Penalties:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise RequestError(f"{name} must lie in [-2, 2], got {value}", param=name)
        repetition = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        if not 0 < repetition <= 10:
            raise RequestError(f"repetition_penalty must lie in (0, 10] (1: none), got {repetition}",
                               param="repetition_penalty")  # fmt: skip
        bias = []
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise RequestError(f"logit_bias keys are token ids, got {key!r}", param="logit_bias") from None
            if not -100 <= value <= 100:
                raise RequestError(f"logit_bias values must lie in [-100, 100], got {value} for token {token}",
                                   param="logit_bias")  # fmt: skip
            bias.append((token, float(value)))
        return Penalties(presence=self.presence_penalty or 0.0, frequency=self.frequency_penalty or 0.0,
                         repetition=repetition, bias=tuple(bias))  # fmt: skip


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def check(self) -> None:
        self.refuse_unsupported()
        if not self.messages:
            raise RequestError("messages must hold at least one message", param="messages")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs = true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise RequestError(f"top_logprobs must lie in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False

    def check(self) -> None:
        self.refuse_unsupported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must lie in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)
