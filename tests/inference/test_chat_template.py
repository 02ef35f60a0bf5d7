"""LongCat's chat format: the Jinja template written into checkpoints renders exactly what the Python
reference does, and transformers renders a checkpoint's conversations as our server does."""

from __future__ import annotations

import json

import pytest

from longcat.inference.chat import CheckpointTokenizer
from longcat.inference.chat_template import LONGCAT_CHAT_TEMPLATE, longcat_chat_prompt

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名前"}},
                    "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time."}},
]  # fmt: skip
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"}],
    [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [CALL, {**CALL, "function": {"name": "now", "arguments": {}}}]},
     {"role": "tool", "name": "get_weather", "content": '{"temp": "20 °C"}', "tool_call_id": "c1"},
     {"role": "tool", "content": "12:00"},
     {"role": "assistant", "content": "It is 20 °C."}, {"role": "user", "content": "Thanks"}],
]  # fmt: skip


def _tokenizer(tmp_path, template: str | None) -> CheckpointTokenizer:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</longcat_s>"}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return CheckpointTokenizer(tmp_path)


def test_known_rendering() -> None:
    assert longcat_chat_prompt(CONVERSATIONS[1]) == (
        "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:Hello</longcat_s> [Round 1] USER:Bye? ASSISTANT:"
    )
    text = longcat_chat_prompt(CONVERSATIONS[2], TOOLS)
    head = "# Tools\nYou have access to the following tools: \n\n## Tool namespace: function\n\n"
    assert text.startswith(
        head + "### Tool name: get_weather\n\nDescription: Weather for a city.\n\nInputSchema: \n{\n"
    )
    assert '"description": "名前"' in text and "# Messages\nSYSTEM:Use tools. [Round 0] USER:Weather" in text
    assert (' ASSISTANT:<longcat_tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</longcat_tool_call><longcat_tool_call>\n{"name": "now", "arguments": {}}\n</longcat_tool_call>'
            '</longcat_s> TOOL:{"name": "get_weather", "content": "{\\"temp\\": \\"20 °C\\"}"} TOOL:{"content": '
            '"12:00"} ASSISTANT:It is 20 °C.</longcat_s> [Round 1] USER:Thanks ASSISTANT:') in text  # fmt: skip
    assert longcat_chat_prompt(CONVERSATIONS[0], TOOLS, tool_choice="none") == "[Round 0] USER:Hi ASSISTANT:"


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("tool_choice", ["auto", "none"])
def test_template_equals_the_python_reference(tmp_path, index, tools, tool_choice) -> None:
    messages = CONVERSATIONS[index]
    for template in (LONGCAT_CHAT_TEMPLATE, None):  # written into checkpoints / the built-in fallback
        rendered = _tokenizer(tmp_path, template).chat(messages, tools, tool_choice)
        assert rendered == longcat_chat_prompt(messages, tools, tool_choice)


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_transformers_renders_a_checkpoint_like_our_server(tmp_path, index) -> None:
    transformers = pytest.importorskip("transformers")
    ours = _tokenizer(tmp_path, LONGCAT_CHAT_TEMPLATE)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[index]
    expected = theirs.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.chat(messages, TOOLS) == expected


def test_unknown_roles_are_named(tmp_path) -> None:
    from longcat.inference.generate import GenerationError

    with pytest.raises(GenerationError, match="unknown chat role robot"):
        _tokenizer(tmp_path, None).chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="unknown chat role 'robot'"):
        longcat_chat_prompt([{"role": "robot", "content": "x"}])


def test_prepared_data_and_checkpoints_carry_the_template(small_data, tmp_path) -> None:
    from longcat.data.prepare import copy_tokenizer

    assert json.loads((small_data / "tokenizer_config.json").read_text())["chat_template"] == LONGCAT_CHAT_TEMPLATE
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer_config.json").write_text(json.dumps({"eos_token": "x"}))  # prepared before templates
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer([old / "tokenizer_config.json"], out)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == LONGCAT_CHAT_TEMPLATE
