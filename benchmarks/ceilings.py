"""In-sample ceilings for the quality tables: the best accuracy one cap per *group* can buy.

A group shares one cap: per tag (`task`, `model`), per tag and hint (the MATH level, say), or per
problem (one problem under every model). A chain of T tokens under cap c costs min(T, c) and
scores iff T <= c and it is correct, as in the simulator. The ceiling chooses every group's cap
knowing every chain of the pool (in-sample, so no online policy can reach it) at the same mean
tokens per chain: the concave hull of each group's (cost, correct) steps, bought greedily by
slope, the last segment in part. What per-group knowledge is worth, beside the per-record oracle.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from itertools import pairwise

import numpy as np

from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord

Grouping = Callable[[int, RolloutRecord], Hashable]


def by_tag(_: int, record: RolloutRecord) -> Hashable:
    return (record.benchmark, record.model)


def by_problem(_: int, record: RolloutRecord) -> Hashable:
    return (record.benchmark, record.problem_id)


def by_tag_and_hint(hints: Sequence[float | None]) -> Grouping:
    return lambda i, record: (record.benchmark, record.model, hints[i])


def group_cap_ceiling(pool: RolloutPool, tokens_per_query: float, grouping: Grouping) -> float:
    """Mean accuracy per chain with one cap per group at `tokens_per_query` mean cost."""
    groups: dict[Hashable, list[tuple[int, bool]]] = defaultdict(list)
    for i, record in enumerate(pool.records):
        groups[grouping(i, record)].extend((s.tokens, s.correct) for s in record.samples)
    slopes, costs, gains = [], [], []
    chains = 0
    for members in groups.values():
        chains += len(members)
        for d_cost, d_gain in _hull_steps(members):
            slopes.append(d_gain / d_cost)
            costs.append(d_cost)
            gains.append(d_gain)
    order = np.argsort(-np.asarray(slopes), kind="stable")
    budget, score = tokens_per_query * chains, 0.0
    for k in order:  # each group's steps come in hull order: falling slopes
        if budget <= 0:
            break
        bought = min(1.0, budget / costs[k])
        score += bought * gains[k]
        budget -= bought * costs[k]
    return score / chains if chains else 0.0


def _hull_steps(members: Sequence[tuple[int, bool]]) -> list[tuple[float, float]]:
    """(cost, correct) increments along the upper concave hull of a group's caps."""
    tokens = np.array([t for t, _ in members], dtype=np.float64)
    correct = np.array([c for _, c in members], dtype=bool)
    points = [(0.0, 0.0)]
    for cap in np.unique(tokens):
        scored = float((correct & (tokens <= cap)).sum())
        points.append((float(np.minimum(tokens, cap).sum()), scored))
    hull: list[tuple[float, float]] = []
    for point in points:  # monotone chain, upper side, costs ascending
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) >= 0:
            hull.pop()
        hull.append(point)
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(hull)]
    return [(c, g) for c, g in steps if c > 0 and g > 0]


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])
