from __future__ import annotations

import json

import pytest

from longcat import ConfigError, LongcatConfig
from longcat.config import PRESETS


def test_presets_validate_and_keep_their_shape() -> None:
    for name in PRESETS:
        LongcatConfig.from_preset(name)
    flash = LongcatConfig.from_preset("longcat-flash")
    assert (flash.num_layers, flash.hidden_size, flash.n_routed_experts, flash.zero_expert_num) == (28, 6144, 512, 256)
    assert flash.target_ffn_experts == 8.0 and flash.num_hidden_layers == 56
    small = LongcatConfig.from_preset("small")
    assert (small.hidden_size, small.num_layers, small.n_routed_experts, small.zero_expert_num) == (256, 4, 64, 32)
    assert (small.moe_topk, small.expert_ffn_hidden_size) == (12, 64)
    assert LongcatConfig.from_preset("tiny").num_nextn_predict_layers == 1
    assert LongcatConfig.from_preset("tiny", num_layers=3).num_layers == 3


def test_unknown_preset_and_override() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        LongcatConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="hiden_size"):
        LongcatConfig.from_preset("tiny", hiden_size=3)


def test_json_round_trip_keeps_unknown_fields(tmp_path) -> None:
    config = LongcatConfig.from_preset("tiny")
    data = config.to_dict()
    data["attention_method"] = "MLA"
    data["some_future_field"] = {"nested": [1, 2]}
    # keys describing the files, not the model, are not carried to what we write: auto_map would point
    # at remote-code files we do not copy, quantization_config at FP8 weights we do not write
    data["auto_map"] = {"AutoModel": "modeling_longcat_flash.Model"}
    data["quantization_config"] = {"weight_block_size": [128, 128]}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    loaded = LongcatConfig.from_json_file(path)
    assert loaded.extra["some_future_field"] == data["some_future_field"]
    loaded.to_json_file(tmp_path / "again.json")
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["attention_method"] == "MLA" and again["some_future_field"] == {"nested": [1, 2]}
    assert "auto_map" not in again and "quantization_config" not in again
    assert again["rope_parameters"] == {"rope_type": "default", "rope_theta": config.rope_theta}
    assert again["rope_theta"] == config.rope_theta and again["qk_head_dim"] == config.qk_head_dim
    assert LongcatConfig.from_dict(again) == loaded


def test_rope_forms_and_num_layers_authority() -> None:
    base = LongcatConfig.from_preset("tiny").to_dict()
    v5 = {k: v for k, v in base.items() if k != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert LongcatConfig.from_dict(v5).rope_theta == 123.0
    v457 = {k: v for k, v in base.items() if k != "rope_parameters"}
    v457.update(rope_theta=77.0, rope_scaling=None, num_hidden_layers=999)
    parsed = LongcatConfig.from_dict(v457)
    assert parsed.rope_theta == 77.0 and parsed.num_layers == base["num_layers"]
    no_layers = {k: v for k, v in base.items() if k != "num_layers"}
    no_layers["num_hidden_layers"] = 4
    with pytest.raises(ConfigError, match="add num_layers"):
        LongcatConfig.from_dict(no_layers)


def test_remote_code_fields_are_honoured() -> None:
    data = LongcatConfig.from_preset("tiny").to_dict()
    data.update(mla_scale_q_lora=False, zero_expert_type="drop", norm_topk_prob=True, router_bias=True,
                zero_expert_num=None, attention_method="MLA")  # fmt: skip
    config = LongcatConfig.from_dict(data)
    assert config.q_lora_scale == 1.0 and config.kv_lora_scale > 1.0
    assert config.zero_expert_num == 0 and config.extra["attention_method"] == "MLA"
    assert config.router_bias and config.norm_topk_prob
    # the remote code's null zero_expert_type means identity experts, as transformers treats them
    data.update(zero_expert_type=None, zero_expert_num=4)
    assert LongcatConfig.from_dict(data).zero_expert_type == "identity"
    # transformers 5.x's generic names for four fields
    aliased = {**data, "num_experts_per_tok": 3, "num_local_experts": 12, "intermediate_size": 40,
               "moe_intermediate_size": 24}  # fmt: skip
    for name in ("moe_topk", "n_routed_experts", "ffn_hidden_size", "expert_ffn_hidden_size"):
        aliased.pop(name)
    config = LongcatConfig.from_dict(aliased)
    assert (config.moe_topk, config.n_routed_experts, config.ffn_hidden_size, config.expert_ffn_hidden_size) == (
        3, 12, 40, 24)  # fmt: skip
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        LongcatConfig.from_dict({**data, "num_experts_per_tok": data["moe_topk"] + 1})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"moe_topk": 40}, "moe_topk"),
        ({"head_dim": 8}, "head_dim"),
        ({"qk_rope_head_dim": 15, "head_dim": 15}, "qk_rope_head_dim"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"zero_expert_type": "noop"}, "zero_expert_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"n_routed_experts": -1}, "n_routed_experts"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
        ({"eos_token_id": 99999}, "eos_token_id"),
        ({"qk_head_dim": 5}, "qk_head_dim"),
        ({"model_type": "llama"}, "model_type"),
    ],
)
def test_inconsistent_fields_name_the_field(change: dict, field: str) -> None:
    data = {**LongcatConfig.from_preset("tiny").to_dict(), **change}
    with pytest.raises(ConfigError, match=field):
        LongcatConfig.from_dict(data)


def test_wrong_field_type_in_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LongcatConfig.from_preset("tiny").to_dict(), "num_layers": "two"}))
    with pytest.raises(ConfigError, match="num_layers"):
        LongcatConfig.from_json_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        LongcatConfig.from_json_file(path)
