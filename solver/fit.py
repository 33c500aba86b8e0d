"""Probes and what they say, shared by the per-query fit (`solver.query_fit`).

A probe is k chains of at most p tokens (`ProbePlan`). Each outcome is finished (length ℓ ≤ p,
maybe an answer) or censored at p (`ProbeOutcome`). Finished probes that agree answer the
query without dispatch; disagreement among finished answers lowers its curve by the share of
the majority (`probe_answers`). A window's fit comes back in column form (`WindowFit`) for the
solver, and `affordable_probes` keeps the probes a budget can pay for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.answers import consensus

__all__ = [
    "CurveEstimate",
    "ProbeOutcome",
    "ProbePlan",
    "WindowFit",
    "affordable_probes",
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
    """Knobs of the per-query fit."""

    agree_votes: int = 2  # finished answers that must agree to answer without dispatch


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
