"""From a relaxed solution to a fundable one: chord fill, abandonment, top-up, budget guard.

The envelope relaxation has a vertex optimum where at most one query per binding budget row sits
strictly inside its chord (0 < b < knee). That query returns exactly λ per token on its chord but
less on its true curve, so it is funded at its knee if the budget allows, otherwise abandoned; the
tokens it frees are re-priced over the funded queries (the top-up), never over the abandoned ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from solver.curves import Curves, group_sums
from solver.problem import NO_TAG, FloatArray

KNEE_RTOL = 1e-6  # relative slack when deciding that an allocation reached its knee


@dataclass(frozen=True, slots=True)
class Relaxed:
    """A relaxed (envelope) optimum: allocations with at most one chord query per binding row."""

    allocations: FloatArray
    inside_chord: NDArray[np.bool_]


def fill_chords(
    curves: Curves,
    base: FloatArray,
    candidates: NDArray[np.int64],
    budget: float,
    tag_budgets: FloatArray,
) -> Relaxed:
    """Give candidates (queries whose v·s equals the price) their knee, best first, while it fits.

    The first candidate that no longer fits gets what is left: the relaxation's chord query.
    """
    b = base.copy()
    order = candidates[np.argsort(-curves.return_rate[candidates], kind="stable")]
    left = max(budget - float(np.sum(b)), 0.0)
    if tag_budgets.size == 0:
        _fill_single_row(b, curves.knee, order, left)
    else:
        tag_left = np.maximum(tag_budgets - group_sums(curves, b, tag_budgets.size), 0.0)
        _fill_with_tags(b, curves, order, left, tag_left)
    inside = (b > 0.0) & (b < curves.knee * (1.0 - KNEE_RTOL))
    return Relaxed(allocations=b, inside_chord=inside)


def _fill_single_row(
    b: FloatArray, knee: FloatArray, order: NDArray[np.int64], left: float
) -> None:
    if order.size == 0:
        return
    cumulative = np.cumsum(knee[order])
    fits = cumulative <= left
    b[order[fits]] = knee[order[fits]]
    if not fits.all():
        first_short = int(np.argmin(fits))
        used = float(cumulative[first_short - 1]) if first_short else 0.0
        b[order[first_short]] = max(left - used, 0.0)


def _fill_with_tags(
    b: FloatArray, curves: Curves, order: NDArray[np.int64], left: float, tag_left: FloatArray
) -> None:
    # Candidates are the few queries tied with a price; a plain loop keeps the row logic clear.
    for i in order:
        tag = curves.tag_index[i]
        room = min(left, tag_left[tag]) if tag != NO_TAG else left
        give = min(float(curves.knee[i]), room)
        if give <= 0.0:
            continue
        b[i] = give
        left -= give
        if tag != NO_TAG:
            tag_left[tag] -= give


def drop_chord_queries(relaxed: Relaxed) -> FloatArray:
    """Abandon the queries left inside their chord (their budget did not reach the knee)."""
    return np.where(relaxed.inside_chord, 0.0, relaxed.allocations)


def enforce_budgets(
    curves: Curves, b: FloatArray, budget: float, tag_budgets: FloatArray
) -> FloatArray:
    """Trim any excess (solver tolerance, float sums) so that no budget is exceeded.

    Tails above the knee are trimmed first, in proportion; only if that is not enough (a solver
    returned garbage) is the whole row scaled down.
    """
    b = np.minimum(np.maximum(b, 0.0), curves.cap)
    for k, tag_budget in enumerate(tag_budgets):
        rows = curves.tag_index == k
        b[rows] = _trim_row(b[rows], curves.knee[rows], float(tag_budget))
    return _trim_row(b, curves.knee, budget)


def _trim_row(b: FloatArray, knee: FloatArray, budget: float) -> FloatArray:
    excess = float(np.sum(b)) - budget
    if excess <= 0.0:
        return b
    tail = np.maximum(b - knee, 0.0)
    tail_total = float(np.sum(tail))
    if tail_total >= excess:
        b = b - tail * (excess / tail_total)
    # Float sums can still overshoot by an ulp or two; shave until they do not.
    for _ in range(8):
        total = float(np.sum(b))
        if total <= budget:
            break
        b = b * (budget / total) * (1.0 - 1e-15)
    return b
