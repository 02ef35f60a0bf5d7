from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat.model.cpu_kernels import fused_kernels_enabled
from longcat.model.moe import MoE, experts_reference


def _moe(seed: int = 0, **overrides) -> MoE:
    config = random_tiny_config(seed, **overrides)
    torch.manual_seed(seed)
    moe = MoE(config)
    moe.router.reset_parameters(std=0.5)
    with torch.no_grad():
        torch.nn.init.normal_(moe.experts.gate_up_proj, std=0.3)
        torch.nn.init.normal_(moe.experts.down_proj, std=0.3)
    return moe


ALIGNED = dict(hidden_size=48, expert_ffn_hidden_size=16)  # 16-byte rows: the grouped GEMM kernel runs
UNALIGNED = dict(hidden_size=46, expert_ffn_hidden_size=13)  # the loop-over-groups fallback runs


@pytest.mark.parametrize("sizes", [UNALIGNED, ALIGNED], ids=["fallback", "grouped-gemm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("static_shapes", [False, True])
def test_grouped_matches_loop_values_and_grads(seed: int, static_shapes: bool, sizes: dict, monkeypatch) -> None:
    """The grouped path (the fused CPU kernel off; test_cpu_kernels.py checks the kernel); the aligned
    case runs the grouped GEMM kernel, the unaligned one the loop or (static shapes) the padded kernel,
    each counted."""
    import longcat.model.moe as moe_module

    if sizes is ALIGNED and not moe_module.grouped_mm_available():
        pytest.skip("this torch has no grouped GEMM kernel: the aligned case would test the fallback again")
    moe_module.grouped_mm_available()  # its one-time probe calls the kernel too: before counting
    kernel_calls = []
    kernel = moe_module._grouped_mm
    monkeypatch.setattr(moe_module, "_grouped_mm", lambda *a: kernel_calls.append(1) or kernel(*a))
    moe = _moe(seed, n_routed_experts=7, zero_expert_num=3, moe_topk=3, **sizes)
    x = torch.randn(37, moe.router.classifier.in_features)
    routing = moe.router(x)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with fused_kernels_enabled(False):
        fast = moe.experts(xs[0], routing.indices, routing.weights, static_shapes=static_shapes)
    ref = experts_reference(moe.experts, xs[1], routing.indices, routing.weights)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5)
    grad_out = torch.randn_like(fast)
    params = [moe.experts.gate_up_proj, moe.experts.down_proj, moe.router.classifier.weight]
    g_fast = torch.autograd.grad(fast, [xs[0], *params], grad_out, retain_graph=True)
    g_ref = torch.autograd.grad(ref, [xs[1], *params], grad_out)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    # the static (accelerator) path never loops: unaligned widths go to the kernel zero-padded
    expected = "grouped GEMM" if sizes is ALIGNED else "grouped GEMM, padded rows" if static_shapes else "loop"
    expected = expected if moe_module.grouped_mm_available() else "loop"
    assert moe.experts.last_path.endswith(expected), moe.experts.last_path
    assert bool(kernel_calls) == (expected != "loop"), f"{len(kernel_calls)} grouped GEMM call(s)"


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="needs a CUDA device")]),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_static_dispatch_matches_the_loop(device: str, dtype: torch.dtype) -> None:
    """The accelerator default (static shapes, no host sync), forced on CPU too, against the loop: the
    output and the gradients of the input and both expert weights, each no further from a float64 run
    of the loop than the loop itself in `dtype` (outputs reach |150| here: bf16's rounding is ~0.5)."""
    moe = _moe(0, n_routed_experts=8, zero_expert_num=4, moe_topk=3, **ALIGNED).to(device=device, dtype=torch.float64)
    x = torch.randn(200, ALIGNED["hidden_size"], device=device, dtype=torch.float64)
    routing = moe.router(x)  # one routing for every run, so the runs differ in the experts' arithmetic only
    assert bool((routing.indices >= 8).any()), "some slots should go to zero experts"

    def run(fn, dtype: torch.dtype) -> list[torch.Tensor]:  # noqa: ANN001
        experts = moe.experts.to(dtype)
        inputs = [x.to(dtype).requires_grad_(), routing.weights.detach().to(dtype).requires_grad_()]
        out = fn(experts, inputs[0], routing.indices, inputs[1])
        grads = torch.autograd.grad(out.float().sum(), [*inputs, experts.gate_up_proj, experts.down_proj])
        return [t.detach().double() for t in (out, *grads)]

    static = lambda experts, *args: experts(*args, static_shapes=True)  # noqa: E731
    gold = run(experts_reference, torch.float64)
    loop, fast = run(experts_reference, dtype), run(static, dtype)
    names = ("output", "grad x", "grad gate weights", "grad gate_up_proj", "grad down_proj")
    for name, f, lp, g in zip(names, fast, loop, gold):
        scale = g.abs().max().item()
        loop_err, fast_err = (lp - g).abs().max().item(), (f - g).abs().max().item()
        assert loop_err <= (2e-2 if dtype == torch.bfloat16 else 1e-5) * scale, (name, loop_err, scale)
        assert fast_err <= 2 * loop_err + 1e-6 * scale, (name, fast_err, loop_err)


