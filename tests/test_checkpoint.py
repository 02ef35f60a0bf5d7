from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import perturb, random_tiny_config

from longcat import CheckpointError, ConfigError, LongcatForCausalLM
from longcat.checkpoint import transformers_needs_zero_expert_stubs


def _saved(tmp_path, seed: int = 0, **kw):
    model = LongcatForCausalLM(random_tiny_config(seed), seed=seed).eval()
    perturb(model, seed)
    model.save_pretrained(tmp_path, **kw)
    return model


def _same_weights(a: LongcatForCausalLM, b: LongcatForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_with_mtp_and_exact_keys(tmp_path) -> None:
    model = _saved(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in keys
    assert "model.layers.0.mlp.router.e_score_correction_bias" in keys
    assert "model.mtp.layers.0.enorm.m.weight" in keys
    assert "model.mtp.layers.0.transformer_layer.mlp.down_proj.weight" in keys
    assert not any("gate_up_proj" in k or "rotary" in k or "expert_counts" in k for k in keys)
    loaded = LongcatForCausalLM.from_pretrained(tmp_path)
    _same_weights(model, loaded)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, return_mtp=True).mtp_logits, loaded(ids, return_mtp=True).mtp_logits)


def test_saved_files_get_the_usual_permissions(tmp_path) -> None:
    """Written through temporary files and renamed, yet readable as any new file (umask), with no
    temporary file left behind."""
    mask = os.umask(0o022)
    try:
        _saved(tmp_path)
    finally:
        os.umask(mask)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    for name in names:
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_sharded_with_index(tmp_path) -> None:
    model = _saved(tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "model.safetensors").exists()
    _same_weights(model, LongcatForCausalLM.from_pretrained(tmp_path))
    # saving again unsharded removes the stale shards and index, keeps other files
    (tmp_path / "tokenizer.json").write_text("{}")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_bf16_save_and_auto_dtype(tmp_path) -> None:
    model = LongcatForCausalLM(random_tiny_config(1), seed=1, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = LongcatForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.router.classifier.weight.dtype == torch.float32
    assert LongcatForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def _rewrite(tmp_path, change) -> None:
    tensors = load_file(tmp_path / "model.safetensors")
    change(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path) -> None:
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.self_attn.1.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.0\.self_attn\.1\.kv_b_proj\.weight"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_missing_expert_is_named(tmp_path) -> None:
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.mlp.experts.2.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path) -> None:
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"does not expect: model\.layers\.0\.extra\.weight"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path) -> None:
    _saved(tmp_path)
    key = "model.layers.0.mlps.1.up_proj.weight"
    _rewrite(tmp_path, lambda t: t.update({key: t[key][:-1].clone()}))
    with pytest.raises(CheckpointError, match=rf"{key.replace('.', r'.')} .* has shape"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_truncated_file(tmp_path) -> None:
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    with open(path, "r+b") as handle:
        handle.truncate(50)  # inside the header
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_config_mismatch_and_bad_config(tmp_path) -> None:
    _saved(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "moe_topk": 99}))
    with pytest.raises(ConfigError, match="moe_topk"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "expert_ffn_hidden_size": 13}))
    with pytest.raises(CheckpointError, match="experts.0.gate_proj.weight .* has shape"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        LongcatForCausalLM.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    _saved(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_partial_mtp_is_an_error_and_absent_mtp_a_notice(tmp_path) -> None:
    _saved(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.mtp.norm.weight"))
    with pytest.raises(CheckpointError, match=r"model\.mtp\.norm\.weight"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.mtp.")])
    with pytest.warns(UserWarning, match="no MTP weights"):
        model = LongcatForCausalLM.from_pretrained(tmp_path)
    assert model.model.mtp is None and model.config.num_nextn_predict_layers == 0


def test_zero_expert_stubs_are_written_and_ignored(tmp_path) -> None:
    model = _saved(tmp_path, zero_expert_stubs=True)
    n = model.config.n_routed_experts
    tensors = load_file(tmp_path / "model.safetensors")
    assert torch.equal(
        tensors[f"model.layers.0.mlp.experts.{n}.up_proj.weight"],
        torch.zeros(model.config.expert_ffn_hidden_size, model.config.hidden_size),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same_weights(model, LongcatForCausalLM.from_pretrained(tmp_path))
    assert any("zero-expert weight" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("version", "stubs"),
    [("4.57.1", False), ("4.57.6", False), ("5.0.0", True), ("5.0.0rc1", True), ("5.24.0", True),
     ("5.24.9.dev0", True), ("5.25.0", False), ("5.25.0.dev0", False), ("5.26.1", False), ("6.0.0", False)],
)  # fmt: skip
def test_which_transformers_reads_which_layout(version: str, stubs: bool) -> None:
    assert transformers_needs_zero_expert_stubs(version) is stubs


def test_an_unreadable_transformers_version_is_refused() -> None:
    with pytest.raises(ValueError, match="'main'"):
        transformers_needs_zero_expert_stubs("main")


def _zero_expert_keys(path) -> set[str]:
    config = LongcatForCausalLM.from_pretrained(path).config
    return {k for k in load_file(path / "model.safetensors") if f".experts.{config.n_routed_experts}." in k}


def test_export_converts_a_final_directory_between_layouts(tmp_path) -> None:
    """`longcat export` of a Hugging Face directory (a run's final/): --zero-expert-stubs adds the rows,
    without it they go again; the weights and the tokenizer files travel unchanged."""
    from longcat.cli import main

    model = _saved(tmp_path / "final")
    (tmp_path / "final" / "tokenizer.json").write_text("{}")
    assert not _zero_expert_keys(tmp_path / "final")  # the released layout is the default
    assert main(["export", str(tmp_path / "final"), "--out", str(tmp_path / "stubs"), "--zero-expert-stubs"]) == 0
    assert _zero_expert_keys(tmp_path / "stubs")
    assert main(["export", str(tmp_path / "stubs"), "--out", str(tmp_path / "released")]) == 0
    assert not _zero_expert_keys(tmp_path / "released")
    assert (tmp_path / "released" / "tokenizer.json").read_text() == "{}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("stubs", "released"):
            _same_weights(model, LongcatForCausalLM.from_pretrained(tmp_path / name))
    assert main(["export", str(tmp_path / "final"), "--out", str(tmp_path / "final")]) == 2
    assert _same_weights(model, LongcatForCausalLM.from_pretrained(tmp_path / "final")) is None


def test_tied_embeddings_round_trip(tmp_path) -> None:
    model = LongcatForCausalLM(random_tiny_config(2, tie_word_embeddings=True), seed=2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = LongcatForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    _same_weights(model, loaded)


def test_quantised_and_unsupported_weights_are_refused_by_name(tmp_path) -> None:
    _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(CheckpointError, match="fp8 checkpoint"):
        LongcatForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="F8_E4M3"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_auto_dtype_falls_back_to_the_stored_dtype(tmp_path) -> None:
    model = _saved(tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LongcatForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_mtp_weights_without_an_mtp_layer_in_the_config_are_skipped(tmp_path) -> None:
    _saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.warns(UserWarning, match="model.mtp"):
        model = LongcatForCausalLM.from_pretrained(tmp_path)
    assert model.model.mtp is None


def test_saving_settings_transformers_does_not_model_warns(tmp_path) -> None:
    model = LongcatForCausalLM(random_tiny_config(0, norm_topk_prob=True), seed=0)
    with pytest.warns(UserWarning, match="norm_topk_prob=True"):
        model.save_pretrained(tmp_path)


def test_float64_checkpoints_load(tmp_path) -> None:
    model = LongcatForCausalLM(random_tiny_config(2), seed=2).double()
    model.save_pretrained(tmp_path)
    assert LongcatForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).dtype == torch.float64
