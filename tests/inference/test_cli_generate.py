from __future__ import annotations

import json
import shutil

import pytest
from tests.conftest import tiny_train_config

from longcat.cli import main
from longcat.inference.chat import CheckpointTokenizer
from longcat.training.trainer import train


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(tiny_train_config(small_data, max_steps=3, eval_every=3, seq_len=64), out, progress=False)
    return out / "final"


def _library(checkpoint, text: str, **kwargs) -> str:
    """What the library generates for `text`: the CLI's output must be exactly this."""
    from longcat import LongcatForCausalLM

    tokenizer = CheckpointTokenizer(checkpoint)
    model = LongcatForCausalLM.from_pretrained(checkpoint).eval()
    ids = tokenizer.encode(text)
    return tokenizer.decode(model.generate([ids], **kwargs)[0, len(ids) :].tolist())


def test_generate_cli_plain_chat_stream_speculative(trained, capsys) -> None:
    assert main(["generate", str(trained), "--prompt", "In the beginning", "--max-new-tokens", "6"]) == 0
    plain = capsys.readouterr().out
    assert plain == _library(trained, "In the beginning", max_new_tokens=6) + "\n"
    assert main(["generate", str(trained), "--prompt", "In the beginning", "--max-new-tokens", "6", "--stream"]) == 0
    assert capsys.readouterr().out == plain
    args = ["generate", str(trained), "--prompt", "In the beginning", "--max-new-tokens", "6", "--speculative"]
    assert main([*args, "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "MTP acceptance" in captured.err
    chat = ["generate", str(trained), "--prompt", "Hi", "--chat", "--system", "Be brief.", "--sample", "--seed", "1",
            "--max-new-tokens", "4"]  # fmt: skip
    assert main([*chat, "--stats"]) == 0
    captured = capsys.readouterr()
    prompt = "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:"  # the LongCat format, the template training writes
    assert captured.out == _library(trained, prompt, max_new_tokens=4, do_sample=True, seed=1) + "\n"
    # a model trained 3 steps samples nearly the same from any prompt, so check the prompt it was given
    prompt_tokens = len(CheckpointTokenizer(trained).encode(prompt))
    assert prompt_tokens > len(CheckpointTokenizer(trained).encode("Hi"))
    assert captured.err.startswith(f"{prompt_tokens} prompt tokens; 4 tokens in ")


def test_generate_cli_errors(trained, tmp_path, capsys) -> None:
    assert main(["generate", str(trained), "--prompt", ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    no_tok = tmp_path / "no_tok"
    shutil.copytree(trained, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert main(["generate", str(no_tok), "--prompt", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", str(trained), "--prompt", "x", "--max-new-tokens", "100000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_decode_on_a_trained_checkpoint(trained, capsys) -> None:
    pytest.importorskip("transformers")
    from longcat.bench import decode

    result = decode.run(checkpoint=str(trained), contexts=(16,), new_tokens=4, repeats=1, spec_prompts=2, batches=(3,),
                        batch_prompt=8)  # fmt: skip
    assert result["same_greedy_output_16"] is True
    concurrent = result["concurrent"]["3"]
    assert min(concurrent["longcat"], concurrent["longcat_compiled"], concurrent["speedup_vs_transformers"]) > 0
    assert result["compile_s"]["16"] >= 0 and "3 concurrent requests" in decode.report(result)
    assert result["speedup_vs_transformers_16"] > 0 and result["speedup_vs_transformers_16_eager"] > 0
    assert result["speculative_output_identical"] is True and 0 <= result["acceptance_rate"] <= 1
    assert result["speculative_speedup_compiled"] > 0
    assert "MTP speculative" in decode.report(result)


@pytest.mark.slow
def test_bench_decode_of_a_preset_with_overrides_in_bf16(capsys, monkeypatch) -> None:
    """--preset, --set model.FIELD and --dtype choose the model (no checkpoint); both sides decode it."""
    pytest.importorskip("transformers")
    import longcat.bench.decode as decode
    from longcat.cli import main

    original = decode.run
    monkeypatch.setattr(decode, "run", lambda **kw: original(**kw, contexts=(16,), new_tokens=4))  # kept short
    args = ["bench", "decode", "--preset", "tiny", "--set", "model.num_layers=1", "--set", "model.hidden_size=48",
            "--dtype", "bfloat16", "--rounds", "2", "--json"]  # fmt: skip
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bfloat16" and result["overrides"]["hidden_size"] == 48 and result["preset"] == "tiny"
    rates = result["tokens_per_s"]["16"]
    assert rates["longcat"] > 0 and rates["longcat_compiled"] > 0 and rates["transformers"] > 0


def test_checkpoint_chat_templates(trained, tmp_path) -> None:
    """A tokenizer's own template renders as transformers would: the list form's "default" entry,
    special tokens in their AddedToken form, chat_template.jinja when tokenizer_config has none."""
    import json

    from longcat.inference.chat import CheckpointTokenizer

    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    config_path = root / "tokenizer_config.json"
    base = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
    templates = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]
    config = {**base, "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "chat_template": templates}
    config_path.write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    assert CheckpointTokenizer(root).chat(messages) == "<s><user>hi</s>"
    config.pop("chat_template")
    config_path.write_text(json.dumps(config))
    (root / "chat_template.jinja").write_text("[{{ messages[0].content }}]")
    assert CheckpointTokenizer(root).chat(messages) == "[hi]"
    # what transformers' environment offers templates: loop controls, tojson, tools
    (root / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "{% if tools %}|{{ tools | tojson }}{% endif %}"
    )
    two = [*messages, {"role": "user", "content": "again"}]
    assert CheckpointTokenizer(root).chat(two, tools=[{"name": "f"}]) == 'hi|[{"name": "f"}]'


def test_generate_cli_flag_mistakes_and_hub_ids(trained, capsys, monkeypatch) -> None:
    assert main(["generate", str(trained), "--prompt", "x", "--system", "Be brief."]) == 2
    assert "--chat" in capsys.readouterr().err
    assert main(["generate", str(trained), "--prompt", "x", "--draft-tokens", "2"]) == 2
    assert "--speculative" in capsys.readouterr().err
    assert (
        main(["generate", str(trained), "--prompt", "x", "--sample", "--temperature", "0", "--max-new-tokens", "2"])
        == 2
    )
    assert "temperature" in capsys.readouterr().err
    for flag, value in (("--temperature", "-1"), ("--top-k", "5"), ("--top-p", "0.5")):  # without --sample
        assert main(["generate", str(trained), "--prompt", "x", flag, value]) == 2
        assert flag in capsys.readouterr().err
    huggingface_hub = pytest.importorskip("huggingface_hub")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kwargs: asked.append(repo) or str(trained))
    assert main(["generate", "someone/longcat-tiny", "--prompt", "In the beginning", "--max-new-tokens", "3"]) == 0
    assert asked and set(asked) == {"someone/longcat-tiny"}
    assert capsys.readouterr().out == _library(trained, "In the beginning", max_new_tokens=3) + "\n"
