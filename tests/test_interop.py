"""Checkpoints interchange with Hugging Face transformers, with fp32 logits within 1e-4."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM
from longcat.checkpoint import transformers_needs_zero_expert_stubs

transformers = pytest.importorskip("transformers", minversion="4.57.1")
from transformers import LongcatFlashForCausalLM  # noqa: E402

SEEDS = [0, 1, 2, 3]
# the layout this transformers reads: rows for the zero experts in 5.0-5.24 only (checkpoint.save_pretrained)
STUBS = transformers_needs_zero_expert_stubs(transformers.__version__)
# transformers >= 5.25 runs its experts through torch._grouped_mm by default, whose CPU kernel refuses
# rows not a multiple of 16 bytes (these random widths); its per-expert loop is the reference here
EAGER_EXPERTS = (
    {"experts_implementation": "eager"} if hasattr(transformers.PreTrainedModel, "set_experts_implementation") else {}
)


def _hf_model_from(path) -> LongcatFlashForCausalLM:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LongcatFlashForCausalLM.from_pretrained(path, dtype=torch.float32, **EAGER_EXPERTS)
    return model.eval()


def _hf_new(config) -> LongcatFlashForCausalLM:
    hf_config = transformers.LongcatFlashConfig(
        **{k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}, **EAGER_EXPERTS
    )
    torch.manual_seed(0)
    return LongcatFlashForCausalLM(hf_config).eval()


def _ids(config, seed: int, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_longcat_checkpoint_loads_in_transformers(seed: int, tmp_path) -> None:
    config = random_tiny_config(seed)
    ours = LongcatForCausalLM(config, seed=seed).eval()
    perturb(ours, seed)
    ours.save_pretrained(tmp_path, zero_expert_stubs=STUBS)
    theirs = _hf_model_from(tmp_path)
    ids = _ids(config, seed)
    with torch.no_grad():
        expected = ours(ids).logits
        got = theirs(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_transformers_checkpoint_loads_in_longcat(seed: int, tmp_path) -> None:
    config = random_tiny_config(seed, num_nextn_predict_layers=0)
    theirs = _hf_new(config)
    perturb(theirs, seed + 100)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ours = LongcatForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(config, seed)
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        expected = theirs(ids, labels=labels)
        got = ours(ids, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-5)


def test_transformers_457_config_form_loads(tmp_path) -> None:
    """A config.json in the 4.57 form (rope_theta at top level, num_hidden_layers = 2 x num_layers,
    no rope_parameters) gives the same model as the 5.x form."""
    config = random_tiny_config(5, num_nextn_predict_layers=0)
    theirs = _hf_new(config)
    perturb(theirs, 7)
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    theta = data.pop("rope_parameters")["rope_theta"]
    data.update(
        rope_theta=theta,
        rope_scaling=None,
        num_hidden_layers=2 * data["num_layers"],
        transformers_version="4.57.1",
        torch_dtype=data.pop("dtype", "float32"),
    )
    (tmp_path / "config.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = LongcatForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == theta
    ids = _ids(config, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-4)


def test_phantom_zero_expert_keys_are_reported(tmp_path) -> None:
    config = random_tiny_config(1, num_nextn_predict_layers=0)
    _hf_new(config).save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        phantom = [k for k in f.keys() if f".mlp.experts.{config.n_routed_experts}." in k]
    if not phantom:
        pytest.skip("this transformers version writes no zero-expert weights")
    with pytest.warns(UserWarning, match="zero-expert weight"):
        LongcatForCausalLM.from_pretrained(tmp_path)


def test_the_other_layout_is_refused_here(tmp_path) -> None:
    """transformers_needs_zero_expert_stubs matches the installed transformers: the layout it does not
    pick fails to load, so the choice is not vacuous."""
    config = random_tiny_config(2)
    ours = LongcatForCausalLM(config, seed=2).eval()
    ours.save_pretrained(tmp_path, zero_expert_stubs=not STUBS)
    with pytest.raises(RuntimeError, match="gate_up_proj|size mismatch|mismatch"):
        _hf_model_from(tmp_path)
