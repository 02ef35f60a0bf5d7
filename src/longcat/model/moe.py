"""The MoE block: N stacked SwiGLU experts run by one sorted, grouped dispatch, plus Z zero-computation
experts folded into one term (paper §2.1).

Legend: T tokens, H hidden, N FFN experts, Z zero experts, K top-k, I expert width,
A = T * K routing slots, F <= A slots routed to FFN experts.

Dispatch: the A slots are sorted by expert id (zero-expert ids are >= N, so they sort last), the
tokens of the F FFN slots are gathered, two grouped GEMMs run every expert on its contiguous block,
and the results are scattered back with `index_add_`. Zero experts are never dispatched: identity
experts add `x * (sum of their gate weights)`, drop experts add nothing.

On CPU in fp32 the gather, GEMMs, SwiGLU and scatter of each expert run fused in a compiled kernel
where it can be built (cpu_kernels.py); the grouped path is its fallback and the path elsewhere.

Host syncs: on CPU we read F once per layer (free there) and compute exactly F rows. On the accelerator
path (accelerators, torch.compile, or tuning.ACCELERATOR_PATH forcing it on the CPU) shapes stay static
(all A rows; the grouped GEMM leaves rows past the last offset unwritten, so those rows are masked out on
the way in and out), unaligned widths are zero-padded for the grouped GEMM rather than looped over, and
nothing waits for the device.

Under autocast (the bf16 recipe: fp32 residual stream and master weights) the input and each stacked
weight are cast to the autocast dtype once per call, the grouped GEMMs run in it, and the output
returns in the input's dtype; `torch._grouped_mm` is on no autocast list, so without this it would see
fp32 operands, which its CUDA kernel refuses.

Decoding (A <= 64 slots) and torch.compile take one of two static-shape paths with no sort instead:
`forward_all_experts` runs every expert on the few tokens (one GEMM over all stacked experts, gates
zero for the unchosen) where that reads fewer weight bytes than gathering each slot's expert
(3 A >= N: a gather reads, writes and re-reads A expert weight sets), else `forward_gathered`
gathers each slot's expert weights and runs batched matmuls.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import DTensor

from ..config import LongcatConfig
from . import tuning
from .cpu_kernels import fused_experts, fused_experts_apply, fused_experts_take, unavailable_reason
from .router import Router, Routing, is_recomputing


def _local(stack: torch.Tensor) -> torch.Tensor:
    """This process's block of a stacked expert weight. Under expert parallelism (applied from outside,
    distributed/expert_parallel.py) the stacks are DTensors sharded on the expert dimension, whose
    global shape checkpoints keep; the experts compute on the local block, as torchtitan's do."""
    return stack.to_local() if isinstance(stack, DTensor) else stack


def accelerator_path(device: torch.device) -> bool:
    """Whether the MoE takes the accelerator path (static shapes, no host read, no fused CPU kernel):
    on accelerators and under torch.compile, or anywhere when tuning.ACCELERATOR_PATH forces it."""
    if tuning.ACCELERATOR_PATH is not None:
        return tuning.ACCELERATOR_PATH
    return device.type != "cpu" or torch.compiler.is_compiling()


_grouped_mm_probe: list[bool] = []  # the probe's answer, once known


def grouped_mm_available() -> bool:
    """Whether this build has a grouped GEMM that runs. Probed on first use, not at import: the probe
    is a BLAS call, and MKL's reproducible mode (training/determinism.py) can only be chosen before the
    process's first one. Under torch.compile it cannot be probed (the call would be traced): a graph
    traced before the eager probe takes the loop (training/wrapping.py probes before compiling)."""
    if not _grouped_mm_probe:
        if torch.compiler.is_compiling():
            return False
        _grouped_mm_probe.append(_probe_grouped_mm())
    return _grouped_mm_probe[0]


def _probe_grouped_mm() -> bool:
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(3, 4)
        w = torch.ones(2, 4, 4)
        out = _grouped_mm(x, w, torch.tensor([1, 3], dtype=torch.int32))
        return bool(torch.all(out == 4))
    except (RuntimeError, TypeError):  # the op exists but this build has no kernel for it
        return False


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


