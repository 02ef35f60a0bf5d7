"""CUDA checks: the accelerator defaults (static-shape MoE dispatch, bf16 grouped GEMM, compiled
decoding) against the same slow references the CPU tests use. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import perturb, random_tiny_config

from longcat import LongcatForCausalLM
from longcat.model.moe import MoE, experts_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_moe_static_dispatch_matches_the_loop(dtype: torch.dtype) -> None:
    config = random_tiny_config(0, n_routed_experts=8, zero_expert_num=4, moe_topk=3, hidden_size=48,
                                expert_ffn_hidden_size=16)  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(config).cuda()
    moe.router.reset_parameters(std=0.5)
    with torch.no_grad():
        torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.3)
        torch.nn.init.normal_(moe.experts.down_proj, std=0.3)
    moe.to(dtype)
    x = torch.randn(200, config.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    routing = moe.router(x)
    fast = moe.experts(x, routing.indices, routing.weights)  # static shapes: the accelerator default
    ref = experts_reference(moe.experts, x, routing.indices, routing.weights)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, ref, **tol)
    params = [x, moe.experts.gate_up_proj, moe.experts.down_proj]
    for a, b in zip(torch.autograd.grad(fast.float().sum(), params), torch.autograd.grad(ref.float().sum(), params)):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_cuda_compiled_and_speculative_decoding_match_eager() -> None:
    model = LongcatForCausalLM(random_tiny_config(5, max_position_embeddings=64), seed=5, device="cuda").eval()
    perturb(model, 5)
    prompt = [7, 1, 8, 2, 8, 1, 8]
    eager = model.generate([prompt], max_new_tokens=12, eos_token_id=[])
    assert torch.equal(model.generate([prompt], max_new_tokens=12, eos_token_id=[], compile=True), eager)
    spec = model.generate([prompt], max_new_tokens=12, eos_token_id=[], speculative="mtp", num_draft_tokens=2)
    assert torch.equal(spec, eager)
