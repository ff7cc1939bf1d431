"""Rank allocation: pure functions checked on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from hf_rfid.compress import allocation


def test_routing_frequencies_and_the_data_free_case():
    assert allocation.routing_frequencies([1, 3, 0, 4]) == [0.125, 0.375, 0.0, 0.5]
    assert allocation.routing_frequencies([0, 0, 0, 0]) == [0.25] * 4


def test_groups_are_frequency_sorted_chunks_with_ties_by_index():
    frequencies = [0.1, 0.3, 0.3, 0.05, 0.25]
    # order: 1 (0.3), 2 (0.3, tie -> higher index later), 4 (0.25), 0 (0.1), 3 (0.05)
    assert allocation.group_experts(frequencies, 2) == [[1, 2], [0, 4], [3]]
    assert allocation.group_experts(frequencies, 1) == [[1], [2], [4], [0], [3]]
    assert allocation.group_experts(frequencies, 8) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="group_size"):
        allocation.group_experts(frequencies, 0)


def test_effective_rank_hand_values():
    assert allocation.effective_rank([1, 1, 1, 1]) == pytest.approx(4.0)
    assert allocation.effective_rank([3, 0, 0]) == pytest.approx(1.0)
    # s = (2, 1): energy shares (0.8, 0.2)
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert allocation.effective_rank([2, 1], power=2) == pytest.approx(math.exp(entropy))
    # Roy-Vetterli: shares (2/3, 1/3)
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert allocation.effective_rank([2, 1], power=1) == pytest.approx(math.exp(entropy))
    assert allocation.effective_rank([0, 0]) == 1.0


def test_normalisations():
    assert allocation.normalize([1, 3], "sum") == [0.25, 0.75]
    assert allocation.normalize([1, 4], "max") == [0.25, 1.0]
    assert allocation.normalize([2, 4, 3], "minmax") == [0.0, 1.0, 0.5]
    assert allocation.normalize([5, 5], "minmax") == [1.0, 1.0]


def test_fused_score_xi_extremes():
    eranks, freqs = [1.0, 3.0], [0.9, 0.1]
    assert allocation.fused_scores(eranks, freqs, xi=0.0) == pytest.approx([0.9, 0.1])  # frequency only
    assert allocation.fused_scores(eranks, freqs, xi=1.0) == pytest.approx([0.25, 0.75])  # effective rank only
    assert allocation.fused_scores(eranks, freqs, xi=0.8) == pytest.approx(
        [0.8 * 0.25 + 0.2 * 0.9, 0.8 * 0.75 + 0.2 * 0.1]
    )


def test_paper_formula_undershoots_and_exact_budget_hits_it():
    scores, costs, limits = [1 / 3, 1 / 3, 1 / 3], [100, 100, 100], [50, 50, 50]
    # K_total = floor(1000 / 100) = 10; floor(10 / 3) = 3 each -> 900 of 1000 parameters
    assert allocation.allocate_ranks(scores, costs, limits, 1000, exact=False) == [3, 3, 3]
    exact = allocation.allocate_ranks(scores, costs, limits, 1000, exact=True)
    assert exact == [4, 3, 3] and sum(r * c for r, c in zip(exact, costs)) == 1000


def test_proportional_ranks_and_clipping_redistributes():
    assert allocation.allocate_ranks([0.5, 0.3, 0.2], [100] * 3, [50] * 3, 1000, exact=True) == [5, 3, 2]
    # group 0 wants 9 but holds at most 3; the rest is shared equally, the leftover unit goes to group 1
    ranks = allocation.allocate_ranks([0.9, 0.05, 0.05], [100] * 3, [3, 50, 50], 1000, exact=True)
    assert ranks == [3, 4, 3]
    assert allocation.allocate_ranks([0.9, 0.05, 0.05], [100] * 3, [3, 50, 50], 1000, exact=False) == [3, 1, 1]


def test_unequal_unit_costs_stay_within_one_unit_per_group():
    scores, costs, limits = [0.4, 0.35, 0.25], [300, 300, 170], [64, 64, 42]
    budget = 7_777
    ranks = allocation.allocate_ranks(scores, costs, limits, budget, exact=True)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert budget - sum(costs) < spent <= budget
    assert min(costs) > budget - spent  # nothing else fits


def test_a_never_routed_group_still_gets_rank_one():
    ranks = allocation.allocate_ranks([0.7, 0.3, 0.0], [10] * 3, [100] * 3, 500, exact=True)
    assert ranks[2] == 1 and sum(r * 10 for r in ranks) == 500
    assert allocation.allocate_ranks([0.7, 0.3, 0.0], [10] * 3, [100] * 3, 500, exact=False)[2] == 1


def test_every_group_at_its_maximum_leaves_budget_unused():
    assert allocation.allocate_ranks([1, 1], [10, 10], [3, 4], 1000, exact=True) == [3, 4]


def test_a_budget_below_rank_one_everywhere_is_an_error():
    with pytest.raises(ValueError, match="cannot hold rank 1 for all 3 groups"):
        allocation.allocate_ranks([1, 1, 1], [100] * 3, [10] * 3, 250)


@pytest.mark.parametrize(
    ("scores", "costs", "limits", "budget"),
    [
        ([100, 1, 1], [1, 1, 1], [2, 5, 5], 3),  # one group clipped at its maximum, two at the minimum
        ([0.9, 0.05, 0.05], [1000] * 3, [3, 100, 100], 4000),
        ([0.97, 0.01, 0.01, 0.01], [7, 5, 3, 11], [2, 40, 40, 40], 60),
    ],
)
def test_exact_budget_never_overspends_when_clipping_both_ways(scores, costs, limits, budget):
    ranks = allocation.allocate_ranks(scores, costs, limits, budget, exact=True)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert all(1 <= r <= m for r, m in zip(ranks, limits))
    assert spent <= budget
    # nothing else fits: every group below its maximum costs more than what is left
    assert all(r == m or c > budget - spent for r, m, c in zip(ranks, limits, costs))
