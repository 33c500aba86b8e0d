"""Window allocation: brute force on a token grid, cvxpy vs closed form, fallbacks, edges."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.solver import CvxpyAllocator, SolverFailure, WindowProblem, solve_window
from clearbudget.solver.utility import envelope, value


@pytest.fixture(scope="module")
def allocator() -> CvxpyAllocator:
    return CvxpyAllocator()


def window(n: int, seed: int, budget_per_query: float = 500.0, **kw: object) -> WindowProblem:
    rng = np.random.default_rng(seed)
    return WindowProblem.create(
        [f"q{i}" for i in range(n)],
        rng.uniform(0.1, 1.0, n),
        rng.uniform(0.0, 1000.0, n),
        rng.lognormal(np.log(0.005), 0.5, n),
        budget_per_query * n,
        weight=rng.uniform(0.5, 2.0, n),
        **kw,  # type: ignore[arg-type]
    )


def grid_optimum(problem: WindowProblem, step: float) -> float:
    """Exact optimum over allocations in multiples of `step` (knapsack dynamic programme)."""
    units = int(problem.budget // step)
    grid = np.arange(units + 1) * step
    best = np.zeros(units + 1)
    for i in range(problem.size):
        gain = problem.weight[i] * value(
            np.minimum(grid, problem.cap[i]), problem.a[i], problem.tau[i], problem.beta[i]
        )
        # best_new[k] = max over j ≤ k of best[k − j] + gain[j]
        shifted = np.full((units + 1, units + 1), -np.inf)
        for j in range(units + 1):
            shifted[j, j:] = best[: units + 1 - j] + gain[j]
        best = shifted.max(axis=0)
    return float(best[-1])


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_small_windows(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 5))
    problem = WindowProblem.create(
        [f"q{i}" for i in range(n)],
        rng.uniform(0.2, 1.0, n),
        rng.uniform(0.0, 400.0, n),
        rng.uniform(0.005, 0.05, n),
        float(rng.uniform(100.0, 1500.0)),
        weight=rng.uniform(0.5, 2.0, n),
    )
    result = solve_window(problem)
    step = problem.budget / 300
    best_on_grid = grid_optimum(problem, step)
    env = envelope(problem.a, problem.tau, problem.beta)
    one_query = float(
        np.max(problem.weight * value(env.knee, problem.a, problem.tau, problem.beta))
    )
    assert result.relaxed_objective >= best_on_grid - 1e-9  # the relaxation bounds every plan
    assert result.objective >= best_on_grid - one_query - 1e-9  # lose at most the chord query
    if np.all(result.abandoned == (result.allocations == 0)) and result.objective == pytest.approx(
        result.relaxed_objective, rel=1e-9
    ):
        # No chord query: the continuous plan is optimal, so it beats the grid.
        assert result.objective >= best_on_grid - 1e-9


def test_brute_force_with_a_chord_query_abandons_it() -> None:
    # Two identical queries and a budget for one and a half: one is funded, one abandoned.
    problem = WindowProblem.create(["a", "b"], [0.8, 0.8], [300.0, 300.0], [0.02, 0.02], 0.0)
    knee = float(envelope(0.8, 300.0, 0.02).knee)
    result = solve_window(problem.with_budget(1.5 * knee))
    assert sorted(result.abandoned.tolist()) == [False, True]
    assert result.allocations.sum() == pytest.approx(1.5 * knee)  # the survivor takes it all
    assert result.objective >= grid_optimum(problem.with_budget(1.5 * knee), knee / 200) - 1e-9


@pytest.mark.parametrize(("n", "tags"), [(12, False), (200, False), (12, True), (300, True)])
def test_cvxpy_and_closed_form_agree(allocator: CvxpyAllocator, n: int, tags: bool) -> None:
    kw = {}
    if tags:
        kw = {
            "tags": [f"t{i % 3}" for i in range(n)],
            "tag_budgets": {"t0": 80.0 * n, "t1": 400.0 * n},
        }
    problem = window(n, seed=n, **kw)
    closed = solve_window(problem, method="closed_form")
    conic = solve_window(problem, method="cvxpy", allocator=allocator)
    assert conic.fallbacks == 0
    assert conic.shadow_price == pytest.approx(closed.shadow_price, rel=1e-3)
    assert conic.relaxed_objective == pytest.approx(closed.relaxed_objective, rel=1e-4)
    assert conic.objective == pytest.approx(closed.objective, rel=1e-4)
    for tag, price in closed.tag_prices.items():
        assert conic.tag_prices[tag] == pytest.approx(
            price, rel=1e-3, abs=1e-6 * closed.shadow_price
        )
    if tags:
        assert closed.tag_prices["t0"] > 0  # the tight tag binds
        assert closed.tag_prices["t1"] == 0


def test_tag_budgets_hold(allocator: CvxpyAllocator) -> None:
    tags = [f"t{i % 2}" for i in range(40)]
    problem = window(40, seed=5, tags=tags, tag_budgets={"t0": 2000.0})
    for method in ("closed_form", "cvxpy"):
        result = solve_window(problem, method=method, allocator=allocator)  # type: ignore[arg-type]
        in_t0 = np.array([t == "t0" for t in tags])
        assert result.allocations[in_t0].sum() <= 2000.0
        assert result.allocations.sum() <= problem.budget


def test_dpp_problem_is_compiled_once_per_bucket() -> None:
    allocator = CvxpyAllocator()
    for n in (20, 21, 24):
        solve_window(window(n, seed=n), method="cvxpy", allocator=allocator)
    assert allocator.compiled_buckets() == [(24, 0)]
    solve_window(window(30, seed=1), method="cvxpy", allocator=allocator)
    assert allocator.compiled_buckets() == [(24, 0), (32, 0)]


def test_large_windows_are_built_per_window_and_agree() -> None:
    allocator = CvxpyAllocator(dpp_max_size=16)
    problem = window(40, seed=9)
    conic = solve_window(problem, method="cvxpy", allocator=allocator)
    assert allocator.compiled_buckets() == []
    closed = solve_window(problem, method="closed_form")
    assert conic.shadow_price == pytest.approx(closed.shadow_price, rel=1e-3)


class BrokenAllocator(CvxpyAllocator):
    def relax(self, *args: object, **kwargs: object):  # type: ignore[override]
        raise SolverFailure("CLARABEL finished with status 'optimal_inaccurate'")


def test_solver_failure_falls_back_to_closed_form_and_is_counted() -> None:
    problem = window(30, seed=2)
    result = solve_window(problem, method="cvxpy", allocator=BrokenAllocator())
    assert result.fallbacks == 1
    assert result.fell_back
    assert result.solver == "closed_form"
    assert "optimal_inaccurate" in (result.fallback_reason or "")
    closed = solve_window(problem, method="closed_form")
    assert result.shadow_price == closed.shadow_price
    assert closed.fallbacks == 0


def test_slack_budget_prices_tokens_at_zero_and_funds_every_cap() -> None:
    problem = WindowProblem.create(
        ["a", "b", "c"], [0.9, 0.5, 0.0], [100.0, 200.0, 50.0], [0.01, 0.02, 0.1], 1e6,
        cap=[1500.0, 900.0, 700.0],
    )  # fmt: skip
    result = solve_window(problem)
    assert result.shadow_price == 0.0
    assert result.allocations.tolist() == [1500.0, 900.0, 0.0]  # c is worth nothing
    assert result.abandoned.tolist() == [False, False, True]


def test_insolvent_queries_get_nothing() -> None:
    problem = window(50, seed=11, budget_per_query=150.0)
    result = solve_window(problem)
    env = envelope(problem.a, problem.tau, problem.beta, np.minimum(problem.cap, problem.budget))
    insolvent = problem.weight * env.slope < result.shadow_price
    assert insolvent.any()
    assert np.all(result.allocations[insolvent] == 0.0)
    funded = result.allocations > 0
    assert np.all(result.allocations[funded] >= env.knee[funded] * (1 - 1e-6))


@pytest.mark.parametrize(
    "edge",
    [
        {"budget": 0.0},
        {"a": 0.0},
        {"tau": 0.0},
        {"tau": 1e9},
        {"beta": 1e-9},
        {"beta": 1e6},
        {"cap": 50.0},
        {"weight": 0.0},
    ],
)
def test_edges_are_well_defined(allocator: CvxpyAllocator, edge: dict[str, float]) -> None:
    n = 6
    args = {"a": 0.7, "tau": 200.0, "beta": 0.01, "cap": np.inf, "weight": 1.0, "budget": 2000.0}
    args.update(edge)
    rng = np.random.default_rng(0)
    problem = WindowProblem.create(
        [f"q{i}" for i in range(n)],
        np.full(n, args["a"]) * rng.uniform(0.8, 1.0, n),
        np.full(n, args["tau"]),
        np.full(n, args["beta"]) * rng.uniform(0.8, 1.2, n),
        args["budget"],
        weight=np.full(n, args["weight"]),
        cap=np.full(n, args["cap"]),
    )
    for method in ("closed_form", "cvxpy"):
        result = solve_window(problem, method=method, allocator=allocator)  # type: ignore[arg-type]
        assert np.all(np.isfinite(result.allocations))
        assert result.allocations.sum() <= problem.budget
        assert np.isfinite(result.shadow_price)
        assert result.shadow_price >= 0
        assert np.isfinite(result.objective)
