"""The few reductions training needs over the data-parallel world, as functions that are the identity
in one process, so the trainer runs the same code on 1 or N ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place (one collective for all of them when they share a
    dtype and device)."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (a new tensor)."""
    out = value.detach().clone()
    sum_(out)
    return out / world_size()


def max_(value: torch.Tensor) -> torch.Tensor:
    out = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_true(flag: torch.Tensor) -> bool:
    """Whether a boolean holds on every rank (one host sync): ranks must agree to skip a step."""
    value = flag.detach().to(torch.float32).reshape(1)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter or gradient; a plain tensor as it is (no collective)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter or gradient (a collective: every rank must call it
    for the same tensors in the same order); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
