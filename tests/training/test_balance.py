"""The budget controller (Eq. 2) and the balance loss (Eqs. 3-5) on hand-made numbers."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import random_tiny_config

from longcat.model.router import Routing
from longcat.training.balance import BudgetController, load_balance_loss


def test_controller_update_matches_eq2_on_hand_made_counts() -> None:
    # N = 4 FFN experts, Z = 2 zero experts, K = 2, K_e = 1, T_all = 10 tokens (20 slots)
    controller = BudgetController(num_ffn_experts=4, top_k=2, target_ffn_experts=1.0, rate=0.1)
    counts = torch.tensor([6.0, 2.0, 1.0, 0.0, 7.0, 4.0])
    delta = controller.bias_delta(counts, tokens=10.0, rate=0.1)
    # Eq. 2: 0.1 * (K_e / K / N - T_i / (K T_all)) = 0.1 * (1/8 - T_i / 20); zero experts untouched
    expected = torch.tensor([0.1 * (1 / 8 - 6 / 20), 0.1 * (1 / 8 - 2 / 20), 0.1 * (1 / 8 - 1 / 20), 0.1 / 8, 0, 0])
    torch.testing.assert_close(delta, expected)


def test_split_rates_reduce_to_eq2_and_separate_budget_from_balance() -> None:
    controller = BudgetController(num_ffn_experts=4, top_k=2, target_ffn_experts=1.0, rate=0.1)
    counts = torch.tensor([6.0, 2.0, 1.0, 0.0, 7.0, 4.0])
    torch.testing.assert_close(controller.bias_delta(counts, 10.0, 0.1, 0.1), controller.bias_delta(counts, 10.0, 0.1))
    budget_only = controller.bias_delta(counts, 10.0, 0.1, 0.0)
    # F = 9 / 10 FFN experts per token against K_e = 1: every FFN bias rises by 0.1 * (1 - 0.9) / (2 * 4)
    torch.testing.assert_close(budget_only[:4], torch.full((4,), 0.1 * 0.1 / 8))
    balance_only = controller.bias_delta(counts, 10.0, 0.0, 0.1)
    assert abs(float(balance_only[:4].sum())) < 1e-7  # zero-sum: moves load between experts only


def test_controller_step_reads_and_clears_counts_and_only_moves_ffn_biases() -> None:
    from longcat.model.moe import MoE

    config = random_tiny_config(0, n_routed_experts=4, zero_expert_num=2, moe_topk=2)
    moe = MoE(config)
    moe.router.reset_parameters(std=0.1)
    moe.train()
    for _ in range(3):  # three micro-batches accumulate into one update
        moe(torch.randn(10, config.hidden_size))
    counts = moe.router.expert_counts.clone()
    assert counts.sum() == 3 * 10 * 2
    controller = BudgetController(4, 2, target_ffn_experts=1.0, rate=0.5, final_rate_ratio=0.5, total_steps=10)
    (report,) = controller.step([moe], step=4)
    rate = 0.5 * (1 - 0.5 * 0.4)
    torch.testing.assert_close(moe.router.e_score_correction_bias, controller.bias_delta(counts, 30.0, rate))
    assert torch.all(moe.router.e_score_correction_bias[4:] == 0)
    assert moe.router.expert_counts.sum() == 0
    assert abs(report.ffn_experts_per_token - float(counts[:4].sum() / 30)) < 1e-6
    load = counts[:4]
    assert float(report.max_violation) == pytest.approx(float((load.max() - load.mean()) / load.mean()))


def test_controller_step_with_split_rates_and_an_idle_layer() -> None:
    """The training default: the budget and load-evening parts at their own decayed rates; a layer that
    saw no tokens keeps its biases."""
    from longcat.model.moe import MoE

    config = random_tiny_config(1, n_routed_experts=4, zero_expert_num=2, moe_topk=2)
    busy, idle = MoE(config), MoE(config)
    for moe in (busy, idle):
        moe.router.reset_parameters(std=0.1)
        moe.train()
    busy(torch.randn(12, config.hidden_size))
    counts = busy.router.expert_counts.clone()
    controller = BudgetController(4, 2, target_ffn_experts=1.0, rate=0.4, final_rate_ratio=0.25, total_steps=10,
                                  balance_rate=0.1, budget_final_ratio=1.0)  # fmt: skip
    controller.step([busy, idle], step=6)
    budget_rate, balance_rate = 0.4, 0.1 * (1 - 0.75 * 0.6)  # only the load-evening part decays
    expected = controller.bias_delta(counts, 12.0, budget_rate, balance_rate)
    torch.testing.assert_close(busy.router.e_score_correction_bias, expected)
    assert torch.all(idle.router.e_score_correction_bias == 0)


def test_split_rates_decay_separately() -> None:
    kwargs = dict(target_ffn_experts=1.0, rate=0.4, final_rate_ratio=0.25, total_steps=10)
    split = BudgetController(4, 2, balance_rate=0.1, budget_final_ratio=1.0, **kwargs)
    assert split.rate_at(10) == 0.4 and split.balance_rate_at(10) == 0.1 * 0.25
    assert split.rate_at(5) == 0.4 and abs(split.balance_rate_at(5) - 0.1 * 0.625) < 1e-12
    # Eq. 2 as written has one mu: its single decay wins over any budget ratio
    single = BudgetController(4, 2, balance_rate=None, budget_final_ratio=1.0, **kwargs)
    assert single.rate_at(10) == single.balance_rate_at(10) == 0.4 * 0.25


def test_controller_drives_budget_to_target() -> None:
    """Closed loop on a synthetic router: biases move the FFN share to K_e."""
    torch.manual_seed(0)
    from longcat.model.moe import MoE

    config = random_tiny_config(1, n_routed_experts=6, zero_expert_num=6, moe_topk=4)
    moe = MoE(config).train()
    moe.router.reset_parameters(std=0.5)
    with torch.no_grad():
        moe.router.classifier.weight[6:] += 0.5  # start biased towards the zero experts
    controller = BudgetController(6, 4, target_ffn_experts=3.0, rate=0.5)
    x = torch.randn(512, config.hidden_size)
    for step in range(300):
        moe.router(x)
        report = controller.step([moe], step)
    assert abs(report[0].ffn_experts_per_token - 3.0) < 0.05


def test_balance_loss_matches_eqs_3_to_5_on_hand_made_batch() -> None:
    # N = 4 FFN experts in D = 2 groups {0,1}, {2,3}; Z = 2 zero experts (group 3); K = 2, K_e = 1; T = 3
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
            [0.4, 0.1, 0.1, 0.1, 0.1, 0.2],
            [0.05, 0.05, 0.2, 0.3, 0.3, 0.1],
        ],
        requires_grad=True,
    )
    indices = torch.tensor([[2, 4], [0, 5], [3, 2]])
    loss, f = load_balance_loss(Routing(probs, indices, probs.gather(1, indices)), 4, 2, 1.0, 2)
    P = (
        torch.tensor(
            [0.1 + 0.2 + 0.4 + 0.1 + 0.05 + 0.05, 0.3 + 0.1 + 0.1 + 0.1 + 0.2 + 0.3, 0.2 + 0.1 + 0.1 + 0.2 + 0.3 + 0.1]
        )
        / 3
    )
    # slots per group: group 0 <- {0}: 1; group 1 <- {2, 3, 2}: 3; zero group <- {4, 5}: 2
    f_expected = torch.tensor([2 / (1 * 3) * 1, 2 / (1 * 3) * 3, 1 / ((2 - 1) * 3) * 2])
    torch.testing.assert_close(f, f_expected)
    torch.testing.assert_close(loss, (f_expected * P).sum())
    loss.backward()
    # dL/dR(x_t)_i = f_{group(i)} / T for every token
    torch.testing.assert_close(probs.grad[0], torch.tensor([2 / 9, 2 / 9, 6 / 9, 6 / 9, 2 / 9, 2 / 9]))


def test_balanced_routing_gives_unit_f() -> None:
    T, E = 6, 6
    probs = torch.full((T, E), 1 / E)
    indices = torch.tensor([[0, 4], [1, 5], [2, 4], [3, 5], [0, 4], [1, 5]])  # K_e = 1 of K = 2 each
    _, f = load_balance_loss(Routing(probs, indices, probs.gather(1, indices)), 4, 2, 1.0, 1)
    torch.testing.assert_close(f, torch.ones(2))
