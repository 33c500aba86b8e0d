"""One window's curves from the per-query difficulty model: which queries to probe, and the
(A, τ, β) of every probed query's continuation.

`select_queries` solves the window on from-scratch curves (nothing spent yet) and probes only
the queries that solve would fund. `fit_queries` conditions each query's curve on its probe:
the continued chain ran p tokens without finishing (its curve is the model's curve given
survival to p); other probe samples of the same query join its own chains. The predicted curve
is then turned into the shifted surge the allocator takes, so `solver.allocate` is unchanged:
`allocate_curves` finds the price at which the curves' own demands fit the budget
(`curve_price`), fits every curve where that price acts (`fit_at_price`; `curve_problem` is
that window problem, the curves the allocation is made on) and solves. Answer
logic (early answers, which chain to continue, the fallback answer) is that of `solver.fit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.allocate import Method, solve_window
from clearbudget.solver.cvx import CvxpyAllocator
from clearbudget.solver.difficulty import DifficultyModel, OwnChain, QueryInfo
from clearbudget.solver.fit import (
    FitSettings,
    ProbeOutcome,
    ProbePlan,
    WindowFit,
    affordable_probes,
    check_outcomes,
    outcome_matrix,
    probe_answers,
)
from clearbudget.solver.problem import AllocationResult, WindowProblem, tag_rows
from clearbudget.solver.surge_fit import curve_price, fit_at_price, fit_surge

__all__ = [
    "CurveWindow",
    "allocate_curves",
    "continuation_chance",
    "curve_problem",
    "fit_queries",
    "plan_probes",
    "probe_lengths",
    "select_queries",
]

FloatArray = NDArray[np.float64]
# Probe lengths per query (`probe_lengths`) are multiples of this, so a window holds few distinct
# lengths (each is fitted apart); a short probe must see this share of the plan's chance.
PROBE_STEP = 32
PROBE_SETTLE = 0.9
# Where budgets are ample the curves are fitted at this price instead of 0, so the fitted
# tails reach as far as the curves keep rising (value per token well below any real price).
PRICE_FLOOR = 1e-8


@dataclass(frozen=True, slots=True)
class CurveWindow:
    """A probed window's fit: the answer logic and envelope fits (`fit`), and the predicted
    curves (U at `budgets`, one row per query) the allocation refits near its price."""

    fit: WindowFit
    budgets: FloatArray
    utility: FloatArray


def allocate_curves(
    ids: Sequence[str],
    budgets: FloatArray,
    utility: FloatArray,
    budget: float,
    *,
    weight: Sequence[float] | FloatArray | None = None,
    cap: Sequence[float] | FloatArray | None = None,
    method: Method = "auto",
    envelope: tuple[FloatArray, FloatArray, FloatArray] | None = None,
    tags: Sequence[str | None] | None = None,
    tag_budgets: Mapping[str, float] | None = None,
    allocator: CvxpyAllocator | None = None,
) -> AllocationResult:
    """Allocate a window of predicted curves: find the price at which the curves' own demands
    fit the budget, fit every curve's shifted surge where that price acts, and solve
    (`envelope`: the curves' envelope fits, when already made).

    `tags` and `tag_budgets` add the window problem's tag rows (Σ over a tag ≤ its budget); a
    query's curve is then fitted at its own price, max(λ, its tag's price). `allocator`: a
    long-lived `CvxpyAllocator` whose compiled problems are reused (tagged windows use cvxpy)."""
    problem = curve_problem(
        ids, budgets, utility, budget, weight=weight, cap=cap, envelope=envelope, tags=tags,
        tag_budgets=tag_budgets,
    )  # fmt: skip
    return solve_window(problem, method=method, allocator=allocator)


def curve_problem(
    ids: Sequence[str],
    budgets: FloatArray,
    utility: FloatArray,
    budget: float,
    *,
    weight: Sequence[float] | FloatArray | None = None,
    cap: Sequence[float] | FloatArray | None = None,
    envelope: tuple[FloatArray, FloatArray, FloatArray] | None = None,
    tags: Sequence[str | None] | None = None,
    tag_budgets: Mapping[str, float] | None = None,
) -> WindowProblem:
    """The window problem `allocate_curves` solves: each predicted curve's shifted surge
    (A, τ, β) fitted where the window's price acts (the curves the allocation is made on)."""
    n = len(ids)
    v = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
    caps = np.full(n, np.inf) if cap is None else np.asarray(cap, dtype=np.float64)
    price = _fit_prices(budgets, utility, budget, v, caps, tags, tag_budgets or {})
    with np.errstate(divide="ignore"):
        per_query = np.where(v > 0, price / v, np.inf)
    a, tau, beta = fit_at_price(budgets, utility, per_query, caps, envelope=envelope)
    return WindowProblem.create(
        ids, a, tau, beta, budget, weight=v, cap=caps, tags=tags, tag_budgets=tag_budgets
    )


