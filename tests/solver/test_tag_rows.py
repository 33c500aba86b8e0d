"""Tag rows on predicted curves (what the daemon's tenant budgets use): the fit price with each
tag capped, the allocation honouring the rows, and the one-off allocator that compiles nothing."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.solver import CvxpyAllocator, WindowProblem, solve_window
from clearbudget.solver.difficulty import BUDGET_GRID
from clearbudget.solver.query_fit import allocate_curves
from clearbudget.solver.surge_fit import curve_price

G = BUDGET_GRID


def tail_curves(n: int) -> np.ndarray:
    """Slow, log-like growth past 300 tokens: every query wants a lot."""
    return np.vstack([np.clip(0.25 * np.log2(np.maximum(G, 1.0) / 300.0), 0.0, 0.9)] * n)


def test_curve_price_with_a_capped_group_is_lower_than_without() -> None:
    u, v, cap = tail_curves(10), np.ones(10), np.full(10, np.inf)
    groups = np.array([0] * 5 + [-1] * 5)
    free = curve_price(G, u, 20_000.0, v, cap)
    capped = curve_price(G, u, 20_000.0, v, cap, groups=groups, group_budgets=np.array([2000.0]))
    # Group 0 may spend 2,000 at most: the others get the rest at a lower price.
    assert 0.0 < capped < free
    demand = G[np.argmax(u - capped * G, axis=1)]
    assert min(demand[:5].sum(), 2000.0) + demand[5:].sum() <= 20_000.0


def test_allocation_on_curves_honours_each_tag_row() -> None:
    n = 12
    tags = ["a"] * 6 + ["b"] * 6
    rows = {"a": 3000.0, "b": 7000.0}
    allocator = CvxpyAllocator()
    result = allocate_curves(
        [f"q{i}" for i in range(n)], G, tail_curves(n), 10_000.0, cap=np.full(n, 4096.0),
        tags=tags, tag_budgets=rows, allocator=allocator,
    )  # fmt: skip
    assert result.solver.startswith("cvxpy")
    spent = {t: result.allocations[[x == t for x in tags]].sum() for t in rows}
    assert spent["a"] == pytest.approx(3000.0, rel=1e-3)
    assert spent["b"] == pytest.approx(7000.0, rel=1e-3)
    assert set(result.tag_prices) == {"a", "b"}
    assert result.tag_prices["a"] > result.tag_prices["b"]  # the scarcer row costs more
    assert allocator.compiled_buckets()  # the long-lived allocator keeps what it compiled


def test_a_one_off_allocator_compiles_nothing_and_agrees() -> None:
    rng = np.random.default_rng(5)
    n = 40
    problem = WindowProblem.create(
        [f"q{i}" for i in range(n)], rng.uniform(0.2, 1.0, n), rng.uniform(0, 800, n),
        rng.uniform(1e-3, 1e-2, n), 12_000.0, cap=np.full(n, 4096.0),
        tags=["a", "b"] * (n // 2), tag_budgets={"a": 3000.0},
    )  # fmt: skip
    one_off = CvxpyAllocator.one_off()
    result = solve_window(problem, allocator=one_off)
    assert one_off.compiled_buckets() == []
    reused = solve_window(problem, allocator=CvxpyAllocator())
    assert result.objective == pytest.approx(reused.objective, rel=1e-6)
    assert result.shadow_price == pytest.approx(reused.shadow_price, rel=1e-4)


def test_a_warmed_up_allocator_has_its_first_tagged_bucket_ready() -> None:
    allocator = CvxpyAllocator()
    allocator.warm_up(2)
    assert allocator.compiled_buckets() == [(16, 2)]
    n, tags = 12, ["a"] * 6 + ["b"] * 6
    allocate_curves(
        [f"q{i}" for i in range(n)], G, tail_curves(n), 10_000.0, cap=np.full(n, 4096.0),
        tags=tags, tag_budgets={"a": 3000.0, "b": 7000.0}, allocator=allocator,
    )  # fmt: skip
    assert allocator.compiled_buckets() == [(16, 2)]  # the first window compiled nothing new
