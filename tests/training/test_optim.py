from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat import ConfigError, LongcatForCausalLM
from longcat.training.config import TrainConfig
from longcat.training.optim import build_optimizer, lr_at, parameter_role
from longcat.training.stability import hidden_z_loss, router_cosine


def test_wsd_and_cosine_schedules() -> None:
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert lr_at(0, wsd) == pytest.approx(0.1) and lr_at(9, wsd) == pytest.approx(1.0)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(89, wsd) == pytest.approx(0.55) and lr_at(99, wsd) == pytest.approx(0.1)
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_steps=100, schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(1.0, rel=1e-3) and lr_at(49, cosine) == pytest.approx(0.5)
    assert lr_at(99, cosine) == pytest.approx(0.0, abs=1e-12)  # the last step lands on the floor, as WSD's


def test_parameter_groups_by_role() -> None:
    model = LongcatForCausalLM(random_tiny_config(0), seed=0)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, adam_eps=1e-16))
    groups = {g["role"]: g for g in optimizer.param_groups}
    assert set(groups) == {"embedding", "hidden", "unembedding", "router", "no_decay"}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["hidden"]["weight_decay"] == 0.1
    assert optimizer.defaults["eps"] == 1e-16
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    assert parameter_role("model.mtp.embed_tokens.weight", named["model.mtp.embed_tokens.weight"]) == "embedding"
    assert (
        parameter_role("model.layers.0.mlp.experts.down_proj", named["model.layers.0.mlp.experts.down_proj"])
        == "hidden"
    )


def test_hidden_z_loss_matches_eq_10() -> None:
    z = torch.randn(3, 5, 7)
    expected = (
        1e-3 * torch.stack([torch.log(torch.exp(z[b, t].abs()).sum()) ** 2 for b in range(3) for t in range(5)]).mean()
    )
    torch.testing.assert_close(hidden_z_loss(z, 1e-3), expected)


def test_router_cosine_of_identical_rows_is_one() -> None:
    model = LongcatForCausalLM(random_tiny_config(0), seed=0)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.classifier.weight.copy_(torch.ones_like(moe.router.classifier.weight))
    assert router_cosine(model) == pytest.approx(1.0)
    # random rows against the obvious loop over distinct pairs (each row with itself left out)
    with torch.no_grad():
        for moe in model.moe_layers():
            torch.nn.init.normal_(moe.router.classifier.weight)
    per_layer = []
    for moe in model.moe_layers():
        rows = moe.router.classifier.weight.detach()
        pairs = [
            float(torch.nn.functional.cosine_similarity(rows[i], rows[j], dim=0))
            for i in range(len(rows))
            for j in range(len(rows))
            if i != j
        ]
        per_layer.append(sum(pairs) / len(pairs))
    assert router_cosine(model) == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-6)


def test_overrides_and_bad_fields(tmp_path) -> None:
    cfg = TrainConfig().with_overrides(["max_steps=5", "model.num_layers=3", "schedule=cosine"])
    assert cfg.max_steps == 5 and cfg.model == {"num_layers": 3} and cfg.schedule == "cosine"
    with pytest.raises(ConfigError, match="max_stepz"):
        TrainConfig().with_overrides(["max_stepz=5"])
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig().with_overrides(["schedule=linear"])
    (tmp_path / "bad.json").write_text('{"lr": 1, "unknown": 2}')
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_file(tmp_path / "bad.json")
