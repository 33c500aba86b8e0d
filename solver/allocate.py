"""`solve_window`: one window's allocation, shadow price and abandonment (public entry point)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import numpy as np

from clearbudget.solver.closed_form import closed_form_prices
from clearbudget.solver.curves import (
    Curves,
    allocation_at,
    build_curves,
    group_sums,
    relaxed_value,
    weighted_value,
)
from clearbudget.solver.cvx import CvxpyAllocator, Relaxation, SolverFailure
from clearbudget.solver.problem import AllocationResult, FloatArray, WindowProblem
from clearbudget.solver.rounding import fill_chords, round_chords

Method = Literal["auto", "closed_form", "cvxpy"]
Rounding = Literal["chord", "swap"]
CLOSED_FORM = "closed_form"


def solve_window(
    problem: WindowProblem,
    *,
    method: Method = "auto",
    allocator: CvxpyAllocator | None = None,
    clock: Callable[[], float] = time.perf_counter,
    rounding: Rounding = "chord",
) -> AllocationResult:
    """Allocate one window's budget.

    method "auto" uses the closed form when the budget is the only coupling row and cvxpy when
    tag budgets add rows; "cvxpy" forces cvxpy (pass a long-lived `allocator` to reuse compiled
    problems). A cvxpy failure or inaccurate status falls back to the closed form, counted in
    `AllocationResult.fallbacks` with its `fallback_reason` (the caller logs it).

    rounding "chord" funds or abandons the relaxation's chord query, whichever is worth more on
    the true curves (the price still sorts funded from abandoned); "swap" also tries swaps among
    the queries nearest the price (closer to the integer optimum on small windows, but a query
    below the price may be funded and one above it abandoned). See `rounding.round_chords`.
    """
    start = clock()
    curves = build_curves(problem)
    tag_budgets = problem.tag_budget_array
    wants_cvxpy = method == "cvxpy" or (method == "auto" and tag_budgets.size > 0)
    # Nothing to price when every fundable query fits at its cap: λ = 0, no solver needed.
    wants_cvxpy = wants_cvxpy and not _fits_at_caps(curves, problem.budget, tag_budgets)
    relaxation, solver_name, failure = None, CLOSED_FORM, None
    if wants_cvxpy:
        allocator = allocator or CvxpyAllocator()
        try:
            relaxation = allocator.relax(curves, problem.budget, tag_budgets)
            solver_name = allocator.name
        except SolverFailure as exc:
            failure = str(exc)
    if relaxation is None:
        relaxation = relax_closed_form(curves, problem.budget, tag_budgets)
    final = round_relaxation(curves, relaxation, problem.budget, tag_budgets, rounding)
    return AllocationResult(
        ids=problem.ids,
        allocations=final,
        abandoned=final <= 0.0,
        shadow_price=relaxation.shadow_price,
        objective=weighted_value(problem, final),
        relaxed_objective=relaxed_value(problem, curves, relaxation.relaxed.allocations),
        tag_prices=dict(zip(problem.tag_names, map(float, relaxation.tag_prices), strict=True)),
        solver=solver_name,
        solve_ms=(clock() - start) * 1e3,
        budget=problem.budget,
        fallbacks=int(failure is not None),
        fallback_reason=failure,
    )


def _fits_at_caps(curves: Curves, budget: float, tag_budgets: FloatArray) -> bool:
    if float(np.sum(curves.cap)) > budget:
        return False
    return bool(np.all(group_sums(curves, curves.cap, tag_budgets.size) <= tag_budgets))


def relax_closed_form(curves: Curves, budget: float, tag_budgets: FloatArray) -> Relaxation:
    """The envelope optimum by bisection: rule at the upper price, ties filled at the margin."""
    prices = closed_form_prices(curves, budget, tag_budgets)
    high = prices.per_query(curves.tag_index, high=True)
    low = prices.per_query(curves.tag_index, high=False)
    base = allocation_at(curves, high)
    rate = curves.return_rate
    candidates = np.flatnonzero((rate >= low) & (rate < high) & (rate > 0.0))
    relaxed = fill_chords(curves, base, candidates, budget, tag_budgets)
    return Relaxation(relaxed, prices.shadow_high, prices.tag_premiums())


def round_relaxation(
    curves: Curves,
    relaxation: Relaxation,
    budget: float,
    tag_budgets: FloatArray,
    rounding: Rounding = "chord",
) -> FloatArray:
    """Fund or abandon each chord query (the better on the true curves); guard budgets."""
    swaps = rounding == "swap"
    return round_chords(curves, relaxation.relaxed, budget, tag_budgets, swaps=swaps)