@pytest.mark.parametrize("path", ["forward_gathered", "forward_all_experts"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_decode_paths_match_loop(path: str, tokens: int) -> None:
    moe = _moe(4, n_routed_experts=7, zero_expert_num=3, moe_topk=3)
    with torch.no_grad():  # a nonzero selection bias sends some slots to zero experts
        moe.router.e_score_correction_bias[-1] = 0.05
    x = torch.randn(tokens, moe.router.classifier.in_features, requires_grad=True)
    routing = moe.router(x)
    assert bool((routing.indices >= 7).any()) and bool((routing.indices < 7).any())
    fast = getattr(moe.experts, path)(x, routing.indices, routing.weights)
    ref = experts_reference(moe.experts, x, routing.indices, routing.weights)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-5)
    params = [x, moe.experts.gate_up_proj, moe.experts.down_proj, moe.router.classifier.weight]
    g_fast = torch.autograd.grad(fast.sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_decode_thresholds_are_per_device_type() -> None:
    """A 64-row decode bucket runs every expert on CUDA (weight-read bound there) but not on the CPU;
    an accelerator without its own entry takes CUDA's; a few slots gather on either."""
    experts = _moe(4, n_routed_experts=24, zero_expert_num=3, moe_topk=4).experts
    cuda, cpu, xpu = torch.device("cuda"), torch.device("cpu"), torch.device("xpu")
    assert experts._small_path(64, 4, cuda, compiled_decode=True) == "static: all experts"
    assert experts._small_path(64, 4, xpu, compiled_decode=False) == "static: all experts"
    assert experts._small_path(64, 4, cpu, compiled_decode=False) is None
    assert experts._small_path(64, 4, cpu, compiled_decode=True) == "static: gathered weights"
    assert experts._small_path(300, 4, cuda, compiled_decode=False) is None  # the sorted dispatch
    assert experts._small_path(300, 4, cuda, compiled_decode=True) == "static: gathered weights"  # graph-safe
    assert experts._small_path(1, 4, cpu, compiled_decode=False) == "static: gathered weights"  # 3 T K < N
    assert experts._small_path(1, 4, cuda, compiled_decode=False) == "static: gathered weights"


def test_aligned_sizes_take_the_grouped_gemm() -> None:
    from longcat.model.moe import grouped_how, grouped_mm_available

    if not grouped_mm_available():
        pytest.skip("this torch has no grouped GEMM")
    cpu = torch.device("cpu")
    widths = lambda sizes: (sizes["hidden_size"], 2 * sizes["expert_ffn_hidden_size"], sizes["expert_ffn_hidden_size"])  # noqa: E731
    assert grouped_how(cpu, torch.float32, widths(ALIGNED), sync_free=False) == "kernel"
    assert grouped_how(cpu, torch.float32, widths(UNALIGNED), sync_free=False) != "kernel"


def test_experts_with_no_ffn_slot_and_empty_input() -> None:
    moe = _moe(3)
    n = moe.experts.num_experts
    x = torch.randn(5, moe.router.classifier.in_features)
    indices = torch.full((5, 2), n)  # every slot on a zero expert
    out = moe.experts(x, indices, torch.ones(5, 2))
    assert torch.equal(out, torch.zeros_like(x))
    empty = moe.experts(x[:0], indices[:0], torch.ones(0, 2))
    assert empty.shape == (0, x.shape[1])


def test_all_zero_experts_give_scaled_identity() -> None:
    """Routing everything to zero experts returns exactly scale * sum(weights) * x."""
    moe = _moe(1, n_routed_experts=4, zero_expert_num=3, moe_topk=3, routed_scaling_factor=2.5)
    with torch.no_grad():  # a huge selection bias on the zero experts forces them into the top-k
        moe.router.e_score_correction_bias[4:] = 10.0
    x = torch.randn(11, moe.router.classifier.in_features)
    probs = moe.router(x).probs
    out = moe(x)
    expected = x * (2.5 * probs[:, 4:].sum(-1, keepdim=True))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_drop_zero_experts_add_nothing() -> None:
    moe = _moe(1, n_routed_experts=4, zero_expert_num=3, moe_topk=3, zero_expert_type="drop")
    with torch.no_grad():
        moe.router.e_score_correction_bias[4:] = 10.0
    x = torch.randn(6, moe.router.classifier.in_features)
    assert torch.equal(moe(x), torch.zeros_like(x))


def test_selection_bias_changes_choice_never_gates() -> None:
    moe = _moe(2, n_routed_experts=5, zero_expert_num=2, moe_topk=2, routed_scaling_factor=3.0)
    x = torch.randn(64, moe.router.classifier.in_features)
    before = moe.router(x)
    with torch.no_grad():
        moe.router.e_score_correction_bias.copy_(torch.tensor([0.5, -0.5, 0.3, 0.0, -0.2, 0.1, 0.0]))
    after = moe.router(x)
    assert not torch.equal(before.indices.sort(-1).values, after.indices.sort(-1).values)
    torch.testing.assert_close(after.probs, before.probs)  # the bias never touches probabilities
    # every gate is exactly scale * the unbiased probability of the chosen expert
    torch.testing.assert_close(after.weights, 3.0 * after.probs.gather(1, after.indices))


def test_norm_topk_prob_renormalises_over_selected() -> None:
    moe = _moe(4, norm_topk_prob=True, routed_scaling_factor=2.0)
    routing = moe.router(torch.randn(9, moe.router.classifier.in_features))
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((9,), 2.0))


def test_router_counts_only_in_training_and_stays_fp32() -> None:
    moe = _moe(0)
    x = torch.randn(10, moe.router.classifier.in_features)
    moe.router.expert_counts.zero_()
    moe.eval()
    moe(x)
    assert moe.router.expert_counts.sum() == 0
    moe.train()
    moe(x)
    assert moe.router.expert_counts.sum() == 10 * moe.router.top_k
    moe.to(torch.bfloat16)
    assert moe.router.classifier.weight.dtype == torch.float32
    assert moe.router.e_score_correction_bias.dtype == torch.float32
    assert moe.experts.down_proj.dtype == torch.bfloat16
    assert moe(x.bfloat16()).dtype == torch.bfloat16


def test_cpu_radix_sort_matches_torch_stable_argsort() -> None:
    from longcat.model.moe import _sort_by_expert

    flat = torch.randint(0, 12, (997,), generator=torch.Generator().manual_seed(3))  # N = 8: ids 8..11 are zero
    expected = torch.argsort(flat.clamp(max=8), stable=True)
    assert torch.equal(_sort_by_expert(flat, 8, static_shapes=False), expected)
    assert torch.equal(
        _sort_by_expert(flat, 8, static_shapes=True)[: int((flat < 8).sum())], expected[: int((flat < 8).sum())]
    )


def test_float64_grouped_dispatch_matches_the_loop() -> None:
    """fp64 (gradcheck's dtype) takes the loop-over-groups path: torch's grouped GEMM has no fp64 kernel."""
    moe = _moe(3, n_routed_experts=7, zero_expert_num=3, moe_topk=3, **ALIGNED).double()
    x = torch.randn(40, moe.router.classifier.in_features, dtype=torch.float64)
    routing = moe.router(x)
    assert routing.indices.numel() > 64  # past the few-token decode paths
    fast = moe.experts(x, routing.indices, routing.weights.double(), static_shapes=False)
    torch.testing.assert_close(fast, experts_reference(moe.experts, x, routing.indices, routing.weights.double()))


def test_router_stays_float32_through_bfloat16_and_autocast() -> None:
    """model.to(bf16) keeps the router's fp32 values exactly (not rounded through bf16), and bf16
    autocast does not run its logits in bf16."""
    moe = _moe(4, n_routed_experts=8, zero_expert_num=4, moe_topk=3)
    with torch.no_grad():
        moe.router.e_score_correction_bias.copy_(0.05 + 1e-5 * torch.arange(12))
    before = {name: t.clone() for name, t in moe.router.state_dict().items()}
    moe.to(torch.bfloat16)
    for name, t in moe.router.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, before[name]), name
    assert moe.experts.gate_up_proj.dtype == torch.bfloat16
    x = torch.randn(6, moe.router.classifier.in_features, dtype=torch.bfloat16)
    plain = moe.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = moe.router(x)
    assert cast.probs.dtype == torch.float32
    torch.testing.assert_close(cast.probs, plain.probs)


def test_fixed_path_takes_the_sorted_dispatch_at_any_size(monkeypatch) -> None:
    """fixed_path (expert parallelism's received rows): small inputs skip the static decode paths and
    still match the loop reference; no rows at all still give a result tied to the rows and weights."""
    moe = _moe(0)
    experts = moe.experts
    x = torch.randn(3, moe.router.classifier.weight.shape[1], requires_grad=True)
    indices = torch.tensor([[0], [2], [0]])
    weights = torch.rand(3, 1)

    def refuse(*args):  # noqa: ANN002, ANN202
        raise AssertionError("a static decode path ran")

    monkeypatch.setattr(experts, "forward_all_experts", refuse)
    monkeypatch.setattr(experts, "forward_gathered", refuse)
    fast = experts(x, indices, weights, fixed_path=True)
    torch.testing.assert_close(fast, experts_reference(experts, x, indices, weights), rtol=1e-5, atol=1e-6)
    empty = experts(x[:0], indices[:0], weights[:0], fixed_path=True)
    assert empty.shape == (0, x.shape[1]) and empty.grad_fn is not None
    empty.sum().backward()
    assert experts.gate_up_proj.grad is not None and torch.count_nonzero(experts.gate_up_proj.grad) == 0
