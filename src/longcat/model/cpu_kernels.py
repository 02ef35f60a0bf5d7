"""Fused CPU kernels for the MoE's FFN experts (csrc/moe_experts.cpp), compiled on first use.

Why: on a CPU the grouped path in moe.py writes and re-reads [F, H] fp32 tensors (gathered rows,
per-slot outputs and their gradients, F = tokens x FFN experts per token) between its grouped GEMMs,
and those passes cost about a quarter of the layer. The kernel gathers one expert's rows into a buffer
that stays in cache, runs both GEMMs and the gated SwiGLU on it and adds the result into the output,
experts shared out between PyTorch's threads once (one single-threaded BLAS call per GEMM), so results
repeat bit for bit for a given thread count. Figures in docs/benchmarks.md (`longcat bench moe`).

It is built with `torch.utils.cpp_extension` (a C++ compiler and ninja, a few seconds, cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions) and checked against the plain computation once per
process. Where it cannot be built, or with LONGCAT_CPU_KERNELS=0, the MoE takes the grouped path and
one warning says why. It applies to fp32 CPU tensors on the dynamic-shape path (training and
prefill), not under CPU autocast, torch.compile or on accelerators. Its backward computes every
gradient, also those of frozen tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from . import tuning

SOURCE = Path(__file__).with_name("csrc") / "moe_experts.cpp"

_lock = threading.Lock()
_state: dict = {"loaded": None, "reason": None}
_enabled = True


def _cpu_flags() -> str:
    """The CPU's feature flags: the kernel is built with -march=native, so a build cached for one CPU
    must not be loaded on another that shares the cache directory."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _build() -> None:
    from torch.utils import cpp_extension

    source = SOURCE.read_text()
    digest = hashlib.sha256("\n".join([source, torch.__version__, _cpu_flags()]).encode()).hexdigest()[:12]
    cpp_extension.load(
        name=f"longcat_moe_cpu_{digest}",
        sources=[str(SOURCE)],
        # -ffast-math lets gcc vectorise expf (glibc's libmvec); it is a compile flag only, so the
        # process's floating-point mode is not changed at load time
        extra_cflags=["-O3", "-march=native", "-ffast-math"],
        is_python_module=False,
        verbose=False,
    )


def _self_check() -> str | None:
    """One small problem against the plain computation, in fp32 whatever autocast or default dtype the
    caller has set: a BLAS whose `sgemm_` is not the 32-bit-integer one the kernel declares shows up
    here (as wrong numbers, or as a crash at the first call) rather than in training."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        generator = torch.Generator().manual_seed(0)
        T, H, N, I, K = 5, 12, 3, 4, 2  # noqa: E741 - the legend's letters
        f32 = dict(dtype=torch.float32, device="cpu", generator=generator)
        x = torch.randn(T, H, **f32)
        w_gate_up = torch.randn(N, 2 * I, H, **f32)
        w_down = torch.randn(N, H, I, **f32)
        expert = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0], [2, 2]])
        gate = torch.rand(T, K, **f32)
        order = torch.argsort(expert.reshape(-1), stable=True)
        token = order // K
        counts = torch.bincount(expert.reshape(-1), minlength=N)
        out, _ = torch.ops.longcat_moe_cpu.experts_forward(
            x, token, gate.reshape(-1)[order].contiguous(), counts, w_gate_up, w_down
        )
        expected = torch.zeros(T, H, dtype=torch.float32)
        for t in range(T):
            for k in range(K):
                g, u = (w_gate_up[expert[t, k]] @ x[t]).chunk(2)
                expected[t] += gate[t, k] * (w_down[expert[t, k]] @ (torch.nn.functional.silu(g) * u))
    if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
        return f"its self-check differs from the plain computation by {(out - expected).abs().max().item():.3g}"
    return None


def _load() -> bool:
    with _lock:
        if _state["loaded"] is None:
            reason = None
            if os.environ.get("LONGCAT_CPU_KERNELS", "1") == "0":
                reason = "LONGCAT_CPU_KERNELS=0"
            else:
                try:
                    _build()
                    reason = _self_check()
                except Exception as error:  # no compiler, no ninja, no headers, a BLAS without sgemm_
                    reason = f"it could not be built ({type(error).__name__}: {str(error).strip()[:300]})"
            _state["loaded"] = reason is None
            _state["reason"] = reason
            if reason is not None and reason != "LONGCAT_CPU_KERNELS=0":
                warnings.warn(
                    f"longcat: the fused CPU MoE kernel is off because {reason}; the MoE runs its grouped "
                    "path (same results, slower on CPU). Set LONGCAT_CPU_KERNELS=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["loaded"]


def fused_experts_available() -> bool:
    """Whether the kernel is built, loaded and checked (builds it on the first call)."""
    return _load()


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, or None when it is."""
    _load()
    return _state["reason"]


@contextlib.contextmanager
def fused_kernels_enabled(enabled: bool) -> Iterator[None]:
    """Turn the kernel off (or back on) for a block, e.g. to compare it with the grouped path."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def fused_experts_apply(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether the fused kernel takes these operands (see `fused_experts_take`)."""
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (w_gate_up, w_down)) or x.dim() != 2:
        return False
    return fused_experts_take(x.device, x.dtype, x.shape[0], x.shape[1], w_down.shape[-1])


def fused_experts_take(device: torch.device, dtype: torch.dtype, tokens: int, hidden: int, width: int) -> bool:
    """Whether T tokens of this width run on the fused kernel: fp32 CPU tensors outside torch.compile and
    CPU autocast (which asks for bf16 GEMMs, as the grouped path then runs them), with the kernel's
    buffers under tuning.FUSED_BUFFER_LIMIT."""
    if not _enabled or device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu") or dtype != torch.float32:
        return False
    if _buffer_bytes(tokens, hidden, width, torch.get_num_threads()) > tuning.FUSED_BUFFER_LIMIT:
        return False
    return _load()


def _buffer_bytes(tokens: int, hidden: int, width: int, threads: int) -> int:
    """An upper bound on the kernel's own buffers: an output [T, H] per thread past the first, and per
    thread a scratch of M (2H + 5I) floats in the backward, M <= T the largest expert's rows."""
    return 4 * tokens * ((threads - 1) * hidden + threads * (2 * hidden + 5 * width))


class FusedExperts(torch.autograd.Function):
    """sum over FFN slots of gate * expert(x) (see csrc/moe_experts.cpp for the legend)."""

    @staticmethod
    def forward(ctx, x, gate, w_gate_up, w_down, token, counts):  # noqa: ANN001, ANN205
        out, h = torch.ops.longcat_moe_cpu.experts_forward(x, token, gate, counts, w_gate_up, w_down)
        ctx.save_for_backward(x, gate, w_gate_up, w_down, token, counts, h)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, gate, w_gate_up, w_down, token, counts, h = ctx.saved_tensors
        dx, dgate, dw_gate_up, dw_down = torch.ops.longcat_moe_cpu.experts_backward(
            grad_out.contiguous(), x, token, gate, counts, w_gate_up, w_down, h
        )
        return dx, dgate, dw_gate_up, dw_down, None, None


def fused_experts(
    x: torch.Tensor,
    gate: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """x [T, H], gate [F] and token [F] in expert order, counts [N] slots per expert,
    w_gate_up [N, 2I, H], w_down [N, H, I] -> [T, H]."""
    return FusedExperts.apply(
        x.contiguous(), gate.contiguous(), w_gate_up, w_down, token.contiguous(), counts.to(torch.int64)
    )
