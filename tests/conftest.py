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


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A prepared data directory from a slice of the embedded corpus (two domains, vocabulary 384)."""
    import json
    import lzma

    from longcat.data.corpus import CORPUS_DIR
    from longcat.data.prepare import prepare

    src = tmp_path_factory.mktemp("corpus")
    for name, count in (("scripture", 60), ("python_docs", 12)):
        with lzma.open(CORPUS_DIR / f"{name}.jsonl.xz", "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for _, line in zip(range(count), handle)]
        (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(out, inputs=[str(src)], vocab_size=384, val_fraction=0.1)
    return out


TINY_TRAIN_MODEL = dict(
    hidden_size=32, num_layers=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, ffn_hidden_size=48, expert_ffn_hidden_size=16, n_routed_experts=4,
    zero_expert_num=2, moe_topk=2,
)  # fmt: skip


def tiny_train_config(data_dir, **changes):
    from longcat.training.config import TrainConfig

    values = dict(
        model=dict(TINY_TRAIN_MODEL), data_dir=str(data_dir), seq_len=32, batch_size=4, max_steps=8,
        warmup_steps=2, log_every=2, eval_every=4, eval_batches=2, mtp_start_step=2, lr=1e-2,
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values).validate()


@pytest.fixture
def tiny_model() -> LongcatForCausalLM:
    return LongcatForCausalLM(random_tiny_config(0), seed=0)
