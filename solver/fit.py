"""From probe outcomes to the (A, τ, β) curves the allocator needs, one window at a time.

A probe is k chains of at most p tokens. Each outcome is finished (length ℓ ≤ p, maybe an answer)
or censored at p. The fitted curve is for the tokens *beyond* the probe: probe tokens are sunk,
and dispatch continues the best censored chain, so the curve is conditional on that chain having
run p tokens without finishing. With k = 0 the curve is the chain's from scratch.

Per query (vectorised over the window):
  * the tag prior conditional on survival to p (PriorBook, learned online) gives A, τ, β;
  * the query's own probes rescale β by the posterior mean of a rate multiplier m ~ Gamma(n₀, n₀)
    under L ~ τ₀ + Exp(m·β₀), normalised so that "all probes censored" leaves the prior unchanged
    (the tag prior already conditions on one censored chain; k = 1 carries no per-query signal);
  * a `difficulty_hint` h ∈ [0, 1] scales β by exp(−κ·(h − ½)) (harder ⇒ longer chains);
  * finished probes that agree give `answer_now` (the query needs no dispatch); disagreement
    among finished answers lowers A by the share of the majority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.allocate import solve_window
from clearbudget.solver.answers import consensus
from clearbudget.solver.priors import PriorBook
from clearbudget.solver.problem import WindowProblem

__all__ = [
    "CurveEstimate",
    "ProbeOutcome",
    "ProbePlan",
    "WindowFit",
    "affordable_probes",
    "fit_window",
    "select_probes",
]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """k samples of p tokens per query in one request (n = k); k = 0 means no probing."""

    samples: int
    tokens: int

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"samples: must be >= 0, got {self.samples!r}")
        if self.tokens < 0 or (self.samples > 0 and self.tokens == 0):
            raise ValueError(f"tokens: must be >= 1 when probing, got {self.tokens!r}")

    @property
    def enabled(self) -> bool:
        return self.samples > 0

    @property
    def max_cost(self) -> int:
        """Most tokens one query's probe can generate."""
        return self.samples * self.tokens if self.enabled else 0


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """One probe sample: finished naturally (with its length and answer) or censored at p."""

    finished: bool
    tokens: int
    answer: str | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            raise ValueError(f"tokens: must be >= 0, got {self.tokens!r}")


@dataclass(frozen=True, slots=True)
class CurveEstimate:
    """One query's fitted continuation curve and what the pipeline does with it.

    answer_now: set when the query can be answered without dispatch (agreeing finished probes, or
        every probe finished). continue_from: index of the censored probe to continue (−1: none,
        start fresh when k = 0). fallback_answer: majority answer of finished probes, to return
        if the dispatched continuation gives none. probe_tokens: tokens the probe generated.
    """

    a: float
    tau: float
    beta: float
    answer_now: str | None
    fallback_answer: str | None
    continue_from: int
    probe_tokens: int


@dataclass(frozen=True, slots=True)
class WindowFit:
    """Column form of a window's `CurveEstimate`s (feed a, tau, beta straight to the solver)."""

    a: FloatArray
    tau: FloatArray
    beta: FloatArray
    answer_now: tuple[str | None, ...]
    fallback_answer: tuple[str | None, ...]
    continue_from: NDArray[np.int64]
    probe_tokens: NDArray[np.int64]

    @property
    def size(self) -> int:
        return int(self.a.size)

    @property
    def needs_dispatch(self) -> NDArray[np.bool_]:
        """Queries with a chain left to run (not answered by their probes)."""
        return np.array([a is None for a in self.answer_now], dtype=bool) & (self.a > 0.0)

    def estimate(self, i: int) -> CurveEstimate:
        return CurveEstimate(
            a=float(self.a[i]),
            tau=float(self.tau[i]),
            beta=float(self.beta[i]),
            answer_now=self.answer_now[i],
            fallback_answer=self.fallback_answer[i],
            continue_from=int(self.continue_from[i]),
            probe_tokens=int(self.probe_tokens[i]),
        )


