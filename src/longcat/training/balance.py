"""Budget control and load balance for zero-computation experts (paper §2.1-2.2; paper.md §2).

Legend: T tokens, N FFN experts, Z zero experts, E = N + Z, K top-k, K_e target FFN experts per token,
D groups of FFN experts (one per expert-parallel device).

- `BudgetController`: after each optimizer step, for every MoE layer,
      delta b_i = mu * (K_e / K * 1 / N  -  T_i / (K * T_all))   for FFN experts i <= N   (Eq. 2)
      delta b_i = 0                                              for zero experts
  with T_i the tokens routed to expert i and T_all the tokens of the global batch (every micro-batch,
  every rank: the router's `expert_counts` accumulate them, and distributed/ all-reduces them
  before this runs). mu decays over the run.

  Eq. 2 is the sum of two parts: a common shift of all FFN biases that moves the FFN share to the
  budget, mu * (K_e - F) / (K N) with F the FFN experts per token, and a zero-sum part that evens
  the load among FFN experts, mu * (F / (K N) - T_i / (K T_all)). `balance_rate` lets the second part
  use its own rate; left at None it equals mu and the update is exactly Eq. 2. On small expert counts
  one rate cannot do both: a rate high enough to hold the budget makes the loads thrash between
  experts, hence the split. Split, the two parts decay separately: decaying the load-evening part
  steadies the loads late in the run, while a decaying budget part lets the FFN share lag the
  router's drift, so by default the budget rate stays constant. The runs behind these defaults are
  in docs/benchmarks.md ("Budget controller").
- `load_balance_loss`: the device-level loss with the zero experts as group D + 1 (Eqs. 3-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.moe import MoE
from ..model.router import Routing


@dataclass
class LayerBudget:
    """0-d tensors on the model's device (read them only when logging: reading syncs with it)."""

    ffn_experts_per_token: torch.Tensor  # mean over the global batch
    max_violation: torch.Tensor  # (max_i T_i - mean_i T_i) / mean_i T_i over FFN experts (DeepSeek's MaxVio)


class BudgetController:
    def __init__(
        self,
        num_ffn_experts: int,
        top_k: int,
        target_ffn_experts: float,
        rate: float,
        final_rate_ratio: float = 1.0,
        total_steps: int = 1,
        balance_rate: float | None = None,
        budget_final_ratio: float | None = None,
    ) -> None:
        """final_rate_ratio: the balance part's rate decays linearly to this share of itself over the run.
        budget_final_ratio: the same for the budget part when the rates are split (None: as the balance
        part). With balance_rate None (Eq. 2 as written) one mu decays by final_rate_ratio."""
        if not 0 < target_ffn_experts <= top_k:
            raise ValueError(f"target_ffn_experts must lie in (0, K={top_k}], got {target_ffn_experts}")
        self.N, self.K, self.K_e = num_ffn_experts, top_k, target_ffn_experts
        self.rate, self.final_rate_ratio, self.total_steps = rate, final_rate_ratio, max(total_steps, 1)
        self.balance_rate = rate if balance_rate is None else balance_rate
        split = balance_rate is not None and budget_final_ratio is not None
        self.budget_final_ratio = budget_final_ratio if split else final_rate_ratio

    def _decay(self, step: int, final_ratio: float) -> float:
        """Linear decay from 1 to final_ratio over the run (paper: a decaying mu is more stable)."""
        return 1.0 - (1.0 - final_ratio) * min(step / self.total_steps, 1.0)

    def rate_at(self, step: int) -> float:
        """The budget part's rate (mu of Eq. 2 when the rates are not split)."""
        return self.rate * self._decay(step, self.budget_final_ratio)

    def balance_rate_at(self, step: int) -> float:
        return self.balance_rate * self._decay(step, self.final_rate_ratio)

    def bias_delta(
        self, counts: torch.Tensor, tokens: float, rate: float, balance_rate: float | None = None
    ) -> torch.Tensor:
        """Eq. 2 for one layer: counts [E] tokens per expert over the global batch -> delta b [E]."""
        balance_rate = rate if balance_rate is None else balance_rate
        delta = torch.zeros_like(counts, dtype=torch.float32)
        share = counts[: self.N].float() / (self.K * tokens)  # T_i / (K T_all)
        mean_share = share.mean()  # F / (K N)
        delta[: self.N] = rate * (self.K_e / self.K / self.N - mean_share) + balance_rate * (mean_share - share)
        return delta

    @torch.no_grad()
    def step(self, moe_layers: list[MoE], step: int) -> list[LayerBudget]:
        """Apply Eq. 2 to every layer from its accumulated counts, then clear the counts. No host sync:
        a layer that saw no tokens gets no update (its counts are all zero)."""
        rate, balance_rate = self.rate_at(step), self.balance_rate_at(step)
        report = []
        for moe in moe_layers:
            router = moe.router
            counts = router.expert_counts
            tokens = counts.sum() / self.K  # every token fills K slots
            seen = (tokens > 0).float()
            delta = self.bias_delta(counts, tokens.clamp(min=1e-9), rate, balance_rate)
            router.e_score_correction_bias.add_(delta * seen)
            ffn = counts[: self.N]
            mean_load = ffn.mean()
            report.append(
                LayerBudget(
                    ffn_experts_per_token=ffn.sum() / tokens,
                    max_violation=(ffn.max() - mean_load) / mean_load,
                )
            )
            counts.zero_()
        return report


