"""The checkpoint's tokenizer and chat template.

A checkpoint whose tokenizer_config.json (or chat_template.jinja) carries a `chat_template` is rendered
with it, in the environment transformers renders templates in; one without is rendered in LongCat's
format (chat_template.py), with the same template when jinja2 is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import CheckpointError
from .chat_template import END_OF_TURN, LONGCAT_CHAT_TEMPLATE, longcat_chat_prompt
from .generate import GenerationError

__all__ = ["END_OF_TURN", "CheckpointTokenizer", "longcat_chat_prompt"]


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

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str = "auto") -> str:
        """The prompt for the assistant's next answer to `messages` (OpenAI-style dicts)."""
        if self.chat_template:
            return self._render(self.chat_template, messages, tools, tool_choice)
        try:
            return self._render(LONGCAT_CHAT_TEMPLATE, messages, tools, tool_choice)
        except CheckpointError:  # no jinja2: the same format in Python
            try:
                return longcat_chat_prompt(messages, tools, tool_choice)
            except (KeyError, ValueError) as err:
                raise GenerationError(f"cannot render the conversation: {err}") from err

    def _render(self, template: str, messages: list[dict], tools: list[dict] | None, tool_choice: str) -> str:
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
        tokens = {"bos_token": "", "eos_token": "", **self.special_tokens}
        try:
            return environment.from_string(template).render(
                messages=messages, tools=tools, tool_choice=tool_choice, add_generation_prompt=True, **tokens
            )
        except GenerationError:
            raise
        except Exception as err:  # a template error names what the conversation lacks
            raise GenerationError(f"the chat template cannot render this conversation: {err}") from err


def _pick_template(value: object) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {"name", "template"} (the "default" one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None
