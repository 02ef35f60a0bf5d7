"""Expert parallelism: the N FFN experts split over the E ranks of an expert-parallel group, each rank
holding N/E whole experts, tokens' rows sent to their experts' ranks and back with all-to-alls
(paper §4.4; the torchtitan `AllToAllTokenDispatcher` split, see ../shared/reference).

Legend: T tokens on this rank, H hidden, N FFN experts in all, E ranks in the group, L = N/E experts
per rank, K top-k, F FFN slots of this rank's tokens (zero-expert slots excluded), R rows received.

Dispatch (one MoE call):
  1. this rank's F FFN slots sorted by expert id (rank-major, since each rank holds a contiguous
     block of experts); per-expert counts [N], counted on the device, exchanged with an even
     all-to-all; then the one host read of the dispatch, per MoE layer: the per-rank split sizes
     (sent and received, one copy), which `all_to_all_single` takes as Python lists. On gloo the
     collectives themselves block the host as well;
  2. the slots' rows [F, H] and gate weights [F] sent with one `all_to_all_single` (uneven splits,
     empty ones allowed), asynchronously: the ScMoE layer computes FFN_0 meanwhile (model/layer.py);
  3. the received rows [R, H] run through the local experts (the usual grouped path or fused kernel,
     one slot per row, the gate applied inside as in one process), and the results go back by the
     reverse all-to-all, again asynchronously, while MLA_1 and FFN_1 compute;
  4. the returned rows are added into their tokens with `index_add_` in the slots' sorted order, a
     fixed order whatever the arrival order.
Zero-expert slots never leave their rank: MoE adds their identity term locally (model/moe.py), as the
released engines do, so the dispatch volume follows FFN-expert slots (about K_e per token), not K.

Autograd: every exchange is differentiable (its adjoint is the reverse exchange with the splits
swapped) and is recorded as two nodes, a start and a wait. Autograd runs a CPU backward in
decreasing order of node creation, so the reverse exchange starts at the forward's wait node and is
waited for at its start node: the return's gradients travel while FFN_1's and MLA_1's backward run,
the dispatch's while FFN_0's does. The experts' own backward cannot overlap its exchanges (it needs
their result). With the overlap off each wait follows its start at once in both passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from ..model.moe import Experts, _gather_rows, _scatter_add_rows, _sort_by_expert, accelerator_path


@dataclass
class CommTimer:
    """Seconds spent blocked on the dispatchers' all-to-alls (exposed communication: forward waits and
    the synchronous backward exchanges), how many, and their bytes; `longcat bench ep` reads it.

    delay_s_per_byte emulates a slower link: an exchange completes no sooner than bytes x delay after
    it started, so time spent computing meanwhile hides that much of it."""

    exposed_s: float = 0.0
    waits: int = 0
    nbytes: int = 0
    delay_s_per_byte: float = 0.0

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
        self.nbytes += nbytes

    def reset(self) -> None:
        self.exposed_s, self.waits, self.nbytes = 0.0, 0, 0


class Exchange:
    """One all-to-all in flight, in both directions: the forward exchange of x [sum(in_splits), ...]
    into [sum(out_splits), ...], and later the reverse exchange of its gradient."""

    def __init__(self, in_splits: list[int], out_splits: list[int], group: dist.ProcessGroup, timer: CommTimer):
        self.in_splits, self.out_splits, self.group, self.timer = in_splits, out_splits, group, timer
        self.work: tuple | None = None  # (work, start time, bytes) of the exchange in flight

    def start(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        started = time.perf_counter()
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group, async_op=True)
        self.work = (work, started, out.numel() * out.element_size())
        return out

    def wait(self) -> None:
        if self.work is not None:
            self.timer.wait(*self.work)
            self.work = None


class _StartExchange(torch.autograd.Function):
    """Forward: start sending x; the result is valid only after _WaitExchange. Backward: wait for the
    reverse exchange that _WaitExchange's backward started, and return its result as x's gradient."""

    @staticmethod
    def forward(ctx, x, exchange):  # noqa: ANN001, ANN205
        ctx.exchange = exchange
        return exchange.start(x, exchange.out_splits, exchange.in_splits)

    @staticmethod
    def backward(ctx, _unused):  # noqa: ANN001, ANN205
        exchange = ctx.exchange
        exchange.wait()
        return exchange.grad, None


class _WaitExchange(torch.autograd.Function):
    """Forward: wait for the exchange to arrive. Backward: start the reverse exchange of the gradient
    and return at once; autograd meanwhile runs the nodes recorded between the start and the wait."""

    @staticmethod
    def forward(ctx, out, exchange):  # noqa: ANN001, ANN205
        ctx.exchange = exchange
        exchange.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        exchange = ctx.exchange
        exchange.grad = exchange.start(grad, exchange.in_splits, exchange.out_splits)
        return grad, None


@dataclass
class _InFlight:
    token: torch.Tensor  # [F] source token of each sent slot, in sorted order
    num_tokens: int
    width: int  # H
    there: Exchange  # the FFN slots' rows and gates to their experts' ranks
    back: Exchange | None = None  # the experts' results back to the tokens' ranks
    sent: torch.Tensor | None = None  # [R, H + 1] received rows and gates (valid after the wait)
    local_expert: torch.Tensor | None = None  # [R] local expert index of each received row
    results: torch.Tensor | None = None  # [F, H] returned results (valid after the wait)


class AllToAllTokenDispatcher:
    """The MoE's dispatcher under expert parallelism (the interface: model.moe.LocalTokenDispatcher).

    Each exchange is a pair of autograd nodes, a start and a wait, so that in the backward pass too
    the reverse exchange starts where the forward waited and is waited for where the forward started:
    autograd runs the nodes recorded in between (FFN_0 for the dispatch; MLA_1 and FFN_1 for the
    return) while the gradients travel."""

    def __init__(
        self, group: dist.ProcessGroup, num_experts: int, timer: CommTimer | None = None, overlap: bool = True
    ) -> None:
        """overlap=False waits for each all-to-all as soon as it starts (dispatch, experts, combine in
        sequence, nothing hidden behind the dense path): the baseline the ScMoE overlap is measured against."""
        self.group = group
        self.overlap = overlap
        self.size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.local = num_experts // self.size
        self.timer = timer or CommTimer()

    def _exchange(self, x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
        out = _StartExchange.apply(x, exchange)
        return _WaitExchange.apply(out, exchange) if not self.overlap else out

    def dispatch(self, experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> _InFlight:
        T, K = indices.shape
        N, E, L = self.num_experts, self.size, self.local
        flat = indices.reshape(-1)  # [T K]
        # FFN slots by expert, zero-expert slots last (on the CPU's own path by numpy's radix sort)
        order = _sort_by_expert(flat, N, static_shapes=accelerator_path(flat.device))
        # counted on the device (bincount would read its maximum to the host), exchanged on the device
        counts = torch.zeros(N + 1, dtype=torch.int64, device=flat.device)
        counts = counts.index_add_(0, flat.clamp(max=N), torch.ones_like(flat))[:N]  # [N]
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [E L]: from each rank, per local expert
        # the one host read of the dispatch: the split sizes all_to_all_single takes as lists
        splits = torch.cat((counts.view(E, L).sum(1), received.view(E, L).sum(1))).tolist()
        in_splits, out_splits = splits[:E], splits[E:]
        order = order[: sum(in_splits)]  # [F]
        token = order // K
        rows = _gather_rows(x, token)  # [F, H]
        gate = weights.reshape(-1).index_select(0, order).to(x.dtype)  # [F]
        there = Exchange(in_splits, out_splits, self.group, self.timer)
        state = _InFlight(token, T, x.shape[-1], there)
        state.sent = self._exchange(torch.cat((rows, gate.unsqueeze(-1)), dim=-1), there)  # one exchange, [R, H + 1]
        local_ids = torch.arange(L, device=x.device).repeat(E)  # [E L]
        state.local_expert = torch.repeat_interleave(local_ids, received, output_size=sum(out_splits))  # [R]
        return state

    def compute(self, experts: Experts, state: _InFlight) -> _InFlight:
        sent = _WaitExchange.apply(state.sent, state.there) if self.overlap else state.sent
        rows, gate = sent.split((state.width, 1), dim=-1)  # [R, H], [R, 1]
        y = experts(rows, state.local_expert.unsqueeze(-1), gate, fixed_path=True)  # [R, H], one graph for any R
        state.back = Exchange(state.there.out_splits, state.there.in_splits, self.group, self.timer)
        state.results = self._exchange(y, state.back)
        state.sent = None
        return state

    def combine(self, state: _InFlight) -> torch.Tensor:
        results = _WaitExchange.apply(state.results, state.back) if self.overlap else state.results
        return _scatter_add_rows(results, state.token, state.num_tokens)  # [T, H]


def expert_slice(num_experts: int, group: dist.ProcessGroup) -> slice:
    """The experts this rank holds: a contiguous block of N/E."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if num_experts % size:
        raise ValueError(f"{num_experts} FFN experts cannot be split evenly over {size} expert-parallel ranks")
    local = num_experts // size
    return slice(rank * local, (rank + 1) * local)