def _fit_prices(
    budgets: FloatArray,
    utility: FloatArray,
    budget: float,
    v: FloatArray,
    caps: FloatArray,
    tags: Sequence[str | None] | None,
    tag_budgets: Mapping[str, float],
) -> FloatArray:
    """Per query, the price its curve is fitted at: the window's curve price, or with tag rows
    max(λ, the tag's own price), λ being the price with each tag spending at most its budget."""
    names, index = tag_rows(tags or (None,) * len(v), tag_budgets)
    if not names:
        return np.full(len(v), max(curve_price(budgets, utility, budget, v, caps), PRICE_FLOOR))
    limits = np.array([tag_budgets[name] for name in names], dtype=np.float64)
    shadow = curve_price(budgets, utility, budget, v, caps, groups=index, group_budgets=limits)
    own = [
        curve_price(budgets, utility[rows], float(limits[k]), v[rows], caps[rows])
        for k, rows in ((k, index == k) for k in range(len(names)))
    ]
    return np.maximum(np.maximum(shadow, np.append(own, 0.0)[index]), PRICE_FLOOR)


def select_queries(
    queries: Sequence[QueryInfo],
    budget: float,
    model: DifficultyModel,
    *,
    max_tokens: float | Sequence[float] = 32768.0,
    probe_cost: float = 0.0,
    tags: Sequence[str | None] | None = None,
    tag_budgets: Mapping[str, float] | None = None,
) -> NDArray[np.bool_]:
    """Queries worth a probe: those the window funds on from-scratch curves (within the tag
    rows, if any: the closed form honours them), and no more than the budget can pay a probe
    of `probe_cost` tokens for (best funded first). `max_tokens`: each query's cap, or one
    for all."""
    n = len(queries)
    if n == 0 or budget <= 0:
        return np.zeros(n, dtype=bool)
    curves = model.curves(queries, survived=0)
    return _fundable(curves.budgets, curves.utility, budget, max_tokens, probe_cost, tags,
                     tag_budgets)  # fmt: skip


