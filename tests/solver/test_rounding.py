"""Rounding on the true curves: the chord query funded or abandoned, whichever is worth more.

The alternatives are computed here independently of the solver (tests/solver/brute_force.py):
(a) the chord query funded on its true curve, (b) abandoned with its tokens topped up over the
funded queries, and the old rule (abandoned, its tokens re-priced on the envelope or left over).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearbudget.solver import WindowProblem, solve_window
from clearbudget.solver.allocate import relax_closed_form
from clearbudget.solver.closed_form import closed_form_prices
from clearbudget.solver.curves import Curves, allocation_at, build_curves, weighted_value
from clearbudget.solver.rounding import (
    drop_chord_queries,
    enforce_budgets,
    fill_funded,
    true_value,
)
from tests.solver.brute_force import exact_optimum, random_small_window, real_value, water_fill
from tests.solver.test_allocate import grid_optimum
from tests.solver.test_properties import assert_within_budgets, windows

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)
NO_TAGS = np.zeros(0)


def relaxed_of(problem: WindowProblem):
    curves = build_curves(problem)
    return curves, relax_closed_form(curves, problem.budget, problem.tag_budget_array).relaxed


def old_rules(problem: WindowProblem) -> tuple[float, float]:
    """The rule this replaces: abandon the chord query and leave its tokens (first value), or
    re-price them over the funded queries on the envelope (second: what solve_window did)."""
    curves, relaxed = relaxed_of(problem)
    tag_budgets = problem.tag_budget_array
    left = enforce_budgets(curves, drop_chord_queries(relaxed), problem.budget, tag_budgets)
    top_up = left
    if relaxed.inside_chord.any():
        funded = curves.subset(left > 0.0)
        again = drop_chord_queries(relax_closed_form(funded, problem.budget, tag_budgets).relaxed)
        top_up = enforce_budgets(curves, again, problem.budget, tag_budgets)
    return weighted_value(problem, left), weighted_value(problem, top_up)


def test_chord_query_is_partly_funded_when_what_is_left_lifts_it_past_its_threshold() -> None:
    # "fast" saturates within ~100 tokens; the relaxation leaves "slow" inside its chord with
    # ~380 tokens, 80 past its threshold: worth far more there than topping "fast" up.
    problem = WindowProblem.create(["fast", "slow"], [0.9, 0.9], [0.0, 300.0], [0.05, 0.01], 450.0)
    curves, relaxed = relaxed_of(problem)
    assert relaxed.inside_chord.tolist() == [False, True]
    assert relaxed.allocations[1] > problem.tau[1] + 50.0

    result = solve_window(problem)

    assert problem.tau[1] < result.allocations[1] < curves.knee[1]  # partly funded, past τ
    assert not result.abandoned.any()
    assert result.allocations.sum() <= problem.budget
    as_relaxed = real_value(problem, relaxed.allocations)  # (a) as the relaxation left it
    top_up, _ = water_fill(problem, (0,))  # (b) "slow" abandoned, "fast" takes everything
    abandon_only, old_top_up = old_rules(problem)
    assert result.objective >= max(as_relaxed, top_up, abandon_only, old_top_up)
    assert result.objective > top_up + 0.4  # 1.395 against 0.9: not a rounding artefact
    assert result.objective == pytest.approx(exact_optimum(problem)[0], rel=1e-9)


def test_chord_query_is_abandoned_and_topped_up_when_that_is_worth_more() -> None:
    # The relaxation leaves q0 12 tokens past its threshold, where its slow surge buys little;
    # q1's tail returns more for the same tokens.
    problem = WindowProblem.create(
        ["q0", "q1"], [0.51, 0.83], [100.0, 220.0], [0.002, 0.003], 820.0
    )
    _, relaxed = relaxed_of(problem)
    assert relaxed.inside_chord.tolist() == [True, False]
    assert relaxed.allocations[0] > problem.tau[0]

    result = solve_window(problem)

    assert result.abandoned.tolist() == [True, False]
    assert result.allocations[1] == pytest.approx(problem.budget, rel=1e-12)
    assert result.allocations.sum() <= problem.budget
    as_relaxed = real_value(problem, relaxed.allocations)
    partial, _ = water_fill(problem, (0, 1))  # (a) at its best: both past τ, re-balanced
    assert result.objective >= max(as_relaxed, partial)
    assert result.objective > partial + 0.01
    assert result.objective == pytest.approx(exact_optimum(problem)[0], rel=1e-9)


@PROPERTY
@given(windows(tags=True))
def test_rounding_never_loses_to_abandoning_the_chord_query(problem: WindowProblem) -> None:
    chord = solve_window(problem, method="closed_form")
    swap = solve_window(problem, method="closed_form", rounding="swap")
    assert_within_budgets(problem, chord.allocations)
    assert_within_budgets(problem, swap.allocations)
    for result in (chord, swap):
        tokens = result.token_allocations()
        assert tokens.sum() <= problem.budget
        for k, name in enumerate(problem.tag_names):
            assert tokens[problem.tag_index == k].sum() <= problem.tag_budgets[name]
    abandon_only, old_top_up = old_rules(problem)
    slack = 1e-9 * max(1.0, abandon_only, old_top_up)
    assert chord.objective >= max(abandon_only, old_top_up) - slack
    assert swap.objective >= chord.objective - slack  # the swaps start from the chord rounding
    curves, relaxed = relaxed_of(problem)
    if relaxed.inside_chord.sum() == 1:
        # Udell & Boyd, per query: the chord query loses at most its envelope's gap at τ.
        (c,) = np.flatnonzero(relaxed.inside_chord)
        gap = curves.return_rate[c] * problem.tau[c]
        assert chord.objective >= chord.relaxed_objective - gap - slack


def restricted_optimum(problem: WindowProblem, price: float) -> float:
    """The best plan that funds every query above the price and none below (ties free)."""
    rate = build_curves(problem).return_rate
    solvent = np.flatnonzero(rate > price * (1 + 1e-9))
    tied = np.flatnonzero((rate > 0) & (np.abs(rate - price) <= price * 1e-9))
    best = 0.0
    for k in range(tied.size + 1):
        for extra in itertools.combinations(tied.tolist(), k):
            best = max(best, water_fill(problem, tuple(solvent.tolist()) + extra)[0])
    return best


@pytest.mark.parametrize("seed", range(40))
def test_small_windows_against_brute_force(seed: int) -> None:
    problem = random_small_window(np.random.default_rng(1000 + seed))
    optimum, _ = exact_optimum(problem)
    chord = solve_window(problem, method="closed_form")
    swap = solve_window(problem, method="closed_form", rounding="swap")
    slack = 1e-9 * max(1.0, optimum)
    # The brute force itself: above every plan on a token grid, below the relaxation's bound.
    if seed < 10:
        assert optimum >= grid_optimum(problem, problem.budget / 150) - slack
    assert optimum <= chord.relaxed_objective + slack
    # Chord rounding: optimal among the plans that keep the price's verdicts.
    assert chord.objective >= restricted_optimum(problem, chord.shadow_price) - slack
    # Swaps at the margin: the optimum itself on these windows.
    assert swap.objective >= optimum - slack
    assert_within_budgets(problem, chord.allocations)
    assert_within_budgets(problem, swap.allocations)


def reference_fill(
    curves: Curves, members: np.ndarray, budget: float, tag_budgets: np.ndarray
) -> np.ndarray | None:
    """Water-fill by the closed form's bisection over the tails (τ paid up front); a member
    left at τ (worth nothing) is dropped and the rest filled again."""
    members = members & (curves.return_rate > 0) & (curves.cap > curves.tau)
    while True:
        plan = _bisection_fill(curves, members, budget, tag_budgets)
        if plan is None or not np.any(members & (plan <= curves.tau)):
            return plan
        members = members & (plan > curves.tau)


def _bisection_fill(
    curves: Curves, members: np.ndarray, budget: float, tag_budgets: np.ndarray
) -> np.ndarray | None:
    threshold = np.where(members, curves.tau, 0.0)
    tagged = curves.tag_index >= 0
    tag_spent = np.bincount(
        curves.tag_index[tagged], weights=threshold[tagged], minlength=tag_budgets.size
    )
    left, tag_left = budget - threshold.sum(), tag_budgets - tag_spent
    if left < 0 or np.any(tag_left < 0):
        return None
    peak = np.where(members, np.exp(curves.log_peak), 0.0)
    zero = np.zeros(curves.size)
    tails = Curves(
        return_rate=peak, knee=zero, cap=np.where(members, curves.cap - curves.tau, 0.0),
        tau=zero, beta=curves.beta, log_peak=curves.log_peak, tail_scale=zero,
        tag_index=curves.tag_index,
    )  # fmt: skip
    prices = closed_form_prices(tails, left, tag_left)
    z = allocation_at(tails, prices.per_query(curves.tag_index, high=True))
    return np.where(members, curves.tau + z, 0.0)


@PROPERTY
@given(windows(tags=True), st.data())
def test_fill_funded_matches_the_bisection(problem: WindowProblem, data: st.DataObject) -> None:
    curves = build_curves(problem)
    pick = data.draw(st.lists(st.booleans(), min_size=problem.size, max_size=problem.size))
    members = np.array(pick, dtype=bool)
    tag_budgets = problem.tag_budget_array
    plan = fill_funded(curves, members, problem.budget, tag_budgets)
    reference = reference_fill(curves, members, problem.budget, tag_budgets)
    assert (plan is None) == (reference is None)
    if plan is None or reference is None:
        return
    assert np.all(plan[~members] == 0.0)
    assert np.all((plan == 0.0) | (plan > problem.tau))  # funded means past τ
    assert plan.sum() <= problem.budget * (1 + 1e-12)
    for k, name in enumerate(problem.tag_names):
        assert plan[problem.tag_index == k].sum() <= problem.tag_budgets[name] * (1 + 1e-12)
    # Exact, so never worse than the bisection (which stops within 1e-12 of the price).
    worth, ref_worth = true_value(curves, plan), true_value(curves, reference)
    assert worth >= ref_worth - 1e-9 * max(1.0, ref_worth)
    assert worth == pytest.approx(ref_worth, rel=1e-6, abs=1e-12)


def test_fill_funded_refuses_thresholds_that_do_not_fit() -> None:
    problem = WindowProblem.create(["a", "b"], [0.9, 0.9], [300.0, 300.0], [0.01, 0.01], 500.0)
    curves = build_curves(problem)
    assert fill_funded(curves, np.array([True, True]), 500.0, NO_TAGS) is None
    one = fill_funded(curves, np.array([True, False]), 500.0, NO_TAGS)
    assert one is not None
    assert one.tolist() == [500.0, 0.0]