@torch.no_grad()
def apply_expert_parallel(
    moe_layers: list[nn.Module], mesh: DeviceMesh | dist.ProcessGroup, timer: CommTimer | None = None,
    overlap: bool = True,
) -> CommTimer:  # fmt: skip
    """Keep only this rank's experts in every MoE layer given (the model's `moe_layers()`, built
    identically on every rank) and install the all-to-all dispatcher. Returns the timer they share.

    The stacks become DTensors sharded on the expert dimension over the expert-parallel mesh
    (`Shard(0)`, as torchtitan keeps them): their global shape stays [N, ...], so a distributed
    checkpoint stores every expert by its place in the stack and reads it back under any layout, and
    `full_tensor()` gathers them. The experts compute on their local block (model/moe.py)."""
    if not isinstance(mesh, DeviceMesh):  # a process group (tests, bench ep): its one-dimensional mesh
        mesh = DeviceMesh.from_group(mesh, moe_layers[0].experts.gate_up_proj.device.type)
    group = mesh.get_group()
    timer = timer or CommTimer()
    for moe in moe_layers:
        experts = moe.experts
        keep = expert_slice(experts.num_experts, group)
        dispatcher = AllToAllTokenDispatcher(group, experts.num_experts, timer, overlap)
        for name in ("gate_up_proj", "down_proj"):
            block = getattr(experts, name)[keep].clone()
            setattr(experts, name, nn.Parameter(DTensor.from_local(block, mesh, [Shard(0)], run_check=False)))
        experts.num_experts = keep.stop - keep.start
        moe.dispatcher = dispatcher
    return timer
