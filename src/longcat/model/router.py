"""Top-k router over N FFN experts and Z zero-computation experts (paper §2.1, Eq. 1).

Legend: T tokens, H hidden, E = N + Z experts, K top-k.

- logits and softmax in fp32 over all E experts (the classifier weight is kept in fp32 whatever the
  model dtype, as the released implementations do);
- `e_score_correction_bias` is added to the probabilities to *choose* the top-k only; the gate is the
  unbiased probability (optionally renormalised over the top-k when `norm_topk_prob`) times
  `routed_scaling_factor`, on every selected slot, zero experts included (transformers and the
  released remote code; SGLang differs, see checkpoint-contract §9.3);
- routing counts per expert accumulate in `expert_counts` while training, for the budget controller
  (training/balance.py), which owns every update of the bias. Nothing here syncs with the host;
- a forward re-run by activation checkpointing during backward (`recomputing()`) counts nothing: its
  tokens were counted the first time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LongcatConfig
from .precision import apply_keeping_float32

_recomputing = 0  # depth of recomputing() contexts


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Inside, routers count no tokens and MoE layers keep no routing: the forward being run is a
    recomputation (activation checkpointing) of one already counted and kept."""
    global _recomputing
    _recomputing += 1
    try:
        yield
    finally:
        _recomputing -= 1


def is_recomputing() -> bool:
    return _recomputing > 0


@dataclass
class Routing:
    probs: torch.Tensor  # [T, E] fp32 softmax, unbiased
    indices: torch.Tensor  # [T, K] selected experts (ids >= N are zero experts)
    weights: torch.Tensor  # [T, K] fp32 gate values, routed_scaling_factor applied


class Router(nn.Module):
    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.top_k = config.moe_topk
        self.num_experts = config.num_experts_total
        self.scaling = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.classifier = nn.Linear(config.hidden_size, self.num_experts, bias=config.router_bias)
        self.register_buffer("e_score_correction_bias", torch.empty(self.num_experts))
        # tokens routed to each expert since the controller last read them (not saved with weights)
        self.register_buffer("expert_counts", torch.empty(self.num_experts), persistent=False)
        self.track_counts = True

    def reset_parameters(self, std: float, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.classifier.weight, mean=0.0, std=std, generator=generator)
        if self.classifier.bias is not None:
            nn.init.zeros_(self.classifier.bias)
        nn.init.zeros_(self.e_score_correction_bias)
        nn.init.zeros_(self.expert_counts)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # Keep the router in fp32 under model.to(bfloat16): its probabilities are ~1/E and the
        # selection bias moves in steps of ~1e-4 (paper §1.4, "router precision"; precision.py).
        names = ("classifier.weight", "classifier.bias", "e_score_correction_bias", "expert_counts")
        return apply_keeping_float32(self, super()._apply, fn, recurse, names)

    def forward(self, x: torch.Tensor) -> Routing:
        """x [T, H] -> Routing."""
        if torch.is_autocast_enabled(x.device.type):  # bf16 autocast would run the logits in bf16
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x)
        bias = None if self.classifier.bias is None else self.classifier.bias.float()
        logits = F.linear(x.float(), self.classifier.weight.float(), bias)  # [T, E]
        probs = logits.softmax(dim=-1)
        with torch.no_grad():
            choice = probs + self.e_score_correction_bias  # selection only, never the gate
            indices = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices  # [T, K]
            if self.training and self.track_counts and not _recomputing:
                self.expert_counts.index_add_(
                    0, indices.reshape(-1), torch.ones_like(indices, dtype=torch.float32).reshape(-1)
                )
        weights = probs.gather(1, indices)  # [T, K]
        if self.norm_topk_prob:  # the epsilon transformers uses, for selections whose mass underflows
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(probs=probs, indices=indices, weights=weights * self.scaling)
