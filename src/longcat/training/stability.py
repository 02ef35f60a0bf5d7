"""The stability suite (paper §3.1.3): hidden z-loss and the monitors that read, never change, the graph.

Legend: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed.collectives import full, local, mean, sum_
from ..model.lm import LongcatForCausalLM
from .balance import lb_probability_gradient


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
        w = F.normalize(full(moe.router.classifier.weight).float(), dim=-1)  # [E, H]
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
    swamp the second moment (paper Fig. 7). Sharded gradients count as the whole tensor: their sums of
    squares and sizes are added over the ranks (one collective, which every rank enters with a row per
    parameter, zeros where it holds no gradient, so ranks with different gradients stay in step)."""
    params = list(model.parameters())
    if not params:
        return 0.0
    device = params[0].device
    rows = []
    for p in params:  # [sum of squares, elements, ranks with a gradient]
        if p.grad is None:
            rows.append(torch.zeros(3, device=device))
        else:
            g = local(p.grad)
            rows.append(torch.stack([g.float().pow(2).sum(), torch.tensor(float(g.numel()), device=g.device),
                                     torch.ones((), device=g.device)]))  # fmt: skip
    stats = torch.stack(rows)  # [P, 3]
    sum_(stats)
    has = stats[:, 2] > 0
    if not bool(has.any()):
        return 0.0
    rms = (stats[has, 0] / stats[has, 1].clamp(min=1)).sqrt()
    return float((rms < 10 * eps).float().mean())


def grad_norm_ratio(routings: list, lb_alpha: float, grad_accum: int, lb_groups: int, num_ffn: int) -> float:
    """R_g (Eq. 9): |alpha grad_P L_LB| / |grad_P L_LM| for the batch-averaged expert probabilities P,
    averaged over layers, from (routing, f) pairs whose probabilities kept their gradient. A common shift
    of every token's probabilities moves P by the same amount, so grad_P of a loss is the sum over
    tokens of its gradient with respect to the probabilities; the balance part is known in closed form
    and the rest of the measured gradient is the LM part."""
    ratios = []
    weight = lb_alpha / len(routings) / grad_accum  # the LB term's weight in the loss per layer
    for routing, f in routings:
        # [E + 1]: the gradient summed over tokens, and whether this rank has one; every rank enters the
        # collective (zeros where it has none), so a layer without gradients on one rank hangs nobody
        grad = routing.probs.grad
        mine = torch.zeros(routing.probs.shape[-1] + 1, device=routing.probs.device)
        if grad is not None:
            mine[:-1] = grad.sum(0).float()
            mine[-1] = 1.0
        both = mean(mine)
        if not both[-1] > 0:  # no rank has a gradient for this layer
            continue
        # the mean over ranks of their sums is what one process computes for the global batch
        total = both[:-1] / both[-1]
        lb = weight * lb_probability_gradient(f, num_ffn, total.numel(), lb_groups)
        lm = total - lb
        ratios.append(float(lb.norm() / lm.norm().clamp(min=1e-30)))
    return sum(ratios) / len(ratios) if ratios else float("nan")
