"""Tensors that stay fp32 whatever dtype the model is converted to.

The router (its classifier, selection bias and counts: probabilities near 1/E, a bias that moves in
steps of about 1e-4) and the RoPE frequencies (angles up to position x 1/theta^(2i/R): in bf16 the
angle at position 8192 is off by radians) keep fp32, as the released implementations and transformers
keep them. nn.Module._apply converts every floating tensor; a module holding such tensors routes its
_apply through `apply_keeping_float32`, which lets the conversion happen and then puts back the fp32
values of the named tensors, on the new device. Converting and then casting back to fp32 would round
them through the lower precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def apply_keeping_float32(
    module: nn.Module, apply: Callable[..., nn.Module], fn: Callable, recurse: bool, names: Iterable[str]
) -> nn.Module:
    """Run `apply(fn, recurse)` (the parent class's nn.Module._apply), then give each tensor named by its
    dotted path (missing or None ones are skipped) its fp32 values back on the device fn chose."""
    kept: dict[str, torch.Tensor] = {}
    for name in names:
        owner, leaf = _owner(module, name)
        tensor = getattr(owner, leaf, None)
        if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
            kept[name] = tensor.data  # the original storage: the conversion replaces .data, not this
    apply(fn, recurse)
    for name in names:
        owner, leaf = _owner(module, name)
        tensor = getattr(owner, leaf, None)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == torch.float32:
            continue
        original = kept.get(name)
        tensor.data = original.to(tensor.device) if original is not None else tensor.data.float()
    return module
