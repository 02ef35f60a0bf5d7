"""Prompt formatting and the checkpoint's tokenizer.

LongCat's chat format (tokenizer_config.json of LongCat-Flash-Chat): an optional `SYSTEM:{system} `
prefix, then rounds `[Round i] USER:{query} ASSISTANT:{answer}</longcat_s>` numbered from 0; the
prompt for a new answer ends with `ASSISTANT:`. A checkpoint whose tokenizer_config.json carries its
own `chat_template` is rendered with that template instead (needs jinja2, which transformers brings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import CheckpointError
from .generate import GenerationError

END_OF_TURN = "</longcat_s>"


def longcat_chat_prompt(messages: list[dict[str, str]]) -> str:
    """messages: [{"role": "system" | "user" | "assistant", "content": ...}, ...] ending with a user turn."""
    system = "".join(f"SYSTEM:{m['content']} " for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("a chat prompt must end with a user message")
    out, round_index = [system], 0
    for message in turns:
        if message["role"] == "user":
            out.append(f"[Round {round_index}] USER:{message['content']} ASSISTANT:")
            round_index += 1
        elif message["role"] == "assistant":
            out.append(f"{message['content']}{END_OF_TURN}")
        else:
            raise ValueError(f"unknown chat role {message['role']!r}; use system, user or assistant")
    return "".join(out)


class CheckpointTokenizer:
    """tokenizer.json (HF tokenizers) from a checkpoint directory, with its chat template if any."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        root = Path(directory)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"{root} has no tokenizer.json; copy the tokenizer the model was trained with into it "
                "(`longcat train` writes one into final/ and every checkpoint)"
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = root / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = _pick_template(config.get("chat_template"))
        if self.chat_template is None and (root / "chat_template.jinja").is_file():
            self.chat_template = (root / "chat_template.jinja").read_text()  # where transformers >= 4.43 saves it
        # special tokens as the template sees them (transformers passes them all); the dict form is an AddedToken
        self.special_tokens = {
            key: value["content"] if isinstance(value, dict) else value
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if isinstance(value := config.get(key), (str, dict))
        }

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]], tools: list[dict] | None = None) -> str:
        if self.chat_template:
            return self._render(messages, tools)
        if tools:
            raise GenerationError("tools need a checkpoint whose chat template renders them; this one has none")
        return longcat_chat_prompt(messages)

    def _render(self, messages: list[dict[str, str]], tools: list[dict] | None) -> str:
        """The template in the environment transformers renders chat templates in: sandboxed, the same
        whitespace rules, loop controls, `raise_exception`, `strftime_now` and a `tojson` filter."""
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as err:
            raise CheckpointError("this tokenizer's chat_template needs jinja2: pip install jinja2") from err
        import datetime

        def raise_exception(message: str) -> None:
            raise GenerationError(f"the checkpoint's chat template refused the messages: {message}")

        def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators=None,  # noqa: ANN001
                   sort_keys: bool = False) -> str:  # fmt: skip
            return json.dumps(
                value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
            )

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = tojson
        environment.globals["raise_exception"] = raise_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        template = environment.from_string(self.chat_template)
        tokens = {"bos_token": "", "eos_token": "", **self.special_tokens}
        return template.render(messages=messages, tools=tools, add_generation_prompt=True, **tokens)


def _pick_template(value: object) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None
