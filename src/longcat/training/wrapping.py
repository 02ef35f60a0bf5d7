"""Per-layer activation checkpointing and compilation of a training model, applied from outside.

As torchtitan does, each decoder layer is the unit: `activation_checkpointing` drops a layer's
activations after its forward and recomputes them in backward (memory for compute), `compile`
compiles each layer's forward on its own (one graph reused by every layer of the same shape, so
compile time does not grow with depth). They are applied in that order, before FSDP
(distributed/parallelize.py). Both replace the layer's `forward` on the instance rather than wrapping
the module, so parameter names, and with them checkpoints, stay as they are.

A recomputed forward runs inside model.router.recomputing(): the routers' token counts (which the
expert-bias controller reads, paper Eq. 2) and the MoE layers' kept routing (the balance loss's)
belong to the first forward only.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..model.moe import grouped_mm_available
from ..model.router import recomputing


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), recomputing()


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Every decoder layer of `model` (a LongcatForCausalLM) recomputes its activations in backward."""
    for layer in model.model.layers:
        forward = layer.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)

        layer.forward = checkpointed


def compile_layers(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Every decoder layer's forward (with its checkpointing, if applied first) through torch.compile."""
    grouped_mm_available()  # probed eagerly: a traced probe cannot run
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, backend=backend)
