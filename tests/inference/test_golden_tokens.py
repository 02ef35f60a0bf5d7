"""Golden greedy tokens of every decoding entry point, plain and with MTP speculation, on the tests'
models: written before decoding is rewritten as one engine (issue 23), so "the same tokens" is checked
against a file, not remembered. LONGCAT_RECORD_GOLDEN=1 writes the file from the code as it is.

Each case also records the smallest gap between the top two logits along its tokens (from one full
forward over the final sequence): a gap far above float rounding is what lets a greedy token be pinned
across machines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM
from longcat.serving.engine import Engine, RequestParams

GOLDEN = Path(__file__).with_name("golden_tokens.json")
SEEDS = (3, 5, 8)
NEW = 24


class _IdTokens:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def _model(seed: int) -> LongcatForCausalLM:
    model = LongcatForCausalLM(random_tiny_config(seed, max_position_embeddings=160), seed=seed).eval()
    perturb(model, seed)
    return model


def _prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 11, 2)]


def _engine_tokens(model: LongcatForCausalLM, prompts: list[list[int]], speculative: bool) -> list[list[int]]:
    engine = Engine(model, _IdTokens(), max_batch=4, speculative=speculative)
    outs: list[list] = [[] for _ in prompts]
    for prompt, out in zip(prompts, outs):
        engine.submit(prompt, RequestParams(max_tokens=NEW, ignore_eos=True), out.append)
    for _ in range(10 * NEW):
        if all(o and o[-1].finish_reason for o in outs):
            break
        engine.step()
    return [[t for o in out for t in o.token_ids] for out in outs]


def _cases(seed: int) -> dict[str, list[list[int]]]:
    model = _model(seed)
    prompts = _prompts(model.config.vocab_size, seed)
    generate = lambda p, **kw: model.generate([p], max_new_tokens=NEW, eos_token_id=[], **kw)[0, len(p) :].tolist()  # noqa: E731
    batch = model.generate(prompts, max_new_tokens=NEW, eos_token_id=[])
    width = max(map(len, prompts))
    return {
        "generate": [generate(p) for p in prompts],
        "generate_batch": [batch[i, width:].tolist() for i in range(len(prompts))],
        "generate_mtp_1": [generate(p, speculative="mtp", num_draft_tokens=1) for p in prompts],
        "generate_mtp_3": [generate(p, speculative="mtp", num_draft_tokens=3) for p in prompts],
        "engine": _engine_tokens(model, prompts, speculative=False),
        "engine_mtp": _engine_tokens(model, prompts, speculative=True),
    }


def _smallest_gap(model: LongcatForCausalLM, prompt: list[int], tokens: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]  # [NEW, V]
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_tokens_equal_the_golden_file(seed: int) -> None:
    cases = _cases(seed)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("LONGCAT_RECORD_GOLDEN") == "1":
        model = _model(seed)
        prompts = _prompts(model.config.vocab_size, seed)
        gap = min(_smallest_gap(model, p, t) for p, t in zip(prompts, cases["generate"]))
        golden[str(seed)] = {"prompts": prompts, "smallest_top2_gap": gap, **cases}
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    record = golden[str(seed)]
    assert record["prompts"] == _prompts(_model(seed).config.vocab_size, seed)
    for name, tokens in cases.items():
        assert tokens == record[name], name
    # every entry point agrees with plain greedy generation, as the file records
    assert all(record[name] == record["generate"] for name in cases)
