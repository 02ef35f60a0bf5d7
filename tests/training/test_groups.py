"""Per-group initialisation and learning rates (the groups width transfer scales)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat import LongcatForCausalLM
from longcat.config import ConfigError
from longcat.training.config import TrainConfig
from longcat.training.optim import build_optimizer, lr_at, parameter_role, set_lr


def test_default_groups_draw_exactly_the_old_init() -> None:
    config = random_tiny_config(2, initializer_range=0.05)
    a, b = LongcatForCausalLM(config), LongcatForCausalLM(config)
    a.init_weights(torch.Generator().manual_seed(0))
    b.init_weights(
        torch.Generator().manual_seed(0), init_std=dict.fromkeys(("embedding", "hidden", "unembedding", "router"), 0.05)
    )
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_each_group_gets_its_std() -> None:
    config = random_tiny_config(2, vocab_size=4000, hidden_size=64, initializer_range=0.05)
    model = LongcatForCausalLM(config)
    stds = {"embedding": 0.5, "hidden": 0.02, "unembedding": 0.1, "router": 0.3}
    model.init_weights(torch.Generator().manual_seed(0), init_std=stds)
    seen = {}
    for name, param in model.named_parameters():
        role = parameter_role(name, param)
        if role != "no_decay":
            seen.setdefault(role, []).append(param.detach().flatten())
    for role, values in seen.items():
        assert float(torch.cat(values).std()) == pytest.approx(stds[role], rel=0.1), role
    assert float(model.model.mtp.embed_tokens.weight.std()) == pytest.approx(0.5, rel=0.1)  # both embeddings


def test_group_learning_rates_follow_the_schedule() -> None:
    model = LongcatForCausalLM(random_tiny_config(2))
    cfg = TrainConfig(lr=1e-3, lr_groups={"hidden": 2.5e-4, "embedding": 4e-3}, warmup_steps=2, max_steps=10).validate()
    optimizer = build_optimizer(model, cfg)
    for step in (0, 5, 9):
        set_lr(optimizer, lr_at(step, cfg))
        by_role = {g["role"]: g["lr"] for g in optimizer.param_groups}
        assert by_role["hidden"] == pytest.approx(lr_at(step, cfg) / 4)
        assert by_role["embedding"] == pytest.approx(lr_at(step, cfg) * 4)
        assert by_role["unembedding"] == pytest.approx(lr_at(step, cfg))


def test_overrides_and_validation() -> None:
    cfg = TrainConfig().with_overrides(["init_std.hidden=0.01", "lr_groups.router=1e-4"])
    assert cfg.init_std == {"hidden": 0.01} and cfg.lr_groups == {"router": 1e-4}
    assert TrainConfig().with_overrides(["init_std=0.03"]).init_std == dict.fromkeys(
        ("embedding", "hidden", "unembedding", "router"), 0.03
    )
    with pytest.raises(ConfigError, match="init_std.attention: unknown parameter group"):
        TrainConfig().with_overrides(["init_std.attention=0.01"])
    with pytest.raises(ConfigError, match="lr_groups.hidden must be a positive number"):
        TrainConfig().with_overrides(["lr_groups.hidden=-1"])
    resolved = TrainConfig(lr=2e-3, init_std={"router": 0.1}).resolved_groups(0.02)
    assert resolved.init_std == {"embedding": 0.02, "hidden": 0.02, "unembedding": 0.02, "router": 0.1}
    assert set(resolved.lr_groups.values()) == {2e-3}


def test_pinned_schedule_lengthens_only_the_stable_phase() -> None:
    short = TrainConfig(max_steps=100, warmup_steps=10, decay_fraction=0.2)
    pinned = TrainConfig(max_steps=150, warmup_steps=10, decay_fraction=0.2, decay_steps=20)
    assert [lr_at(s, short) for s in range(80, 100)] == [lr_at(s, pinned) for s in range(130, 150)]
    assert all(lr_at(s, pinned) == pinned.lr for s in range(10, 130))