def _grouped_mm_takes(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """The grouped GEMM kernels want 16-byte aligned rows, fp32/bf16/fp16 operands, and on CUDA (and
    under torch.compile, whose shape function says so) bf16."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or not grouped_mm_available():
        return False
    if (device.type != "cpu" or torch.compiler.is_compiling()) and dtype != torch.bfloat16:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return all(dim * size % 16 == 0 for dim in dims)


def grouped_how(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...], sync_free: bool) -> str:
    """How grouped_matmul runs for these operands: "kernel" (the grouped GEMM), "padded" (the grouped
    GEMM on operands zero-padded to 16-byte rows: the accelerator path, which must not wait for the
    device, takes it where widths are unaligned) or "loop" (one GEMM per group after a host read of the
    offsets: the CPU's dynamic path, and any platform without a grouped GEMM for this dtype)."""
    if _grouped_mm_takes(device, dtype, dims):
        return "kernel"
    if sync_free and _grouped_mm_takes(device, dtype, tuple(_aligned(d, dtype) for d in dims)):
        return "padded"
    return "loop"


_HOW_NAMES = {"kernel": "grouped GEMM", "padded": "grouped GEMM, padded rows", "loop": "grouped, per-expert GEMM loop"}


def _path_name(path: str, dtype: torch.dtype) -> str:
    """A path's name as training records it: with the compute dtype where it is not fp32."""
    return path if dtype == torch.float32 else f"{path} ({str(dtype).removeprefix('torch.')})"


def _aligned(dim: int, dtype: torch.dtype) -> int:
    step = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-dim // step) * step


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, how: str) -> torch.Tensor:
    """Row block g of x [rows, k] times w[g] [k, n]; offsets [G] int32 are the blocks' cumulative ends.

    Rows past offsets[-1] are unspecified. `how` as grouped_how chose it."""
    if how == "kernel":
        return _grouped_mm(x, w, offsets)
    if how == "padded":
        k, n = w.shape[-2:]
        pk, pn = _aligned(k, w.dtype) - k, _aligned(n, w.dtype) - n
        return _grouped_mm(F.pad(x, (0, pk)), F.pad(w, (0, pn, 0, pk)), offsets)[:, :n]
    ends = offsets.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    # unbind: one backward that stacks the per-expert gradients, not one full-size zero tensor per expert
    weights = w.unbind(0)
    blocks = [block @ weights[g] for g, block in enumerate(x[: ends[-1]].split(sizes)) if sizes[g]]
    blocks.append(x.new_zeros(x.shape[0] - ends[-1], w.shape[-1]))
    return torch.cat(blocks)


def _sort_by_expert(flat: torch.Tensor, num_experts: int, static_shapes: bool) -> torch.Tensor:
    """Stable argsort of the slots' expert ids [A]. On the CPU path numpy's stable sort of 16-bit keys is
    a radix sort, an order of magnitude faster than torch.argsort on the CPU (docs/benchmarks.md)."""
    if not static_shapes and flat.device.type == "cpu" and num_experts < 2**15:
        keys = flat.clamp(max=num_experts).to(torch.int16).numpy()  # zero experts all sort last
        return torch.from_numpy(np.argsort(keys, kind="stable"))
    return torch.argsort(flat, stable=True)


class _GatherRows(torch.autograd.Function):
    """rows = x[index]; its adjoint is a scatter-add. Written out because autograd differentiates
    x[index] with an accumulating index_put, several times slower on CPU than index_add_; the two
    functions here are each other's adjoint and each direction uses the fast kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (index,) = ctx.saved_tensors
        return _scatter_add_rows(grad, index, ctx.num_rows), None


class _ScatterAddRows(torch.autograd.Function):
    """out[index[i]] += y[i] into num_rows zero rows; the adjoint of _GatherRows."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(index)
        return y.new_zeros(num_rows, y.shape[-1]).index_add_(0, index, y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (index,) = ctx.saved_tensors
        return _GatherRows.apply(grad, index), None, None


class _GatedSwiGLU(torch.autograd.Function):
    """a = silu(g) * u * gate from h = [g | u] [F, 2I] and gate [F]; saves only h and gate and
    computes both gradients in one pass (autograd's chain keeps four [F, I] intermediates)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(h, gate)
        g, u = h.chunk(2, dim=-1)
        return F.silu(g).mul_(u).mul_(gate.unsqueeze(-1))

    @staticmethod
    @once_differentiable  # the in-place backward has no derivative of its own; say so if one is asked for
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        # seven [F, I] passes, written into the halves of grad_h: after the GEMMs these passes over
        # memory are the MoE's largest cost; aten's silu_backward applies d silu / dg in one of them
        h, gate = ctx.saved_tensors
        g, u = h.chunk(2, dim=-1)
        gate = gate.unsqueeze(-1)
        grad_h = torch.empty_like(h)
        grad_g, grad_u = grad_h.chunk(2, dim=-1)
        torch.mul(grad, F.silu(g), out=grad_u)
        grad_gate = torch.linalg.vecdot(grad_u, u) if ctx.needs_input_grad[1] else None
        grad_u.mul_(gate)
        torch.mul(grad, u, out=grad_g).mul_(gate)
        torch.ops.aten.silu_backward(grad_g, g, grad_input=grad_g)
        return grad_h, grad_gate


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(x, index)


def _scatter_add_rows(y: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    return _ScatterAddRows.apply(y, index, num_rows)


class Experts(nn.Module):
    """N SwiGLU experts, stacked as in transformers 5.x (per-expert keys on disk: see checkpoint.py)."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.width = config.expert_ffn_hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.width, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, self.width))
        self.last_path: str | None = None  # what the last call ran (_record)

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        static_shapes: bool | None = None,
        fixed_path: bool = False,
    ) -> torch.Tensor:
        """x [T, H], indices [T, K], weights [T, K] -> sum over FFN slots of gate * expert(x), [T, H].
        fixed_path: the sorted dispatch whatever T (no small-T paths), so the autograd graph has the same
        structure for any number of rows: ranks that receive different numbers of rows must still run
        their backward collectives in the same order (distributed/expert_parallel.py)."""
        T, K = indices.shape
        N = self.num_experts
        gate_up_proj, down_proj = _local(self.gate_up_proj), _local(self.down_proj)  # [N, 2I, H], [N, H, I]
        if T == 0:
            if fixed_path:  # still connected to the rows and the weights, so their backward runs as elsewhere
                return x * 0 + 0 * (gate_up_proj.sum() + down_proj.sum())
            return torch.zeros_like(x)
        # under autocast the residual stream and the master weights stay fp32, and the grouped GEMM is on
        # no autocast list: cast the input and each stacked weight once here, as torchtitan's experts do
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # thresholds per device type: see tuning.py (compiled training takes the sorted dispatch: gathering
        # A expert weight sets would not fit)
        small = self._small_path(T, K, x.device, torch.compiler.is_compiling() and not self.training)
        if not fixed_path and small is not None:
            self._record(small, compute)
            if small == "static: all experts":
                return self.forward_all_experts(x, indices, weights)
            return self.forward_gathered(x, indices, weights)
        if static_shapes is None:
            static_shapes = accelerator_path(x.device)
        flat = indices.reshape(-1)  # [A]
        order = _sort_by_expert(flat, N, static_shapes)  # [A] FFN slots grouped by expert, zero slots last
        counts = torch.zeros(N + 1, dtype=torch.int32, device=x.device)
        counts.index_add_(0, flat.clamp(max=N), torch.ones_like(flat, dtype=torch.int32))
        offsets = counts[:N].cumsum(0, dtype=torch.int32)  # [N]
        if not static_shapes:
            order = order[: int(offsets[-1])]  # [F]
        token = order // K  # [F] source token of each sorted slot
        gate = weights.reshape(-1).index_select(0, order).to(compute)  # [F]
        if not static_shapes and fused_experts_apply(x, gate_up_proj, down_proj):
            self._record("fused CPU kernel", compute)
            return fused_experts(x, gate, gate_up_proj, down_proj, token, counts[:N])
        how = grouped_how(x.device, compute, (x.shape[-1], 2 * self.width, self.width), static_shapes)
        self._record(_HOW_NAMES[how], compute)
        rows = _gather_rows(x.to(compute), token)  # [F, H]
        if static_shapes:
            # rows past offsets[-1] (zero-expert slots) hold unspecified values in both directions:
            # `where` keeps them out of the output and, in backward, out of every gradient
            valid = (torch.arange(order.numel(), device=x.device) < offsets[-1]).unsqueeze(-1)
            rows = torch.where(valid, rows, 0)
            gate = torch.where(valid.squeeze(-1), gate, 0)
        h = grouped_matmul(rows, gate_up_proj.to(compute).transpose(1, 2), offsets, how)  # [F, 2I]
        # the gate multiplies the I-wide activation, not the H-wide output (same result, less work)
        a = _GatedSwiGLU.apply(h, gate)  # [F, I]
        y = grouped_matmul(a, down_proj.to(compute).transpose(1, 2), offsets, how)  # [F, H]
        if static_shapes:
            y = torch.where(valid, y, 0)
        return _scatter_add_rows(y, token, T).to(x.dtype)

    def _small_path(self, tokens: int, top_k: int, device: torch.device, compiled_decode: bool) -> str | None:
        """The static few-token path a call takes (tuning.py), or None for the sorted dispatch."""
        slots = tokens * top_k
        if tokens <= tuning.for_device(tuning.ALL_EXPERTS_TOKENS, device) and 3 * slots >= self.num_experts:
            return "static: all experts"
        if slots <= tuning.for_device(tuning.GATHER_SLOTS, device) or compiled_decode:  # the sorted one breaks graphs
            return "static: gathered weights"
        return None

    def _record(self, path: str, dtype: torch.dtype) -> None:
        """last_path: what the last call ran, in words (training writes it to environment.json)."""
        if not torch.compiler.is_compiling():
            self.last_path = _path_name(path, dtype)

    def path(self, tokens: int, top_k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """Which of `forward`'s paths a call with this many tokens takes outside torch.compile, in words,
        predicted before any call (`last_path` says what a call ran). The paths round differently, so
        training records it (training/determinism.py)."""
        small = self._small_path(tokens, top_k, device, compiled_decode=False)
        if small is not None:
            return _path_name(small, dtype)
        static = accelerator_path(device)
        why = None
        if device.type == "cpu" and not static:
            if fused_experts_take(device, dtype, tokens, self.gate_up_proj.shape[-1], self.width):
                return "fused CPU kernel"
            why = unavailable_reason() if dtype == torch.float32 else f"{dtype} operands"
        how = grouped_how(device, dtype, (self.gate_up_proj.shape[-1], 2 * self.width, self.width), static)
        path = _path_name(_HOW_NAMES[how], dtype)
        return f"{path} ({why})" if why else path

    def forward_gathered(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode path for a handful of tokens: gather each slot's expert weights and run batched
        matmuls, A = T * K slots. No sort, no host sync, static shapes (torch.compile-friendly); it reads
        A expert weight sets, so it only pays off while A is small."""
        T, K = indices.shape
        slot_expert = indices.reshape(-1).clamp(max=self.num_experts - 1)  # [A]; zero slots get weight 0
        gate = (weights * (indices < self.num_experts)).reshape(-1).to(x.dtype)  # [A]
        rows = x[:, None].expand(T, K, x.shape[-1]).reshape(T * K, -1, 1)  # [A, H, 1], no host read
        h = torch.bmm(self.gate_up_proj[slot_expert], rows).squeeze(-1)  # [A, 2I]
        g, u = h.chunk(2, dim=-1)
        a = (F.silu(g) * u * gate.unsqueeze(-1)).unsqueeze(-1)  # [A, I, 1]
        y = torch.bmm(self.down_proj[slot_expert], a).squeeze(-1)  # [A, H]
        return y.view(T, K, -1).sum(dim=1)

    def forward_all_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode path for a few tokens over few experts: every expert runs on every token and the gates of
        the unchosen ones are zero. Reads each expert's weights once, in place (no gather copies), so its
        cost barely grows with T: the verify step of speculative decoding costs about a plain step."""
        T, H = x.shape
        N = self.num_experts
        ffn_slot = indices < N
        gate = x.new_zeros(T, N).scatter_add_(  # [T, N]; zero-expert slots add 0 to expert N - 1
            1, indices.clamp(max=N - 1), (weights * ffn_slot).to(x.dtype)
        )
        h = F.linear(x, self.gate_up_proj.reshape(-1, H)).view(T, N, -1)  # [T, N, 2I]
        g, u = h.chunk(2, dim=-1)
        a = F.silu(g) * u * gate.unsqueeze(-1)  # [T, N, I]
        return torch.bmm(a.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)  # [N, T, H] -> [T, H]


def experts_reference(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The slow, obvious loop over experts that the grouped dispatch must match (tests, benchmarks)."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        gate_w, up_w = experts.gate_up_proj[e].chunk(2, dim=0)
        h = F.silu(x[token] @ gate_w.T) * (x[token] @ up_w.T)
        out = out.index_add(0, token, (h @ experts.down_proj[e].T) * weights[token, slot, None].to(x.dtype))
    return out


class LocalTokenDispatcher:
    """Expert parallelism of 1: every FFN expert is in this process, so nothing is sent. The interface
    splits the MoE in three so that an expert-parallel dispatcher (distributed/expert_parallel.py) can
    run its all-to-alls while the ScMoE layer computes its dense path (layer.py):
      dispatch(experts, x, indices, weights) -> handle   (starts sending the tokens' rows)
      compute(experts, handle) -> handle                  (waits for them, runs the experts, starts the return)
      combine(handle) -> [T, H]                           (waits for the results, sums them per token)"""

    def dispatch(self, experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> tuple:
        return (x, indices, weights)

    def compute(self, experts: Experts, handle: tuple) -> torch.Tensor:
        return experts(*handle)

    def combine(self, handle: torch.Tensor) -> torch.Tensor:
        return handle


class MoEHandle(NamedTuple):
    """A MoE call between its phases (see LocalTokenDispatcher)."""

    shape: torch.Size  # the input's shape [..., H]
    flat: torch.Tensor  # the input as [T, H]
    routing: Routing
    dispatched: object  # the dispatcher's own state


class MoE(nn.Module):
    """Router + FFN experts + zero experts. Attribute names follow the checkpoint (`mlp.router`, `mlp.experts`).

    `dispatcher` moves the FFN slots' rows to their experts and back: the local one by default;
    distributed/ installs an all-to-all one under expert parallelism. Zero-expert slots never go
    through it: their identity term is added here, on the token's own rank."""

    dispatcher = LocalTokenDispatcher()  # the class-wide default; an instance attribute overrides it

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.num_ffn_experts = config.n_routed_experts
        self.zero_expert_type = config.zero_expert_type
        self.has_zero_experts = config.zero_expert_num > 0
        self.router = Router(config)
        self.experts = Experts(config)
        self.last_routing: Routing | None = None
        self.keep_routing = False  # training/ sets this to read probabilities for the balance loss

    def __getstate__(self) -> dict:
        # last_routing is one forward's transient state, holding autograd history that cannot be
        # deep-copied or pickled: copies of the module (copy.deepcopy, torch.save) start without it
        state = super().__getstate__()
        state["last_routing"] = None
        return state

    def forward(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """x [..., H] -> [..., H]. `reference` runs the loop over experts instead (one process only)."""
        if reference:
            handle = self.begin(x, dispatch=False)
            out = experts_reference(self.experts, handle.flat, handle.routing.indices, handle.routing.weights)
            return self._add_zero_experts(out, handle)
        return self.finish(self.compute(self.begin(x)))

    def begin(self, x: torch.Tensor, dispatch: bool = True) -> MoEHandle:
        """Route x [..., H] and start sending the FFN slots' rows to their experts."""
        flat = x.reshape(-1, x.shape[-1])  # [T, H]
        routing = self.router(flat)
        if self.keep_routing and not is_recomputing():
            self.last_routing = routing
        sent = self.dispatcher.dispatch(self.experts, flat, routing.indices, routing.weights) if dispatch else None
        return MoEHandle(x.shape, flat, routing, sent)

    def compute(self, handle: MoEHandle) -> MoEHandle:
        """Run the experts on the rows that arrived (waiting for them) and start sending the results back."""
        return handle._replace(dispatched=self.dispatcher.compute(self.experts, handle.dispatched))

    def finish(self, handle: MoEHandle) -> torch.Tensor:
        """Wait for the experts' results and add them and the zero experts' term per token: [..., H]."""
        return self._add_zero_experts(self.dispatcher.combine(handle.dispatched), handle)

    def _add_zero_experts(self, out: torch.Tensor, handle: MoEHandle) -> torch.Tensor:
        routing, flat = handle.routing, handle.flat
        if self.has_zero_experts and self.zero_expert_type == "identity":
            zero_slots = routing.indices >= self.num_ffn_experts  # [T, K]
            zero_weight = (routing.weights * zero_slots).sum(dim=-1, keepdim=True)  # [T, 1]
            out = torch.addcmul(out, flat, zero_weight.to(flat.dtype))
        return out.view(handle.shape)
