"""The stability suite (paper §3.1.3): hidden z-loss and the monitors that read, never change, the graph.

Legend: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.lm import LongcatForCausalLM


def hidden_z_loss(hidden: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 10: weight / T * sum_t (log sum_i exp |z_t,i|)^2 over the last hidden state before the
    final norm, hidden [..., H]. Pulls down the massive activations tied to loss spikes."""
    z = hidden.float().abs().logsumexp(dim=-1)
    return weight * z.pow(2).mean()


@torch.no_grad()
def router_cosine(model: LongcatForCausalLM) -> float:
    """Mean pairwise cosine similarity of the router's expert vectors, averaged over layers. Near 1
    means the balance loss dominates and routing no longer depends on the input."""
    values = []
    for moe in model.moe_layers():
        w = F.normalize(moe.router.classifier.weight.float(), dim=-1)  # [E, H]
        sim = w @ w.T
        E = sim.shape[0]
        values.append(float((sim.sum() - sim.diagonal().sum()) / (E * (E - 1))))
    return sum(values) / len(values)


@torch.no_grad()
def hidden_stats(hidden: torch.Tensor) -> tuple[float, float]:
    """Max |h| and the mean per-token L2 norm of the last hidden state [..., H]."""
    h = hidden.float()
    return float(h.abs().max()), float(h.norm(dim=-1).mean())


@torch.no_grad()
def small_gradient_share(model: torch.nn.Module, eps: float) -> float:
    """Share of parameter tensors whose gradient RMS is below 10 * eps: where Adam's epsilon starts to
    swamp the second moment (paper Fig. 7)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    small = sum(1 for g in grads if float(g.float().pow(2).mean().sqrt()) < 10 * eps)
    return small / len(grads)
