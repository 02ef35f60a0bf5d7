"""The fused CPU MoE kernel (model/csrc/moe_experts.cpp) against the loop-over-experts reference."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat.model import cpu_kernels, tuning
from longcat.model.cpu_kernels import fused_experts_apply, fused_experts_available, fused_kernels_enabled
from longcat.model.moe import MoE, experts_reference

needs_kernel = pytest.mark.skipif(
    not fused_experts_available(), reason=f"fused CPU kernel unavailable: {cpu_kernels.unavailable_reason()}"
)


def _assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, tol: float = 2e-6) -> None:
    """max |actual - expected| within tol of max |expected|: two fp32 computations that add the same
    terms in another order differ by a few ulps of the largest terms, not of each small element."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} is {error / scale:.3g} of max |value| {scale:.3g}"


def _moe(seed: int, **overrides) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(random_tiny_config(seed, **overrides))
    moe.router.reset_parameters(std=0.5)
    with torch.no_grad():
        torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.3)
        torch.nn.init.normal_(moe.experts.down_proj, std=0.3)
    return moe


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_matches_loop_values_and_grads(seed: int, threads: int) -> None:
    moe = _moe(seed, n_routed_experts=9, zero_expert_num=3, moe_topk=4, hidden_size=46, expert_ffn_hidden_size=13)
    with torch.no_grad():  # a large bias keeps expert 0 out of every top-k: one expert gets no rows
        moe.router.e_score_correction_bias[0] = -10.0
    x = torch.randn(53, moe.router.classifier.in_features)
    routing = moe.router(x)
    assert not (routing.indices == 0).any()
    assert fused_experts_apply(x, moe.experts.gate_up_proj, moe.experts.down_proj)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = moe.experts(xs[0], routing.indices, routing.weights, static_shapes=False)
        grad_out = torch.randn_like(fast)
        params = [moe.experts.gate_up_proj, moe.experts.down_proj, moe.router.classifier.weight]
        g_fast = torch.autograd.grad(fast, [xs[0], *params], grad_out, retain_graph=True)
    finally:
        torch.set_num_threads(previous)
    ref = experts_reference(moe.experts, xs[1], routing.indices, routing.weights)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5)
    g_ref = torch.autograd.grad(ref, [xs[1], *params], grad_out)
    # gradients reach |g| ~ 80 here; the grouped path and this kernel both lie within 1.2e-4 of a
    # float64 reference, so the two fp32 computations can differ by that much
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for grad in g_fast[1:3]:  # the expert with no rows
        assert torch.equal(grad[0], torch.zeros_like(grad[0]))


@needs_kernel
def test_fused_repeats_bit_for_bit_and_matches_the_grouped_path() -> None:
    moe = _moe(4, n_routed_experts=16, zero_expert_num=4, moe_topk=5, hidden_size=64, expert_ffn_hidden_size=32)
    x = torch.randn(300, 64, requires_grad=True)

    def step() -> list[torch.Tensor]:
        x.grad = None
        moe.zero_grad(set_to_none=True)
        out = moe(x)
        out.square().sum().backward()
        return [out.detach(), x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad]

    first = step()
    # experts are assigned to threads once, so every sum runs in the same order (other thread counts
    # change the assignment, and the router's own BLAS calls, in the last bits)
    assert all(torch.equal(a, b) for a, b in zip(first, step()))
    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            for a, b in zip(first, step()):
                _assert_close_normwise(a, b)
    finally:
        torch.set_num_threads(previous)
    with fused_kernels_enabled(False):
        grouped = step()
    for a, b in zip(first, grouped):
        _assert_close_normwise(a, b)


@needs_kernel
def test_large_values_stay_finite() -> None:
    """The kernel is built with -ffast-math; saturated sigmoids must not turn into inf or NaN."""
    moe = _moe(5, n_routed_experts=4, zero_expert_num=1, moe_topk=2)
    with torch.no_grad():
        moe.experts.gate_up_proj.mul_(200.0)
    x = torch.randn(40, moe.router.classifier.in_features, requires_grad=True)
    routing = moe.router(x)
    weights = routing.weights.detach()  # the gradient through the experts only, on both sides
    out = moe.experts(x, routing.indices, weights, static_shapes=False)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().requires_grad_()
    ref = experts_reference(moe.experts, x_ref, routing.indices, weights)
    (grad_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    _assert_close_normwise(out, ref)
    _assert_close_normwise(grad, grad_ref)


def test_not_taken_off_cpu_fp32_past_the_buffer_limit_or_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    moe = _moe(6)
    w_gu, w_d = moe.experts.gate_up_proj, moe.experts.down_proj
    x = torch.randn(30, moe.router.classifier.in_features)
    assert not fused_experts_apply(x.double(), w_gu.double(), w_d.double())
    assert not fused_experts_apply(x, w_gu.transpose(1, 2).contiguous().transpose(1, 2), w_d)
    with fused_kernels_enabled(False):
        assert not fused_experts_apply(x, w_gu, w_d)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # per-thread output buffers past the limit: the grouped path, which needs none
        assert fused_experts_apply(x, w_gu, w_d) == fused_experts_available()
        monkeypatch.setattr(tuning, "FUSED_BUFFER_LIMIT", cpu_kernels._buffer_bytes(30, x.shape[1], 1, 2) - 1)
        assert not fused_experts_apply(x, w_gu, w_d)
    finally:
        torch.set_num_threads(previous)


def test_a_failed_build_warns_once_and_the_grouped_path_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu_kernels, "_build", no_compiler)
    monkeypatch.setitem(cpu_kernels._state, "loaded", None)  # restored, with the reason, after the test
    monkeypatch.setitem(cpu_kernels._state, "reason", None)
    moe = _moe(7, n_routed_experts=5, zero_expert_num=2, moe_topk=3)
    x = torch.randn(40, moe.router.classifier.in_features)
    routing = moe.router(x)
    with pytest.warns(RuntimeWarning, match="no C.. compiler here"):
        out = moe.experts(x, routing.indices, routing.weights, static_shapes=False)
    assert cpu_kernels.unavailable_reason().startswith("it could not be built")
    torch.testing.assert_close(out, experts_reference(moe.experts, x, routing.indices, routing.weights))


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGCAT_CPU_KERNELS", "0")
    monkeypatch.setitem(cpu_kernels._state, "loaded", None)  # restored, with the reason, after the test
    monkeypatch.setitem(cpu_kernels._state, "reason", None)
    assert not fused_experts_available()
    assert cpu_kernels.unavailable_reason() == "LONGCAT_CPU_KERNELS=0"


@needs_kernel
def test_self_check_ignores_the_callers_autocast_and_default_dtype() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_kernels._self_check() is None
            assert not fused_experts_apply(torch.randn(4, 8, dtype=torch.float32), *_moe(8).experts.parameters())
    finally:
        torch.set_default_dtype(previous)