@dataclass(frozen=True, slots=True)
class FitSettings:
    """Knobs of the per-query update (defaults are the measured ones)."""

    query_strength: float = 2.0  # n₀ of the per-query rate multiplier
    hint_slope: float = 1.0  # κ: β multiplier exp(−κ(h − ½)) for a difficulty hint h
    agree_votes: int = 2  # finished answers that must agree to answer without dispatch


def fit_window(
    outcomes: Sequence[Sequence[ProbeOutcome]],
    tags: Sequence[Mapping[str, str]],
    hints: Sequence[float | None] | None,
    plan: ProbePlan,
    priors: PriorBook,
    settings: FitSettings | None = None,
) -> WindowFit:
    """Fit every query of a window (see the module docstring); vectorised over queries."""
    s = settings or FitSettings()
    n = len(outcomes)
    check_outcomes(outcomes, tags, hints, plan)
    finished, lengths = outcome_matrix(outcomes, plan)
    a, tau, beta = priors.priors(tags, survived=plan.tokens if plan.enabled else 0)
    if plan.enabled:
        _, tau0, beta0 = priors.priors(tags, survived=0)
        beta = beta * _rate_multiplier(finished, lengths, tau0, beta0, plan, s.query_strength)
    beta = beta * _hint_factor(hints, n, s.hint_slope)
    answer_now, fallback, agreement = probe_answers(outcomes, s.agree_votes)
    a = a * agreement
    censored = ~finished & (lengths >= 0)
    has_chain = censored.any(axis=1) if plan.enabled else np.ones(n, dtype=bool)
    continue_from = (
        np.where(has_chain, np.argmax(censored, axis=1), -1)
        if plan.enabled
        else (np.full(n, -1, dtype=np.int64))
    )
    # No censored chain left means every probe finished: answer with what they said.
    answer_now = tuple(
        ans if ans is not None or has_chain[i] else fallback[i] for i, ans in enumerate(answer_now)
    )
    a = np.where(has_chain, a, 0.0)
    return WindowFit(
        a=np.clip(a, 0.0, 1.0),
        tau=np.maximum(tau, 0.0),
        beta=beta,
        answer_now=answer_now,
        fallback_answer=fallback,
        continue_from=continue_from.astype(np.int64),
        probe_tokens=np.where(lengths >= 0, lengths, 0).sum(axis=1).astype(np.int64),
    )


def check_outcomes(
    outcomes: Sequence[Sequence[ProbeOutcome]],
    tags: Sequence[Mapping[str, str]],
    hints: Sequence[float | None] | None,
    plan: ProbePlan,
) -> None:
    n = len(outcomes)
    if len(tags) != n:
        raise ValueError(f"tags: expected {n} entries (one per query), got {len(tags)}")
    if hints is not None and len(hints) != n:
        raise ValueError(f"hints: expected {n} entries (one per query), got {len(hints)}")
    for i, h in enumerate(hints or ()):
        if h is not None and not 0.0 <= h <= 1.0:
            raise ValueError(f"hints[{i}]: must be in [0, 1], got {h!r}")
    for i, row in enumerate(outcomes):
        if len(row) != plan.samples:
            raise ValueError(
                f"outcomes[{i}]: expected {plan.samples} probe samples, got {len(row)}"
            )
        for j, o in enumerate(row):
            if o.tokens > plan.tokens or (not o.finished and o.tokens != plan.tokens):
                raise ValueError(
                    f"outcomes[{i}][{j}].tokens: {o.tokens} does not fit a probe of "
                    f"{plan.tokens} tokens (censored samples run exactly p)"
                )


def outcome_matrix(
    outcomes: Sequence[Sequence[ProbeOutcome]], plan: ProbePlan
) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """(finished, tokens) as (n, k) arrays."""
    n, k = len(outcomes), plan.samples
    finished = np.zeros((n, k), dtype=bool)
    lengths = np.zeros((n, k), dtype=np.int64)
    for i, row in enumerate(outcomes):
        for j, o in enumerate(row):
            finished[i, j] = o.finished
            lengths[i, j] = o.tokens
    return finished, lengths


