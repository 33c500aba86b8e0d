"""Property tests (hypothesis): budgets hold, monotonicity, one chord query, paths agree."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clearbudget.solver import CvxpyAllocator, WindowProblem, solve_window
from clearbudget.solver.allocate import relax_closed_form
from clearbudget.solver.curves import build_curves
from clearbudget.solver.rounding import KNEE_RTOL

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
CONIC = settings(
    max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)  # fmt: skip


@st.composite
def windows(
    draw: st.DrawFn, max_queries: int = 8, tags: bool = False, max_budget: float = 12000.0
) -> WindowProblem:
    n = draw(st.integers(1, max_queries))
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_subnormal=False)  # noqa: E731
    a = draw(st.lists(floats(0.0, 1.0), min_size=n, max_size=n))
    tau = draw(st.lists(floats(0.0, 2000.0), min_size=n, max_size=n))
    log_beta = draw(st.lists(floats(-4.0, -0.5), min_size=n, max_size=n))
    weight = draw(st.lists(floats(0.0, 3.0), min_size=n, max_size=n))
    cap = draw(st.lists(st.one_of(st.just(np.inf), floats(0.0, 6000.0)), min_size=n, max_size=n))
    budget = draw(floats(0.0, max_budget))
    kw: dict[str, object] = {}
    if tags:
        kw["tags"] = draw(st.lists(st.sampled_from(["x", "y", None]), min_size=n, max_size=n))
        kw["tag_budgets"] = {"x": draw(floats(0.0, 6000.0)), "y": draw(floats(0.0, 6000.0))}
    return WindowProblem.create(
        [f"q{i}" for i in range(n)], a, tau, 10.0 ** np.array(log_beta), budget,
        weight=weight, cap=cap, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def allocator() -> CvxpyAllocator:
    return CvxpyAllocator()


def assert_within_budgets(problem: WindowProblem, b: np.ndarray) -> None:
    assert np.all(b >= 0.0)
    assert b.sum() <= problem.budget
    assert np.all(b <= problem.cap)
    for k, name in enumerate(problem.tag_names):
        assert b[problem.tag_index == k].sum() <= problem.tag_budgets[name]


@FAST
@given(windows(tags=True))
def test_budget_is_never_exceeded(problem: WindowProblem) -> None:
    for method in ("closed_form",):
        result = solve_window(problem, method=method)
        assert_within_budgets(problem, result.allocations)
        tokens = result.token_allocations()
        assert tokens.sum() <= problem.budget


@FAST
@given(windows(), st.floats(1.0, 5000.0))
def test_more_budget_never_lowers_the_objective(problem: WindowProblem, extra: float) -> None:
    before = solve_window(problem).objective
    after = solve_window(problem.with_budget(problem.budget + extra)).objective
    assert after >= before - 1e-9 * max(1.0, before)


@FAST
@given(windows(), st.data())
def test_raising_a_weight_never_lowers_that_allocation(
    problem: WindowProblem, data: st.DataObject
) -> None:
    i = data.draw(st.integers(0, problem.size - 1))
    factor = data.draw(st.floats(1.0, 4.0))
    before = solve_window(problem).allocations[i]
    after = solve_window(problem.with_weight(i, problem.weight[i] * factor + 1e-3)).allocations[i]
    assert after >= before - 1e-6 * (1.0 + before)


@FAST
@given(windows(max_queries=10))
def test_at_most_one_query_sits_inside_its_chord(problem: WindowProblem) -> None:
    curves = build_curves(problem)
    relaxed = relax_closed_form(curves, problem.budget, problem.tag_budget_array).relaxed
    inside = (relaxed.allocations > 0) & (relaxed.allocations < curves.knee * (1 - KNEE_RTOL))
    assert inside.sum() <= 1
    final = solve_window(problem).allocations
    # Rounded on the true curves: a query may end below its knee, but never funded at or below
    # its threshold, where its tokens would buy nothing.
    assert not np.any((final > 0) & (final <= problem.tau))


@CONIC
@given(windows(tags=False, max_budget=4000.0))
def test_cvxpy_and_closed_form_agree(allocator: CvxpyAllocator, problem: WindowProblem) -> None:
    assume(problem.budget >= 1.0)  # below one token nothing is funded in whole tokens
    closed = solve_window(problem, method="closed_form")
    conic = solve_window(problem, method="cvxpy", allocator=allocator)
    assume(conic.solver.startswith("cvxpy"))  # not slack: a price had to be found
    scale = float(np.max(build_curves(problem).return_rate, initial=0.0))
    # An interior-point dual is accurate relative to the window's scale: a λ below a millionth
    # of the best return rate (tokens all but free) is compared absolutely, and so is any λ of a
    # window worth next to nothing (a return rate of 1e-177 per token is no price to match).
    tolerance = max(1e-6 * scale, 1e-15)
    assert conic.shadow_price == pytest.approx(closed.shadow_price, rel=1e-3, abs=tolerance)
    assert conic.relaxed_objective == pytest.approx(closed.relaxed_objective, rel=1e-4, abs=1e-9)
    assert conic.objective == pytest.approx(closed.objective, rel=1e-4, abs=1e-9)
    assert_within_budgets(problem, conic.allocations)


@CONIC
@given(windows(tags=True, max_budget=4000.0))
def test_cvxpy_and_closed_form_agree_with_tag_budgets(
    allocator: CvxpyAllocator, problem: WindowProblem
) -> None:
    assume(problem.budget >= 1.0)  # below one token nothing is funded in whole tokens
    closed = solve_window(problem, method="closed_form")
    conic = solve_window(problem, method="cvxpy", allocator=allocator)
    assume(conic.solver.startswith("cvxpy"))
    assert conic.relaxed_objective == pytest.approx(closed.relaxed_objective, rel=1e-4, abs=1e-9)
    assert_within_budgets(problem, conic.allocations)