def plan_probes(
    queries: Sequence[QueryInfo],
    budget: float,
    model: DifficultyModel,
    plan: ProbePlan,
    *,
    max_tokens: float | Sequence[float] = 32768.0,
    tags: Sequence[str | None] | None = None,
    tag_budgets: Mapping[str, float] | None = None,
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """`select_queries` with a probe length per query (`probe_lengths`), each query's probe
    costing its own k × p; one pass over the from-scratch curves for both."""
    n = len(queries)
    lengths = np.full(n, plan.tokens, np.int64)
    if n == 0 or budget <= 0:
        return np.zeros(n, dtype=bool), lengths
    curves = model.curves(queries, survived=0)
    lengths = probe_lengths(curves.budgets, curves.utility, plan)
    cost = plan.samples * lengths.astype(np.float64)
    selected = _fundable(curves.budgets, curves.utility, budget, max_tokens, cost, tags,
                         tag_budgets)  # fmt: skip
    return selected, lengths


def probe_lengths(budgets: FloatArray, utility: FloatArray, plan: ProbePlan) -> NDArray[np.int64]:
    """Per query (a row of from-scratch U at `budgets`), its probe's length: the plan's, unless
    the query is predicted to finish within it (at least half of its chance to finish at all
    falls inside the plan's probe); then the shortest multiple of `PROBE_STEP` by which it has
    `PROBE_SETTLE` of the chance the plan's probe would give it."""
    n = utility.shape[0]
    full = np.full(n, plan.tokens, np.int64)
    if not plan.enabled or n == 0 or plan.tokens <= PROBE_STEP:
        return full
    steps = np.append(np.arange(PROBE_STEP, plan.tokens, PROBE_STEP), plan.tokens)
    # U at each step, every row at once (the rows share `budgets`).
    hi = np.clip(np.searchsorted(budgets, steps, side="right"), 1, budgets.size - 1)
    lo = hi - 1
    frac = np.clip((steps - budgets[lo]) / (budgets[hi] - budgets[lo]), 0.0, 1.0)
    at = utility[:, lo] + frac * (utility[:, hi] - utility[:, lo])
    within, ever = at[:, -1], utility[:, -1]
    early = (within > 0) & (within >= 0.5 * ever)
    first = np.argmax(at >= PROBE_SETTLE * within[:, None], axis=1)
    return np.where(early, steps[first], full).astype(np.int64)


def _fundable(
    budgets: FloatArray,
    utility: FloatArray,
    budget: float,
    max_tokens: float | Sequence[float],
    probe_cost: float | FloatArray,
    tags: Sequence[str | None] | None,
    tag_budgets: Mapping[str, float] | None,
) -> NDArray[np.bool_]:
    """The queries the window funds on these curves, as many as the budget pays probes for."""
    n = utility.shape[0]
    result = allocate_curves([str(i) for i in range(n)], budgets, utility, budget,
                             cap=np.broadcast_to(np.asarray(max_tokens, np.float64), (n,)),
                             method="closed_form", tags=tags, tag_budgets=tag_budgets)  # fmt: skip
    return affordable_probes(result.allocations, budget, probe_cost)


def fit_queries(
    outcomes: Sequence[Sequence[ProbeOutcome]],
    queries: Sequence[QueryInfo],
    plan: ProbePlan,
    model: DifficultyModel,
    settings: FitSettings | None = None,
    *,
    probe_tokens: Sequence[int] | None = None,
) -> CurveWindow:
    """Continuation curves of a probed window (see the module docstring). `probe_tokens`: each
    query's probe length when they differ (`plan_probes`); queries are fitted per length."""
    given = probe_tokens is not None and len(probe_tokens) > 0
    lengths = np.unique(np.asarray(probe_tokens, np.int64)) if given else None
    if lengths is None or lengths.size <= 1:
        tokens = int(lengths[0]) if lengths is not None and lengths.size else plan.tokens
        return _fit_queries(outcomes, queries, ProbePlan(plan.samples, tokens), model, settings)
    own = np.asarray(probe_tokens, np.int64)
    parts = []
    for p in lengths:
        index = np.flatnonzero(own == p)
        part = _fit_queries([outcomes[i] for i in index], [queries[i] for i in index],
                            ProbePlan(plan.samples, int(p)), model, settings)  # fmt: skip
        parts.append((index, part))
    return _stitch(parts, len(outcomes))


def _stitch(parts: Sequence[tuple[NDArray[np.int64], CurveWindow]], n: int) -> CurveWindow:
    """One window's fit from the fits of its parts (each part's queries at `index`)."""
    budgets = parts[0][1].budgets
    a, tau, beta = np.zeros(n), np.zeros(n), np.zeros(n)
    continue_from, probe = np.zeros(n, np.int64), np.zeros(n, np.int64)
    utility = np.zeros((n, budgets.size))
    now: list[str | None] = [None] * n
    fallback: list[str | None] = [None] * n
    for index, part in parts:
        fit = part.fit
        a[index], tau[index], beta[index] = fit.a, fit.tau, fit.beta
        continue_from[index], probe[index] = fit.continue_from, fit.probe_tokens
        utility[index] = part.utility
        for k, i in enumerate(index):
            now[i], fallback[i] = fit.answer_now[k], fit.fallback_answer[k]
    fit = WindowFit(a=a, tau=tau, beta=beta, answer_now=tuple(now),
                    fallback_answer=tuple(fallback), continue_from=continue_from,
                    probe_tokens=probe)  # fmt: skip
    return CurveWindow(fit, budgets, utility)


def _fit_queries(
    outcomes: Sequence[Sequence[ProbeOutcome]],
    queries: Sequence[QueryInfo],
    plan: ProbePlan,
    model: DifficultyModel,
    settings: FitSettings | None = None,
) -> CurveWindow:
    s = settings or FitSettings()
    n = len(outcomes)
    check_outcomes(outcomes, [q.tags for q in queries], [q.hint for q in queries], plan)
    finished, lengths = outcome_matrix(outcomes, plan)
    censored = ~finished
    has_chain = censored.any(axis=1) if plan.enabled else np.ones(n, dtype=bool)
    continued = np.where(has_chain, np.argmax(censored, axis=1), -1) if plan.enabled else None
    budgets, utility, answer_now, fallback = _continuation_curves(
        model, queries, outcomes, continued, plan.tokens if plan.enabled else 0, s.agree_votes
    )
    utility = utility * has_chain[:, None]  # a query with no chain left has no curve
    a, tau, beta = fit_surge(budgets, utility)
    # No censored chain left means every probe finished: answer with what they said.
    answer_now = tuple(
        ans if ans is not None or has_chain[i] else fallback[i] for i, ans in enumerate(answer_now)
    )
    fit = WindowFit(
        a=a,
        tau=tau,
        beta=beta,
        answer_now=answer_now,
        fallback_answer=fallback,
        continue_from=(continued if continued is not None else np.full(n, -1)).astype(np.int64),
        probe_tokens=lengths.sum(axis=1).astype(np.int64),
    )
    return CurveWindow(fit, budgets, utility)


def continuation_chance(
    model: DifficultyModel,
    query: QueryInfo,
    outcomes: Sequence[ProbeOutcome],
    continued: int,
    chain_tokens: int,
    extras: Sequence[int],
    settings: FitSettings | None = None,
) -> FloatArray:
    """Per entry of `extras`, the chance that the query's chain (extending probe sample
    `continued`; −1: a fresh chain), `chain_tokens` long and not finished, ends within that
    many more tokens with an answer: its curve as `fit_queries` draws it (the other probe
    samples as its siblings, scaled by how their finished answers agree), given it survived
    that far."""
    s = settings or FitSettings()
    budgets, utility, _, _ = _continuation_curves(
        model, [query], [outcomes], np.array([continued], np.int64), chain_tokens, s.agree_votes
    )
    return np.interp(np.asarray(extras, np.float64), budgets, utility[0])


def _continuation_curves(
    model: DifficultyModel,
    queries: Sequence[QueryInfo],
    outcomes: Sequence[Sequence[ProbeOutcome]],
    continued: NDArray[np.int64] | None,
    survived: int,
    agree_votes: int,
) -> tuple[FloatArray, FloatArray, tuple[str | None, ...], tuple[str | None, ...]]:
    """The grid and each query's U(b) from `survived` tokens on: the model's curve with its
    other probe samples as siblings, lowered where finished probes disagree; and the probes'
    early and fallback answers (`probe_answers`). One place, so that `fit_queries` and
    `continuation_chance` value a chain alike."""
    curves = model.curves(queries, survived, _siblings(outcomes, continued))
    answer_now, fallback, agreement = probe_answers(outcomes, agree_votes)
    return curves.budgets, curves.utility * agreement[:, None], answer_now, fallback


def _siblings(
    outcomes: Sequence[Sequence[ProbeOutcome]], continued: NDArray[np.int64] | None
) -> list[list[OwnChain]]:
    """Each query's probe samples other than the one its continuation extends."""
    out: list[list[OwnChain]] = []
    for i, row in enumerate(outcomes):
        skip = -1 if continued is None else int(continued[i])
        out.append([
            OwnChain(o.tokens, o.finished, o.finished and o.answer is not None)
            for j, o in enumerate(row) if j != skip
        ])  # fmt: skip
    return out