def _rate_multiplier(
    finished: NDArray[np.bool_],
    lengths: NDArray[np.int64],
    tau0: FloatArray,
    beta0: FloatArray,
    plan: ProbePlan,
    n0: float,
) -> FloatArray:
    """Posterior mean of the query's rate multiplier, relative to all-probes-censored."""
    d = finished.sum(axis=1)
    exposure = np.maximum(np.minimum(lengths, plan.tokens) - tau0[:, None], 0.0).sum(axis=1)
    all_censored = plan.samples * np.maximum(plan.tokens - tau0, 0.0)
    return (n0 + d) / (n0 + beta0 * exposure) * (n0 + beta0 * all_censored) / n0


def _hint_factor(hints: Sequence[float | None] | None, n: int, slope: float) -> FloatArray:
    if hints is None:
        return np.ones(n)
    h = np.array([0.5 if x is None else x for x in hints], dtype=np.float64)
    return np.exp(-slope * (h - 0.5))


def probe_answers(
    outcomes: Sequence[Sequence[ProbeOutcome]], agree_votes: int
) -> tuple[tuple[str | None, ...], tuple[str | None, ...], FloatArray]:
    """Per query: answer_now (unanimous with enough votes), majority answer, A factor."""
    now: list[str | None] = []
    fallback: list[str | None] = []
    factor = np.ones(len(outcomes))
    for i, row in enumerate(outcomes):
        vote = consensus([o.answer for o in row if o.finished])
        fallback.append(vote.answer)
        now.append(vote.answer if vote.unanimous and vote.votes >= agree_votes else None)
        if vote.cast and not vote.unanimous:
            factor[i] = vote.votes / vote.cast
    return tuple(now), tuple(fallback), factor


def select_probes(
    tags: Sequence[Mapping[str, str]],
    hints: Sequence[float | None] | None,
    budget: float,
    priors: PriorBook,
    *,
    settings: FitSettings | None = None,
    max_tokens: float = 32768.0,
    probe_cost: float = 0.0,
) -> NDArray[np.bool_]:
    """Which queries are worth probing: those the allocator would fund on prior curves alone,
    and no more than the budget can pay a probe of `probe_cost` tokens for.

    Solving the window on the from-scratch curves (survived = 0) abandons the queries that cannot
    return the window's price per token; probing them would spend tokens on chains that are never
    continued. When the budget is ample every query is selected; when it cannot pay every funded
    query's probe, the best-funded ones keep theirs.
    """
    s = settings or FitSettings()
    n = len(tags)
    if n == 0 or budget <= 0:
        return np.zeros(n, dtype=bool)
    a, tau, beta = priors.priors(tags, survived=0)
    beta = beta * _hint_factor(hints, n, s.hint_slope)
    problem = WindowProblem.create(
        [str(i) for i in range(n)], a, tau, beta, budget, cap=np.full(n, max_tokens)
    )
    allocations = solve_window(problem, method="closed_form").allocations
    return affordable_probes(allocations, budget, probe_cost)


def affordable_probes(
    allocations: NDArray[np.float64], budget: float, probe_cost: float | NDArray[np.float64]
) -> NDArray[np.bool_]:
    """The funded queries (allocation > 0), no more than `budget` pays a probe each (`probe_cost`
    tokens, one for all or one per query); when it cannot pay them all, the best-funded keep
    theirs."""
    selected = allocations > 0.0
    cost = np.broadcast_to(np.asarray(probe_cost, np.float64), allocations.shape)
    if float(cost[selected].sum()) <= budget:
        return selected
    order = np.argsort(-allocations, kind="stable")
    spent = np.cumsum(np.where(selected[order], cost[order], 0.0))
    keep = order[spent <= budget]
    within = np.zeros(allocations.size, dtype=bool)
    within[keep] = selected[keep]
    return within
