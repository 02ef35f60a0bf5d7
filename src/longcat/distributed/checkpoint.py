"""Step checkpoints with `torch.distributed.checkpoint` (DCP), in a form that does not depend on the
layout that wrote them, so a run resumes on another number of processes or another EP size.

Every rank writes its own shards (no gather on rank 0) into one directory. What is written:
- `model/NAME`: every entry of the model's state dict. Dense parameters are DTensors sharded over the
  "dp" mesh (or plain tensors on one process); DCP stores them by their global shape and reads back
  whatever slice a rank of another layout holds.
- An expert stack `...mlp.experts.gate_up_proj` [N, 2I, H] is stored expert by expert, as
  `model/...mlp.experts.<e>.gate_up_proj` [2I, H] with e the global expert index: under expert
  parallelism and FSDP2 each expert lies whole on exactly one rank of an EP group (FSDP2 shards the
  stack along the expert dimension), so that rank writes it, and any layout reads each expert it
  holds by its global index.
- `optim/NAME/exp_avg`, `optim/NAME/exp_avg_sq` (split the same way) and `optim/NAME/step`: AdamW's
  state by parameter name, not by position.
Loading fills the tensors of a model and optimizer already built and parallelized, in place.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from .collectives import local
from .layout import Layout

_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _first_expert(num_experts: int, layout: Layout | None) -> int:
    """Global index of the first expert in this rank's local shard of an expert stack: its EP rank's
    block of L = N/E experts, then FSDP2's chunk of that block (torch.chunk sizes, ceil(L / S))."""
    if layout is None:
        return 0
    mesh = layout.expert_mesh
    ep_rank, shard_rank, shards = mesh.get_local_rank("ep"), mesh.get_local_rank("efsdp"), mesh.size(0)
    per_rank = num_experts // layout.ep
    return ep_rank * per_rank + shard_rank * math.ceil(per_rank / shards)


def _pieces(name: str, tensor: torch.Tensor, num_experts: int, layout: Layout | None) -> dict[str, torch.Tensor]:
    match = _EXPERTS.match(name)
    if match is None:
        return {name: tensor}
    shard = local(tensor)  # [experts here, ...]
    first = _first_expert(num_experts, layout)
    return {f"{match.group(1)}.{first + j}.{match.group(2)}": shard[j] for j in range(shard.shape[0])}


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as its first step would create it, so a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: Layout | None
) -> dict[str, torch.Tensor]:
    """The flat, layout-independent state dict described above; its tensors share storage with the
    model's and the optimizer's, so loading into it restores them."""
    num_experts = model.config.n_routed_experts
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        state.update({f"model/{k}": v for k, v in _pieces(name, value, num_experts, layout).items()})
    if optimizer is not None:
        for name, param in model.named_parameters():
            slots = optimizer.state[param]
            for slot in ("exp_avg", "exp_avg_sq"):
                pieces = _pieces(name, slots[slot], num_experts, layout)
                state.update({f"optim/{k}/{slot}": v for k, v in pieces.items()})
            state[f"optim/{name}/step"] = slots["step"]
    return state


def save(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Each rank writes its own shards into `path` (a collective on several ranks)."""
    with warnings.catch_warnings():  # one process: DCP says it assumes so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, checkpoint_id=str(path))


def load(path: Path, state: dict[str, torch.Tensor]) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(path))
