"""Apply the layout to a built model, in a fixed order (torchtitan's: expert parallelism first, then FSDP2
from the innermost unit out), and the gradient arithmetic that layout needs.

FSDP2 units: each layer's experts on the "efsdp" mesh, each layer's router on "dp" with a policy that
casts nothing (the router computes in fp32 whatever the others' param_dtype, paper §1.4, router
precision: a bf16 all-gather would round its classifier before model/router.py upcasts it), each decoder
layer and the MTP module on the "dp" mesh, then the root (embeddings, final norm, head) on "dp".
Gradients: FSDP2 averages over each unit's mesh, so dense gradients come out as the mean over the N
ranks' losses. An expert's gradient, though, already sums the contributions of the E ranks of its
expert-parallel group (their rows came to it) before FSDP2 averages it over the N/E groups: it is E
times the mean, and `finish_gradients` divides it by E. (FSDP2's own divide factor would do this on
NCCL, but gloo has no PREMUL_SUM reduction for it.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .collectives import local
from .expert_parallel import CommTimer, apply_expert_parallel
from .layout import Layout


def parallelize(
    model: nn.Module, layout: Layout, param_dtype: torch.dtype | None = None, overlap: bool = True
) -> CommTimer | None:
    """Expert parallelism (E > 1) and FSDP2 over `model`, built identically on every rank. With
    param_dtype (bf16 on GPUs) FSDP2 computes in it and reduces gradients in fp32. overlap=False runs
    the expert-parallel all-to-alls in sequence with the experts (the baseline of the ScMoE overlap)."""
    timer = (
        apply_expert_parallel(model.moe_layers(), layout.expert_mesh["ep"], overlap=overlap) if layout.ep > 1 else None
    )
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.model.layers:
        fully_shard(layer.mlp.experts, mesh=layout.expert_mesh["efsdp"], mp_policy=mp)
        fully_shard(layer.mlp.router, mesh=layout.dp_mesh, mp_policy=fp32)
        fully_shard(layer, mesh=layout.dp_mesh, mp_policy=mp)
    if model.model.mtp is not None:
        fully_shard(model.model.mtp, mesh=layout.dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=layout.dp_mesh, mp_policy=mp)
    return timer


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for moe in model.moe_layers() for p in moe.experts.parameters()]


@torch.no_grad()
def finish_gradients(model: nn.Module, layout: Layout) -> None:
    """Expert gradients from E times the mean to the mean (see the module docstring)."""
    if layout.ep > 1:
        for p in expert_parameters(model):
            if p.grad is not None:
                local(p.grad).mul_(1.0 / layout.ep)


def gather_full_model(model: nn.Module, layout: Layout, model_class: type) -> nn.Module | None:
    """The whole model on rank 0's CPU (None elsewhere): every parameter gathered whole, each a
    collective over its mesh (the experts over both of theirs) in one fixed order on every rank. For
    final/ exports; step checkpoints never gather."""
    state = {}
    for name, value in model.state_dict().items():
        tensor = value.full_tensor() if isinstance(value, DTensor) else value.detach()
        if layout.is_main:
            state[name] = tensor.cpu()
    if not layout.is_main:
        return None
    full = model_class(model.config, device="cpu", seed=0)
    full.load_state_dict(state)
    return full
