"""Rank allocation of RFID-MoE (steps 1-2 and 4-7 of the method): pure functions on numbers.

Experts are sorted by routing frequency and cut into groups; each group gets a fused score from the effective rank
of its stacked spectrum and its routing mass; a parameter budget is turned into one rank per group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def routing_frequencies(counts: Sequence[float]) -> list[float]:
    """f_i = c_i / sum_j c_j; all equal when no token was counted (the data-free case)."""
    total = float(sum(counts))
    if total <= 0:
        return [1.0 / len(counts)] * len(counts)
    return [float(c) / total for c in counts]


def group_experts(frequencies: Sequence[float], group_size: int) -> list[list[int]]:
    """Sort experts by frequency (descending, ties by index) and cut into consecutive groups of `group_size`."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    order = sorted(range(len(frequencies)), key=lambda e: (-frequencies[e], e))
    return [sorted(order[i : i + group_size]) for i in range(0, len(order), group_size)]


def effective_rank(singular_values: torch.Tensor | Sequence[float], power: int = 2) -> float:
    """exp(H(q)) with q_j = s_j^power / sum s^power (power 2: energy spectrum; 1: Roy-Vetterli)."""
    values = torch.as_tensor(singular_values, dtype=torch.float64).clamp_min(0) ** power
    total = values.sum()
    if total <= 0:
        return 1.0
    q = values[values > 0] / total
    return float(torch.exp(-(q * q.log()).sum()))


def normalize(values: Sequence[float], method: str = "sum") -> list[float]:
    """Normalise scores: `sum` (to sum 1), `max` (to max 1) or `minmax` (to [0, 1]; all-equal gives all 1)."""
    values = [float(v) for v in values]
    if method == "sum":
        total = sum(values)
        return [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)
    if method == "max":
        top = max(values)
        return [v / top for v in values] if top > 0 else [1.0] * len(values)
    if method == "minmax":
        low, high = min(values), max(values)
        return [(v - low) / (high - low) for v in values] if high > low else [1.0] * len(values)
    raise ValueError(f"unknown normalisation {method!r}")


def fused_scores(
    effective_ranks: Sequence[float], group_frequencies: Sequence[float], xi: float, normalization: str = "sum"
) -> list[float]:
    """C_g = xi * E_g + (1 - xi) * F_g with E and F normalised over the groups."""
    ranks = normalize(effective_ranks, normalization)
    freqs = normalize(group_frequencies, normalization)
    return [xi * e + (1.0 - xi) * f for e, f in zip(ranks, freqs, strict=True)]


def allocate_ranks(
    scores: Sequence[float],
    unit_costs: Sequence[int],
    max_ranks: Sequence[int],
    budget: float,
    exact: bool = True,
) -> list[int]:
    """Turn a parameter budget into ranks K_g proportional to the scores.

    One rank unit of group g costs `unit_costs[g]` parameters (k*p + d). With `exact=False` this is the paper's
    formula K_g = max(1, floor(K_total * C_g / sum C)), clipped to `max_ranks`, where K_total is the budget over the
    score-weighted unit cost; it undershoots. With `exact=True`, ranks are proportional water-filling (groups that hit
    their maximum or the minimum of 1 are fixed and the rest re-shared), and the units lost to flooring go to the
    largest remainders, so the stored size is within one rank unit per group of the budget (never above it).

    Raises `ValueError` if even rank 1 for every group exceeds the budget.
    """
    count = len(scores)
    if not count == len(unit_costs) == len(max_ranks):
        raise ValueError("scores, unit_costs and max_ranks must have the same length")
    if any(m < 1 for m in max_ranks) or any(u <= 0 for u in unit_costs):
        raise ValueError("max_ranks must be >= 1 and unit_costs > 0")
    minimum = sum(unit_costs)
    if minimum > budget + 1e-9:
        raise ValueError(
            f"the budget of {budget:.0f} parameters cannot hold rank 1 for all {count} groups ({minimum} parameters): "
            "raise keep or lower residual_fraction"
        )
    weights = [max(float(s), 0.0) for s in scores]
    if sum(weights) <= 0:
        weights = [1.0] * count
    if not exact:
        mean_cost = sum(w * u for w, u in zip(weights, unit_costs, strict=True)) / sum(weights)
        total_rank = math.floor(budget / mean_cost)
        return [
            min(m, max(1, math.floor(total_rank * w / sum(weights)))) for w, m in zip(weights, max_ranks, strict=True)
        ]
    targets = _water_fill(weights, unit_costs, max_ranks, budget)
    ranks = [max(1, min(m, math.floor(t))) for t, m in zip(targets, max_ranks, strict=True)]
    leftover = budget - sum(r * u for r, u in zip(ranks, unit_costs, strict=True))
    want = dict(enumerate(targets))
    while True:
        candidates = [g for g in range(count) if ranks[g] < max_ranks[g] and unit_costs[g] <= leftover + 1e-9]
        if not candidates:
            break
        best = max(candidates, key=lambda g: (want[g] - ranks[g], -g))
        ranks[best] += 1
        leftover -= unit_costs[best]
    return ranks


def _water_fill(
    weights: list[float], unit_costs: Sequence[int], max_ranks: Sequence[int], budget: float
) -> list[float]:
    """Continuous ranks clip(lam * w_g, 1, max_g) with the largest lam whose cost fits the budget (bisection)."""

    def ranks_at(lam: float) -> list[float]:
        return [min(float(m), max(1.0, lam * w)) for w, m in zip(weights, max_ranks, strict=True)]

    def cost(ranks: list[float]) -> float:
        return sum(r * u for r, u in zip(ranks, unit_costs, strict=True))

    saturated = [float(m) if w > 0 else 1.0 for w, m in zip(weights, max_ranks, strict=True)]
    if cost(saturated) <= budget:
        return saturated
    low, high = 0.0, 1.0
    while cost(ranks_at(high)) <= budget:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if cost(ranks_at(middle)) <= budget:
            low = middle
        else:
            high = middle
    return ranks_at(low)