def group_of_experts(num_ffn: int, num_zero: int, groups: int) -> torch.Tensor:
    """Group index of each of the E experts: FFN experts split into `groups` contiguous groups of
    N / D, all zero experts in group D."""
    if num_ffn % groups:
        raise ValueError(f"lb_groups D={groups} must divide the number of FFN experts N={num_ffn}")
    ffn = torch.arange(num_ffn) // (num_ffn // groups)
    return torch.cat((ffn, torch.full((num_zero,), groups)))


@functools.lru_cache(maxsize=64)
def _group_index(num_ffn: int, num_zero: int, groups: int, device: torch.device) -> torch.Tensor:
    """group_of_experts on `device`, made once: a host-to-device copy per layer and micro-batch would
    make the host wait on an accelerator."""
    return group_of_experts(num_ffn, num_zero, groups).to(device)


def load_balance_loss(
    routing: Routing,
    num_ffn: int,
    top_k: int,
    target_ffn_experts: float,
    groups: int,
    reduce: Callable[..., None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-5 over one micro-batch (without alpha). Returns the loss and f [D + 1] (no gradient).

    P_j = 1/T sum_t sum_{i in group j} R(x_t)_i
    f_j = D / (K_e T) * #(slots choosing group j)            for FFN groups j <= D
    f_{D+1} = 1 / ((K - K_e) T) * #(slots choosing a zero expert)
    L = sum_j f_j P_j
    f counts every selected expert in a group (so every f_j is 1 under perfectly balanced routing).
    On several ranks `reduce` sums the slot counts and T over them in place, so f is the global
    batch's; P stays this rank's, and averaging the ranks' gradients (data parallelism) then gives
    the gradient of the global batch's loss.
    """
    probs, indices = routing.probs, routing.indices  # [T, E], [T, K]
    T, E = probs.shape
    group = _group_index(num_ffn, E - num_ffn, groups, probs.device)  # [E]
    P = torch.zeros(groups + 1, device=probs.device, dtype=probs.dtype).index_add_(0, group, probs.sum(0)) / T
    with torch.no_grad():
        # counted with index_add_ rather than bincount, which reads its input's maximum to the host
        chosen = group[indices.reshape(-1)]  # [T K]
        hits = torch.zeros(groups + 1, device=probs.device, dtype=probs.dtype)
        hits.index_add_(0, chosen, torch.ones_like(chosen, dtype=probs.dtype))
        tokens = torch.full((1,), float(T), device=probs.device, dtype=probs.dtype)
        if reduce is not None:
            reduce(hits, tokens)
        scale = torch.full((groups + 1,), groups / target_ffn_experts, device=probs.device, dtype=probs.dtype)
        if num_ffn < E:
            scale[groups] = 1.0 / (top_k - target_ffn_experts) if top_k > target_ffn_experts else 0.0
        f = hits * scale / tokens
    return (f * P).sum(), f


def lb_probability_gradient(f: torch.Tensor, num_ffn: int, num_experts: int, groups: int) -> torch.Tensor:
    """d L_LB / d P for the batch-averaged expert probability vector P [E]: f of each expert's group."""
    return f[_group_index(num_ffn, num_experts - num_ffn, groups, f.device)]
