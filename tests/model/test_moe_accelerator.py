"""The MoE's accelerator path (static shapes, grouped GEMM, no host read) forced on the CPU, in the bf16
autocast recipe a GPU trains with: what reaches the grouped GEMM, how often the stacked weights are cast,
and that the work does not grow with the number of experts."""

from __future__ import annotations

import pytest
import torch
from tests.model.test_moe import _moe as seeded_moe
from tests.op_counts import OpCounter, host_reads

from longcat.model import tuning
from longcat.model.moe import MoE, experts_reference, grouped_mm_available

pytestmark = pytest.mark.skipif(not grouped_mm_available(), reason="this torch has no grouped GEMM kernel")


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(tuning, "ACCELERATOR_PATH", True)


def _moe(experts: int) -> MoE:
    return seeded_moe(0, n_routed_experts=experts, zero_expert_num=4, moe_topk=4, hidden_size=64,
                      expert_ffn_hidden_size=32)  # fmt: skip


def _profile(moe: MoE, tokens: int = 96) -> tuple[OpCounter, torch.Tensor, list[str]]:
    """One forward and backward of the experts under CPU bf16 autocast, fp32 input and master weights."""
    x = torch.randn(tokens, 64, requires_grad=True)
    routing = moe.router(x)
    counter = OpCounter()
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe.experts(x, routing.indices, routing.weights)
        names = _graph_names(out)
        out.float().sum().backward()
    return counter, out, names


def _graph_names(out: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("experts", [16, 64])
def test_grouped_gemm_gets_bf16_and_each_stacked_weight_is_cast_once(accelerator_path, experts: int) -> None:
    moe = _moe(experts)
    counter, out, names = _profile(moe)
    assert out.dtype == torch.float32  # the residual stream's dtype comes back
    grouped = [args for name, args in counter.calls if name == "_grouped_mm"]
    assert len(grouped) == 6  # forward 2, backward 2 x (input, weight) gradients
    assert all(t.dtype == torch.bfloat16 for args in grouped for t in args if t.is_floating_point()), [
        [t.dtype for t in args] for args in grouped
    ]
    for weight in (moe.experts.gate_up_proj, moe.experts.down_proj):
        casts = [args[0].dtype for name, args in counter.calls if name == "_to_copy" and args[0].shape == weight.shape]
        # the weight to bf16 once, and its gradient back to fp32 once (the cast's backward)
        assert sorted(casts, key=str) == [torch.bfloat16, torch.float32], f"casts of {tuple(weight.shape)}: {casts}"
    assert "SelectBackward0" not in names and "UnbindBackward0" not in names
    assert moe.experts.last_path == "grouped GEMM (bfloat16)"


def test_the_work_does_not_grow_with_the_number_of_experts(accelerator_path) -> None:
    small, large = _profile(_moe(16))[0], _profile(_moe(64))[0]
    assert small.matmuls() == large.matmuls()
    assert sum(small.ops.values()) == sum(large.ops.values())


def test_no_host_read_in_the_forward_and_backward(accelerator_path) -> None:
    moe = _moe(16)
    x = torch.randn(96, 64, requires_grad=True)
    with host_reads() as reads, torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.router(x)
        out = moe.experts(x, routing.indices, routing.weights)
        out.float().sum().backward()
    assert not reads, reads


def test_the_autocast_path_matches_the_loop_in_bf16(accelerator_path) -> None:
    """Values against the per-expert loop run on bf16 copies of the same operands, within bf16 rounding."""
    moe = _moe(16)
    x = torch.randn(96, 64)
    routing = moe.router(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = moe.experts(x, routing.indices, routing.weights)
    bf16 = _moe(16).to(torch.bfloat16).experts
    with torch.no_grad():
        ref = experts_reference(bf16, x.bfloat16(), routing.indices, routing.weights).float()
    scale = ref.abs().max()
    assert (fast - ref).abs().max() <= 2e-2 * scale
