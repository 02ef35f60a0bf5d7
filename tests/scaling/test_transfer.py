"""Width transfer (paper Table 1) and the widened model config."""

from __future__ import annotations

import math

import pytest

from longcat.config import ConfigError
from longcat.scaling.transfer import check_same_shape, transfer, transfer_factors, widen

PROXY_STD = {"embedding": 0.02, "hidden": 0.02, "unembedding": 0.01, "router": 0.02}
PROXY_LR = {"embedding": 3e-3, "hidden": 3e-3, "unembedding": 1e-3, "router": 3e-3, "no_decay": 3e-3}


def test_table_1_at_s_8_proxy_768_to_6144() -> None:
    _, s = widen({"hidden_size": 768}, 6144)
    assert s == 8
    std, lr = transfer(PROXY_STD, PROXY_LR, s)
    # embedding: variance and LR unchanged
    assert std["embedding"] == PROXY_STD["embedding"] and lr["embedding"] == PROXY_LR["embedding"]
    # hidden (router included) and unembedding: variance / 8 (std / sqrt 8), LR / 8
    for group in ("hidden", "router", "unembedding"):
        assert std[group] ** 2 == pytest.approx(PROXY_STD[group] ** 2 / 8, rel=1e-12)
        assert lr[group] == pytest.approx(PROXY_LR[group] / 8, rel=1e-12)
    assert lr["no_decay"] == PROXY_LR["no_decay"]  # vectors keep the proxy's LR


def test_non_integer_ratio() -> None:
    overrides, s = widen({"hidden_size": 96, "ffn_hidden_size": 256, "expert_ffn_hidden_size": 64,
                          "q_lora_rank": 48, "kv_lora_rank": 32, "num_attention_heads": 4}, 240)  # fmt: skip
    assert s == 2.5
    assert overrides == {"hidden_size": 240, "ffn_hidden_size": 640, "expert_ffn_hidden_size": 160,
                         "q_lora_rank": 120, "kv_lora_rank": 80, "num_attention_heads": 10}  # fmt: skip
    std, lr = transfer(PROXY_STD, PROXY_LR, s)
    assert std["hidden"] == pytest.approx(0.02 / math.sqrt(2.5)) and lr["unembedding"] == pytest.approx(1e-3 / 2.5)
    factors = transfer_factors(1 / 3)  # narrowing is the same rule the other way
    assert factors["hidden"] == (pytest.approx(3.0), pytest.approx(3.0)) and factors["embedding"] == (1.0, 1.0)
    with pytest.raises(ConfigError, match="positive"):
        transfer_factors(0.0)


def test_depth_sparsity_and_batch_must_match() -> None:
    proxy = {"num_layers": 2, "n_routed_experts": 8, "zero_expert_num": 2, "moe_topk": 2}
    check_same_shape(proxy, dict(proxy), 16, 16)
    with pytest.raises(ConfigError, match="num_layers as the proxy's"):
        check_same_shape(proxy, {**proxy, "num_layers": 4}, 16, 16)
    with pytest.raises(ConfigError, match="zero_expert_num"):
        check_same_shape(proxy, {**proxy, "zero_expert_num": 4}, 16, 16)
    with pytest.raises(ConfigError, match="batch_size"):
        check_same_shape(proxy, proxy, 16, 32)
