"""Per-query envelope quantities both allocation paths share, and the allocation rule at a price."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.problem import NO_TAG, FloatArray, WindowProblem
from clearbudget.solver.utility import envelope, value

TAIL_HORIZON = 40.0
_NEGLIGIBLE_RATE = 1e-200


@dataclass(frozen=True, slots=True)
class Curves:
    """Weighted envelope geometry of a window (chords drawn to caps and budgets).

    return_rate: v·s, the best value per token (insolvent at price λ iff return_rate < λ).
    knee: end of the chord (w, or the cap when it is below w).
    cap: min(query cap, knee + TAIL_HORIZON/β); the knee itself where a limit cuts the chord.
    tail_scale: v·A·exp(−β(knee − τ)), the value still to gain past the knee.
    """

    return_rate: FloatArray
    knee: FloatArray
    cap: FloatArray
    tau: FloatArray
    beta: FloatArray
    log_peak: FloatArray  # ln(v·A·β): the tail rule is b = τ + (log_peak − ln λ)/β
    tail_scale: FloatArray
    tag_index: NDArray[np.int64]

    @property
    def size(self) -> int:
        return int(self.knee.size)

    def subset(self, keep: NDArray[np.bool_]) -> Curves:
        """The same curves with every query outside `keep` capped at zero (never funded)."""
        zero = np.where(keep, 1.0, 0.0)
        return Curves(
            return_rate=self.return_rate * zero,
            knee=self.knee * zero,
            cap=self.cap * zero,
            tau=self.tau,
            beta=self.beta,
            log_peak=self.log_peak,
            tail_scale=self.tail_scale * zero,
            tag_index=self.tag_index,
        )


def build_curves(problem: WindowProblem) -> Curves:
    # The chord is drawn to the tightest limit (own cap, window or tag budget): a query that
    # cannot reach w with the whole budget returns at best U(limit)/limit per token.
    limit = np.minimum(problem.cap, problem.budget)
    if problem.tag_names:
        tag_caps = np.append(problem.tag_budget_array, np.inf)  # NO_TAG (−1) reads the last slot
        limit = np.minimum(limit, tag_caps[problem.tag_index])
    env = envelope(problem.a, problem.tau, problem.beta, limit)
    # Past knee + TAIL_HORIZON/β the tail has gained all but e^-40 of its value: tokens spent
    # there buy nothing a float can see, so no query is funded beyond it. Budgets are left to
    # their own rows (a cap equal to the budget would make the budget's dual non-unique).
    has_tail = env.tail_scale > 0.0
    cap = np.where(
        has_tail, np.minimum(problem.cap, env.knee + TAIL_HORIZON / problem.beta), env.knee
    )
    weighted_rate = problem.weight * env.slope
    # A query that can return nothing (v·A = 0, or capped at or below τ) is never funded; nor
    # is one whose value per token is denormal-small, which no solver can scale.
    worthless = ~(weighted_rate > _NEGLIGIBLE_RATE)
    with np.errstate(divide="ignore"):
        log_peak = np.log(problem.weight * problem.a * problem.beta)
    return Curves(
        return_rate=np.where(worthless, 0.0, weighted_rate),
        knee=np.where(worthless, 0.0, env.knee),
        cap=np.where(worthless, 0.0, cap),
        tau=problem.tau,
        beta=problem.beta,
        log_peak=log_peak,
        tail_scale=np.where(worthless, 0.0, problem.weight * env.tail_scale),
        tag_index=problem.tag_index,
    )


def allocation_at(curves: Curves, price: FloatArray | float) -> FloatArray:
    """The rule at per-query price p: 0 if v·s < p, else max(knee, τ + ln(v·A·β/p)/β) capped."""
    price = np.asarray(price, dtype=np.float64)
    solvent = (curves.return_rate >= price) & (curves.return_rate > 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tail = curves.tau + (curves.log_peak - np.log(price)) / curves.beta
    funded = np.minimum(np.maximum(tail, curves.knee), curves.cap)
    return np.where(solvent, funded, 0.0)


def weighted_value(problem: WindowProblem, b: FloatArray) -> float:
    """Σ v·U(b): the true objective of an allocation."""
    return float(np.sum(problem.weight * value(b, problem.a, problem.tau, problem.beta)))


def relaxed_value(problem: WindowProblem, curves: Curves, b: FloatArray) -> float:
    """Σ v·Ũ(b): the envelope objective (chord value v·s per token up to the knee)."""
    on_chord = b <= curves.knee
    chord = curves.return_rate * b
    true_value = problem.weight * value(b, problem.a, problem.tau, problem.beta)
    return float(np.sum(np.where(on_chord, chord, true_value)))


def group_sums(curves: Curves, b: FloatArray, n_groups: int) -> FloatArray:
    """Tokens per budgeted tag (queries without a tag budget are skipped)."""
    tagged = curves.tag_index != NO_TAG
    return np.bincount(curves.tag_index[tagged], weights=b[tagged], minlength=n_groups)
