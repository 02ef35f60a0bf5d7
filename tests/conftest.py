from __future__ import annotations

import random

import pytest
import torch

from longcat import LongcatConfig, LongcatForCausalLM


def random_tiny_config(seed: int, **overrides) -> LongcatConfig:
    """A small config with odd sizes, drawn from `seed`: the parity tests run several of them."""
    rng = random.Random(seed)
    heads = rng.choice([2, 3, 4])
    rope = rng.choice([2, 4, 6])
    values = dict(
        vocab_size=rng.choice([67, 101, 131]),
        hidden_size=rng.choice([40, 44, 52]),
        num_layers=rng.choice([1, 2]),
        num_attention_heads=heads,
        q_lora_rank=rng.choice([12, 20]),
        kv_lora_rank=rng.choice([10, 14]),
        qk_nope_head_dim=rng.choice([6, 8]),
        qk_rope_head_dim=rope,
        v_head_dim=rng.choice([5, 8]),
        ffn_hidden_size=rng.choice([36, 50]),
        expert_ffn_hidden_size=rng.choice([12, 18]),
        n_routed_experts=rng.choice([4, 5, 7]),
        zero_expert_num=rng.choice([1, 2, 3]),
        moe_topk=rng.choice([2, 3]),
        routed_scaling_factor=rng.choice([1.5, 2.5, 6.0]),
        rope_theta=rng.choice([10000.0, 500000.0, 1e7]),
        max_position_embeddings=64,
        num_nextn_predict_layers=1,
        initializer_range=0.2,
    )
    values.update(overrides)
    return LongcatConfig(**values).validate()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Make norms, selection biases and the router non-trivial so parity means something."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.endswith("layernorm.weight") or "norm" in name.split(".")[-2] or name.endswith("norm.weight"):
            tensor.copy_(1.0 + 0.3 * torch.randn(tensor.shape, generator=g))
        elif name.endswith("e_score_correction_bias"):
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=g))


@pytest.fixture
def tiny_model() -> LongcatForCausalLM:
    return LongcatForCausalLM(random_tiny_config(0), seed=0)
