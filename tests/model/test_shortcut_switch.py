"""The no-shortcut baseline (moe_shortcut = False): same parameters, another function, and a checkpoint
that no LongCat-Flash loader mistakes for ScMoE."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat import LongcatForCausalLM
from longcat.config import ConfigError, LongcatConfig


def test_no_shortcut_model_round_trips_and_refuses_to_pass_as_scmoe(tmp_path) -> None:
    config = random_tiny_config(5, moe_shortcut=False)
    model = LongcatForCausalLM(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "longcat_no_shortcut" and saved["architectures"] == ["LongcatNoShortcutForCausalLM"]
    loaded = LongcatForCausalLM.from_pretrained(tmp_path)
    assert not loaded.config.moe_shortcut
    x = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits)
        scmoe = LongcatForCausalLM(random_tiny_config(5))
        scmoe.load_state_dict(model.state_dict())  # the same parameters ...
        assert not torch.allclose(scmoe(x).logits, model(x).logits, atol=1e-4)  # ... another function
    # the cached decoder computes what the full forward does
    out = loaded.generate(x[:1], max_new_tokens=5, eos_token_id=[])
    with torch.no_grad():
        ids = x[:1]
        for _ in range(5):
            ids = torch.cat((ids, loaded(ids).logits[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(out, ids)
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="longcat_no_shortcut"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    # a config that says longcat_flash but turns the shortcut off is refused by name
    bad = {**LongcatConfig().to_dict(), "moe_shortcut": False}
    with pytest.raises(ConfigError, match="moe_shortcut is false"):
        LongcatConfig.from_dict(bad)
    assert "moe_shortcut" not in LongcatConfig().to_dict()  # ScMoE checkpoints keep the released layout
