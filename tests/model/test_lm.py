from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tests.conftest import random_tiny_config

from longcat import LongcatConfig, LongcatForCausalLM


def test_meta_build_holds_no_memory_and_is_fast() -> None:
    start = time.perf_counter()
    model = LongcatForCausalLM(LongcatConfig.from_preset("longcat-flash"), device="meta")
    assert time.perf_counter() - start < 30
    assert all(p.is_meta for p in model.parameters())
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (512, 4096, 6144)


def test_seeded_init_is_reproducible() -> None:
    config = random_tiny_config(0)
    a, b = LongcatForCausalLM(config, seed=1), LongcatForCausalLM(config, seed=1)
    c = LongcatForCausalLM(config, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert torch.equal(sa["model.norm.weight"], torch.ones_like(sa["model.norm.weight"]))
    assert torch.equal(sa["model.layers.0.mlp.router.e_score_correction_bias"], torch.zeros(config.num_experts_total))


def test_expert_gamma_scales_down_projection() -> None:
    config = random_tiny_config(0, n_routed_experts=64, expert_ffn_hidden_size=64, hidden_size=64)
    model = LongcatForCausalLM(config, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(generator=torch.Generator().manual_seed(0), expert_gamma=4.0)
    std = model.model.layers[0].mlp.experts.down_proj.std().item()
    assert abs(std / (4.0 * config.initializer_range) - 1) < 0.05


def test_loss_and_mtp_loss_match_manual_cross_entropy() -> None:
    model = LongcatForCausalLM(random_tiny_config(1), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    labels = ids.clone()
    labels[1, 4] = -100
    out = model(ids, labels=labels, return_mtp=True)
    V = model.config.vocab_size
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # MTP position i predicts token i + 2
    mtp_expected = F.cross_entropy(out.mtp_logits[:, :-1].reshape(-1, V), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.mtp_loss, mtp_expected)
    (out.loss + out.mtp_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == [], no_grad


def test_left_padding_matches_unpadded_sequence() -> None:
    model = LongcatForCausalLM(random_tiny_config(2), seed=0).eval()
    seq = torch.randint(3, model.config.vocab_size, (1, 6))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), seq), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(seq).logits
        batched = model(padded, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[:, 3:], alone, rtol=1e-4, atol=1e-5)


def test_packed_documents_do_not_attend_across() -> None:
    model = LongcatForCausalLM(random_tiny_config(3), seed=0).eval()
    a = torch.randint(0, model.config.vocab_size, (1, 5))
    b = torch.randint(0, model.config.vocab_size, (1, 4))
    packed = torch.cat((a, b), dim=1)
    docs = torch.tensor([[0] * 5 + [1] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        out = model(packed, document_ids=docs, position_ids=positions, return_mtp=True)
        torch.testing.assert_close(out.logits[:, :5], model(a).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.logits[:, 5:], model(b).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.mtp_logits[:, 5:], model(b, return_mtp=True).mtp_logits, rtol=1e-4, atol=1e-5)


def test_rope_frequencies_stay_float32_in_a_bfloat16_model() -> None:
    """In bf16 the frequencies would be off by ~4e-3 relative: radians of angle at long positions."""
    config = random_tiny_config(0)
    fp32 = LongcatForCausalLM(config, seed=0)
    bf16 = LongcatForCausalLM(config, seed=0, dtype=torch.bfloat16)
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(bf16.model.rotary_emb.inv_freq, fp32.model.rotary_emb.inv_freq)
    fp32.to(torch.bfloat16)
    assert torch.equal(fp32.model.rotary_emb.inv_freq, bf16.model.rotary_emb.inv_freq)
    positions = torch.tensor([[0, 1000, 8191]])
    cos32, _ = LongcatForCausalLM(config, seed=0).model.rotary_emb(positions, torch.float32)
    cos16, _ = bf16.model.rotary_emb(positions, torch.float32)
    torch.testing.assert_close(cos16, cos32)
