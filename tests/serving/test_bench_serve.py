"""`longcat bench serve` at a small size: both servers start, every request completes, the ratios the
issue asks for are computed from what was measured."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat import LongcatForCausalLM
from longcat.bench import serve as bench_serve
from longcat.data.prepare import copy_tokenizer


@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_ckpt")
    model = LongcatForCausalLM(random_tiny_config(4, vocab_size=384, max_position_embeddings=256))
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(out)
    copy_tokenizer([small_data / "tokenizer.json", small_data / "tokenizer_config.json"], out)
    return out


@pytest.mark.slow
def test_bench_serve_against_transformers(checkpoint) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = bench_serve.run(str(checkpoint), max_tokens=6, requests_per_client=1, levels=(1, 3))
    ours = result["longcat"]
    assert result["requests_failed"] == 0 and result["longcat_ready_s"] > 0 and result["device"] == "cpu"
    assert {level["output_tokens"] for level in ours.values()} == {6, 18}  # ignore_eos: exact lengths
    assert result["throughput_ratio_3_vs_1"] == pytest.approx(ours["3"]["tokens_per_s"] / ours["1"]["tokens_per_s"],
                                                              abs=0.01)  # fmt: skip
    anchors = result["anchors"]
    assert set(anchors) == {"transformers serve", "transformers serve --continuous-batching"}
    plain = anchors["transformers serve"]
    assert "levels" in plain, plain
    assert plain["levels"]["3"]["output_tokens"] == 18  # min_new_tokens held it to the same length
    assert result["anchor"] in anchors
    top = anchors[result["anchor"]]["levels"]["3"]["tokens_per_s"]
    assert result["throughput_ratio_vs_anchor"] == pytest.approx(ours["3"]["tokens_per_s"] / top, abs=0.01)
    assert "ours / anchor at 3 clients" in bench_serve.report(result)
