"""Expert parallelism: the N FFN experts split over the E ranks of an expert-parallel group, each rank
holding N/E whole experts, tokens' rows sent to their experts' ranks and back with all-to-alls
(paper §4.4; the torchtitan `AllToAllTokenDispatcher` split, see ../shared/reference).

Legend: T tokens on this rank, H hidden, N FFN experts in all, E ranks in the group, L = N/E experts
per rank, K top-k, F FFN slots of this rank's tokens (zero-expert slots excluded), R rows received.

Dispatch (one MoE call):
  1. this rank's F FFN slots sorted by expert id (rank-major, since each rank holds a contiguous
     block of experts); per-expert counts [N] exchanged with an even all-to-all (the only host sync:
     the split sizes must be Python lists);
  2. the slots' rows [F, H] and gate weights [F] sent with `all_to_all_single` (uneven splits, empty
     ones allowed), asynchronously: the ScMoE layer computes FFN_0 meanwhile (model/layer.py);
  3. the received rows [R, H] run through the local experts (the usual grouped path or fused kernel,
     one slot per row, the gate applied inside as in one process), and the results go back by the
     reverse all-to-all, again asynchronously, while MLA_1 and FFN_1 compute;
  4. the returned rows are added into their tokens with `index_add_` in the slots' sorted order, a
     fixed order whatever the arrival order.
Zero-expert slots never leave their rank: MoE adds their identity term locally (model/moe.py), as the
released engines do, so the dispatch volume follows FFN-expert slots (about K_e per token), not K.

Autograd: every all-to-all is differentiable (its adjoint is the reverse all-to-all with the splits
swapped). In the backward pass they run synchronously, in autograd's order: the backward of the
return, then of the experts, then of the dispatch; nothing overlaps them there except what autograd
itself runs on other threads (nothing, on a CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import Experts, _gather_rows, _scatter_add_rows, _sort_by_expert


@dataclass
class CommTimer:
    """Seconds spent blocked in `wait()` on this dispatcher's all-to-alls (exposed communication), and
    how many were waited for; `longcat bench ep` reads it."""

    exposed_s: float = 0.0
    waits: int = 0
    delay_s_per_byte: float = 0.0  # an emulated slower link: each wait lasts at least bytes * this after the start

    def wait(self, work: dist.Work | None, started: float, nbytes: int) -> None:
        t0 = time.perf_counter()
        if work is not None:
            work.wait()
        if self.delay_s_per_byte:
            remaining = started + nbytes * self.delay_s_per_byte - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        self.exposed_s += time.perf_counter() - t0
        self.waits += 1


class _AllToAll(torch.autograd.Function):
    """out [sum(out_splits), ...] = all_to_all_single(x [sum(in_splits), ...]). The forward only starts
    the exchange and appends (work, start time, bytes) to `pending`; the caller waits before reading
    `out`. The backward is the reverse exchange, run synchronously."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending):  # noqa: ANN001, ANN205
        ctx.splits, ctx.group = (out_splits, in_splits), group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        started = time.perf_counter()
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group, async_op=True)
        pending.append((work, started, out.numel() * out.element_size()))
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out_splits, in_splits = ctx.splits
        grad = grad.contiguous()
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad, in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None


@dataclass
class _InFlight:
    token: torch.Tensor  # [F] source token of each sent slot, in sorted order
    num_tokens: int
    in_splits: list[int]  # rows this rank sends to each rank
    out_splits: list[int]  # rows this rank receives from each rank
    rows: torch.Tensor | None = None  # [R, H] received rows (valid after the wait)
    gate: torch.Tensor | None = None  # [R]
    local_expert: torch.Tensor | None = None  # [R] local expert index of each received row
    results: torch.Tensor | None = None  # [F, H] returned results (valid after the wait)
    pending: list = field(default_factory=list)


class AllToAllTokenDispatcher:
    """The MoE's dispatcher under expert parallelism (the interface: model.moe.LocalTokenDispatcher)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, timer: CommTimer | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.local = num_experts // self.size
        self.timer = timer or CommTimer()

    def dispatch(self, experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> _InFlight:
        T, K = indices.shape
        N, E, L = self.num_experts, self.size, self.local
        flat = indices.reshape(-1)  # [T K]
        order = _sort_by_expert(flat, N, static_shapes=False)  # FFN slots by expert, zero-expert slots last
        counts = torch.bincount(flat.clamp(max=N), minlength=N + 1)[:N]  # [N]
        order = order[: int(counts.sum())]  # [F]
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [E L]: from each rank, per local expert
        state = _InFlight(
            token=order // K,
            num_tokens=T,
            in_splits=counts.view(E, L).sum(1).tolist(),
            out_splits=received.view(E, L).sum(1).tolist(),
        )
        rows = _gather_rows(x, state.token)  # [F, H]
        gate = weights.reshape(-1).index_select(0, order).to(x.dtype)  # [F]
        state.rows = _AllToAll.apply(rows, state.out_splits, state.in_splits, self.group, state.pending)
        state.gate = _AllToAll.apply(gate, state.out_splits, state.in_splits, self.group, state.pending)
        local_ids = torch.arange(L, device=x.device).repeat(E)  # [E L]
        state.local_expert = torch.repeat_interleave(local_ids, received.to(x.device))  # [R]
        return state

    def _wait(self, state: _InFlight) -> None:
        for work, started, nbytes in state.pending:
            self.timer.wait(work, started, nbytes)
        state.pending.clear()

    def compute(self, experts: Experts, state: _InFlight) -> _InFlight:
        self._wait(state)
        y = experts(state.rows, state.local_expert.unsqueeze(-1), state.gate.unsqueeze(-1))  # [R, H]
        state.results = _AllToAll.apply(y, state.in_splits, state.out_splits, self.group, state.pending)
        state.rows = state.gate = None
        return state

    def combine(self, state: _InFlight) -> torch.Tensor:
        self._wait(state)
        return _scatter_add_rows(state.results, state.token, state.num_tokens)  # [T, H]


def expert_slice(num_experts: int, group: dist.ProcessGroup) -> slice:
    """The experts this rank holds: a contiguous block of N/E."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % size:
        raise ValueError(f"{num_experts} FFN experts cannot be split evenly over {size} expert-parallel ranks")
    local = num_experts // size
    return slice(rank * local, (rank + 1) * local)


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, timer: CommTimer | None = None) -> CommTimer:
    """Keep only this rank's experts in every MoE layer of `model` (built identically on every rank) and
    install the all-to-all dispatcher. Returns the timer shared by all layers."""
    timer = timer or CommTimer()
    for moe in model.moe_layers():
        experts = moe.experts
        keep = expert_slice(experts.num_experts, group)
        dispatcher = AllToAllTokenDispatcher(group, experts.num_experts, timer)
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[keep].clone())
        experts.down_proj = nn.Parameter(experts.down_proj[keep].clone())
        experts.num_experts = keep.stop - keep.start
        moe.dispatcher = dispatcher
    return timer
