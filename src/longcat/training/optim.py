"""AdamW with parameter groups by role, and the learning-rate schedules.

Roles: embedding (both token embeddings), hidden (every matrix inside the layers and the MTP module,
experts included), unembedding (the LM head), router (expert classifiers) and no_decay (norm gains and
biases). Matrices get weight decay, norms and biases none. Each group has its own peak LR
(TrainConfig.lr_groups; the paper's width transfer, §3.1.1, sets them per group: scaling/transfer.py).
"""

from __future__ import annotations

import math

import torch

from ..distributed import collectives
from ..model import tuning
from .config import LR_GROUPS, TrainConfig

ROLES = LR_GROUPS


def parameter_role(name: str, param: torch.nn.Parameter) -> str:
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name == "lm_head.weight":
        return "unembedding"
    if ".router.classifier." in name and param.ndim == 2:
        return "router"
    if param.ndim < 2:
        return "no_decay"
    return "hidden"


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Each group's lr_scale is its peak LR (cfg.lr_groups, else cfg.lr) over cfg.lr, so the schedule
    (lr_at) shapes every group alike."""
    scales = {role: cfg.lr_groups.get(role, cfg.lr) / cfg.lr for role in ROLES}
    groups: dict[str, list[torch.nn.Parameter]] = {role: [] for role in ROLES}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        groups[parameter_role(name, param)].append(param)
    param_groups = [
        {
            "params": params,
            "role": role,
            "lr_scale": scales[role],
            "weight_decay": 0.0 if role == "no_decay" else cfg.weight_decay,
        }
        for role, params in groups.items()
        if params
    ]
    params = [p for group in param_groups for p in group["params"]]
    return torch.optim.AdamW(
        param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused_step(params, cfg) or None
    )


def fused_step(params: list[torch.nn.Parameter], cfg: TrainConfig) -> bool:
    """Whether the step takes the fused kernels (fused AdamW, foreach clipping, chunked loss): on an
    accelerator, and in the bf16 recipe. The CPU fp32 path keeps PyTorch's per-parameter AdamW and the
    summed squares below, whose results the golden run pins bit for bit. (Sharded CPU parameters keep
    them too: the fused CPU AdamW is not registered for DTensors of gloo meshes.)"""
    device = params[0].device.type if params else "cpu"
    if device != "cpu":
        return True
    if any(isinstance(p, torch.distributed.tensor.DTensor) for p in params):
        return False
    return cfg.dtype == "bfloat16" or bool(tuning.ACCELERATOR_PATH)  # forced: the CPU steps as a GPU does


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then WSD or cosine."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps + 1) / span, 1.0)  # the last step lands on the floor, as WSD's
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = cfg.wsd_decay_steps
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return peak
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return peak + (floor - peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


@torch.no_grad()
def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float, foreach: bool = False) -> torch.Tensor:
    """Scale the gradients so their global L2 norm is at most max_norm (inf: measure only); returns the
    norm before clipping. The norm is the square root of summed fp32 squares, over every rank's shards
    when training is distributed (each element is held by exactly one rank: dense shards over N
    ranks, expert shards over N/E x E), so one process and N give the same value. (PyTorch's
    clip_grad_norm_ takes per-tensor norms whose CPU kernel is off by up to 2e-4 relative on a
    [4096, 128] gradient here, and cannot combine DTensors of two meshes.)

    foreach: the per-tensor norms and the scaling as one `_foreach` kernel each (accelerators and the
    bf16 recipe: fused_step), instead of two kernels per parameter. Every rank enters the reduction,
    with zero when it holds no gradient."""
    grads = [collectives.local(p.grad) for p in parameters if p.grad is not None]
    device = parameters[0].device if parameters else torch.device("cpu")
    if not grads:
        squares = torch.zeros((), device=device)
    elif foreach:
        squares = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).pow(2).sum()
    else:
        squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    collectives.sum_(squares)
    norm = squares.sqrt()
    if grads and max_norm > 0 and math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        if foreach:
            torch._foreach_mul_(grads, coef)
        else:
            for g in grads:
                g.mul_(coef.to(g.dtype))
    return norm
