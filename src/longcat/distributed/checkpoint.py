"""Step checkpoints with `torch.distributed.checkpoint` (DCP), in a form that does not depend on the
layout that wrote them, so a run resumes on another number of processes or another EP size.

Every rank writes its own shards (no gather on rank 0) into one directory. What is written:
- `model/NAME`: every entry of the model's state dict. Dense parameters are DTensors sharded over the
  "dp" mesh (or plain tensors on one process); the expert stacks under expert parallelism are
  DTensors over the ("efsdp", "ep") mesh (distributed/expert_parallel.py, parallelize.py). DCP stores
  each by its global shape and reads back whatever slice a rank of another layout holds, uneven
  splits included.
- `optim/NAME/exp_avg`, `optim/NAME/exp_avg_sq` (sharded as their parameter) and `optim/NAME/step`:
  AdamW's state by parameter name, not by position.
Loading fills the tensors of a model and optimizer already built and parallelized, in place.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn


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


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """The flat, layout-independent state dict described above; its tensors share storage with the
    model's and the optimizer's, so loading into it restores them."""
    state: dict[str, torch.Tensor] = {f"model/{name}": value for name, value in model.state_dict().items()}
    if optimizer is not None:
        for name, param in model.named_parameters():
            slots = optimizer.state[param]
            for slot in ("exp_avg", "exp_avg_sq"):
                state[f"optim/{name}/{slot}"] = slots[slot]
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
