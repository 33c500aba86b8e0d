"""From a relaxed solution to a fundable one: chord fill, chord rounding, budget guard.

The envelope relaxation has a vertex optimum where at most one query per binding budget row sits
strictly inside its chord (0 < b < knee). That query returns exactly λ per token on its chord but
less on its true curve, so rounding decides on the true curves. For a fixed set S of funded
queries the problem is concave: each member pays its threshold τ, and the rest is water-filled
over the concave tails v·A·(1 − e^(−β(b − τ))) (`fill_funded`, exact: one sort, no bisection).
Two sets compete: the funded queries alone (the chord query abandoned, its tokens topped up over
the others) and the funded queries with the chord query (partly funded on its true curve, where
what is left lifts it past τ). The larger true value wins. Optionally (`swaps`), a few swaps among
the queries nearest the price (the funded set's cheapest, the unfunded set's best) then repair
what the relaxation's ordering got wrong. Every candidate is judged by its true value, and every
budget row holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.curves import Curves, group_sums
from clearbudget.solver.problem import NO_TAG, FloatArray

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


def round_chords(
    curves: Curves,
    relaxed: Relaxed,
    budget: float,
    tag_budgets: FloatArray,
    *,
    swaps: bool = False,
) -> FloatArray:
    """The relaxed plan on the true curves: each chord query funded or abandoned, whichever is
    worth more (true value, not the envelope's), the budget water-filled over the funded set.

    Without a chord query the relaxed plan is already optimal (its true value meets the
    envelope's bound). Otherwise the funded set competes with and without each chord query (best
    first; one per binding row at most), each set water-filled by `fill_funded`. Only a chord
    query changes side (unless funding it prices a funded query's whole tail out, which then
    drops to zero), so the price still sorts funded from abandoned.

    `swaps` then searches further, for at most `_SWAP_ROUNDS` rounds: the best single flip or
    swap among the marginal queries (`_margin`: the chord queries, the cheapest funded and the
    best unfunded) is taken while it gains. Nearer the integer optimum on small windows, but it
    may fund a query whose v·s is below the price or abandon one above it.
    """
    if not relaxed.inside_chord.any():
        return enforce_budgets(curves, relaxed.allocations, budget, tag_budgets)
    search = _SetSearch(curves, budget, tag_budgets)
    funded = (relaxed.allocations > 0.0) & ~relaxed.inside_chord
    search.consider(funded)
    chords = np.flatnonzero(relaxed.inside_chord)
    for c in chords[np.argsort(-curves.return_rate[chords], kind="stable")]:
        search.consider(_flipped(search.members, c))
    if swaps:
        margin = _margin(curves, relaxed)
        for _ in range(_SWAP_ROUNDS):
            inside, outside = margin[search.members[margin]], margin[~search.members[margin]]
            base = search.members
            moves = [_flipped(base, i) for i in margin]
            moves += [_flipped(_flipped(base, i), j) for i in inside for j in outside]
            if not any([search.consider(move) for move in moves]):
                break
    best = search.best if search.best is not None else drop_chord_queries(relaxed)
    return enforce_budgets(curves, best, budget, tag_budgets)


MARGIN_QUERIES = 2  # with swaps: funded queries just above the price (and unfunded just below)
_SWAP_ROUNDS = 2
_GAIN_RTOL = 1e-12  # a move must gain more than float noise, so the search cannot cycle


class _SetSearch:
    """The best funded set found so far, its water-filled plan and true value."""

    def __init__(self, curves: Curves, budget: float, tag_budgets: FloatArray) -> None:
        self.curves, self.budget, self.tag_budgets = curves, budget, tag_budgets
        self.tails = Tails.of(curves)  # sorted once: each set then fills in O(n), no sort
        with np.errstate(over="ignore"):
            self.mass = np.exp(curves.log_peak) / curves.beta  # v·A
        self.members = np.zeros(curves.size, dtype=bool)
        self.best: FloatArray | None = None
        self.value = -np.inf

    def consider(self, members: NDArray[np.bool_]) -> bool:
        """Fill `members`; keep the plan if it is worth more than the best so far."""
        plan = fill_funded(self.curves, members, self.budget, self.tag_budgets, self.tails)
        if plan is None:
            return False
        worth = _true_value(self.curves, self.mass, plan)
        if self.best is not None and worth <= self.value + _GAIN_RTOL * abs(self.value):
            return False
        self.best, self.value, self.members = plan, worth, plan > 0.0
        return True


def _flipped(members: NDArray[np.bool_], i: int) -> NDArray[np.bool_]:
    out = members.copy()
    out[i] = not out[i]
    return out


def _margin(curves: Curves, relaxed: Relaxed) -> NDArray[np.int64]:
    """The chord queries and the queries nearest the price on either side (by return rate)."""
    rate = curves.return_rate
    funded = (relaxed.allocations > 0.0) & ~relaxed.inside_chord
    spare = ~funded & ~relaxed.inside_chord & (rate > 0.0)
    above = np.flatnonzero(funded)
    below = np.flatnonzero(spare)
    k = MARGIN_QUERIES
    if above.size > k:
        above = above[np.argpartition(rate[above], k)[:k]]
    if below.size > k:
        below = below[np.argpartition(-rate[below], k)[:k]]
    return np.concatenate([np.flatnonzero(relaxed.inside_chord), above, below])


def fill_funded(
    curves: Curves,
    members: NDArray[np.bool_],
    budget: float,
    tag_budgets: FloatArray,
    tails: Tails | None = None,
) -> FloatArray | None:
    """The best plan that funds exactly `members` past τ (None when their thresholds do not fit).

    Each member pays τ; the rest of every budget row is water-filled over the tails, which are
    concave from τ. A member priced out (left at τ, worth nothing) is dropped and the rest filled
    again. `tails` (`Tails.of(curves)`) may be passed in to share its sort between calls.
    """
    tails = tails or Tails.of(curves)
    members = members & tails.eligible
    b = np.zeros(curves.size)
    for _ in range(4):
        filled = _water_fill(curves, tails, members, budget, tag_budgets)
        if filled is None:
            return None
        b = filled
        priced_out = members & (b <= curves.tau)
        if not priced_out.any():
            return b
        members = members & ~priced_out
    return np.where(b > curves.tau, b, 0.0)


def _water_fill(
    curves: Curves,
    tails: Tails,
    members: NDArray[np.bool_],
    budget: float,
    tag_budgets: FloatArray,
) -> FloatArray | None:
    """Members at τ plus the water-filled tails; None when the thresholds break a budget row.

    A tag's budget, where it binds on its own, caps what each of its members can take (its fill
    at the tag's own price ν_t); the window budget is then filled over those rooms, so each member
    pays max(λ, ν_t), as in the closed form's split dual.
    """
    threshold = np.where(members, curves.tau, 0.0)
    left = budget - float(np.sum(threshold))
    tag_left = tag_budgets - group_sums(curves, threshold, tag_budgets.size)
    if left < 0.0 or np.any(tag_left < 0.0):
        return None
    tags = curves.tag_index
    capped: FloatArray | None = None
    for k in np.unique(tags[members & (tags != NO_TAG)]):
        rows = np.flatnonzero(members & (tags == k))
        alone = tails.part(rows).fill(None, float(tag_left[k]))
        if float(np.sum(alone)) < float(np.sum(tails.room[rows])):  # the tag binds alone
            capped = tails.room.copy() if capped is None else capped
            capped[rows] = alone
    if capped is None:
        z = tails.fill(members, left)
    else:
        rows = np.flatnonzero(members)
        z = np.zeros(curves.size)
        z[rows] = Tails(tails.log_peak[rows], tails.beta[rows], capped[rows]).fill(None, left)
    return np.where(members, curves.tau + z, 0.0)


class Tails:
    """Tails v·A·(1 − e^(−β z)), 0 ≤ z ≤ room, with the kinks of their demand sorted once.

    At log-price μ each tail takes z = clip((log_peak − μ)/β, 0, room): total demand is
    piecewise linear in μ, with a kink where a tail leaves its room (μ = log_peak − β·room) and
    where it leaves the market (μ = log_peak). `fill` sweeps the kinks of any subset (the others'
    steps masked to zero) to find the segment where demand meets the budget; the price there
    solves a linear equation. Exact, and no bisection.
    """

    def __init__(self, log_peak: FloatArray, beta: FloatArray, room: FloatArray) -> None:
        self.log_peak, self.beta, self.room = log_peak, beta, room
        self.eligible = room > 0.0
        n = room.size
        inv = 1.0 / beta
        kinks = np.concatenate([log_peak - beta * room, log_peak])
        order = np.argsort(kinks)  # ties in any order: demand is continuous at every kink
        self._mu = kinks[order]
        self._owner = np.concatenate([np.arange(n), np.arange(n)])[order]
        # Past each kink (in μ order): the fixed demand Σ room loses the tail's room and the
        # linear part Σ (log_peak − μ)/β gains the tail as it leaves its room, then loses it.
        self._steps = np.stack(
            [
                np.concatenate([-room, np.zeros(n)])[order],  # fixed
                np.concatenate([log_peak * inv, -log_peak * inv])[order],  # level
                np.concatenate([inv, -inv])[order],  # slope
            ]
        )

    @classmethod
    def of(cls, curves: Curves) -> Tails:
        """The window's tails past τ (room cap − τ), zero-room where a query is never funded."""
        eligible = (curves.return_rate > 0.0) & (curves.cap > curves.tau)
        log_peak = np.where(eligible, curves.log_peak, 0.0)
        return cls(log_peak, curves.beta, np.where(eligible, curves.cap - curves.tau, 0.0))

    def part(self, rows: NDArray[np.int64]) -> Tails:
        return Tails(self.log_peak[rows], self.beta[rows], self.room[rows])

    def fill(self, members: NDArray[np.bool_] | None, left: float) -> FloatArray:
        """z per tail: `left` tokens water-filled over `members` (None: all), 0 elsewhere."""
        room = self.room if members is None else np.where(members, self.room, 0.0)
        total = float(np.sum(room))
        if total <= left:
            return room.copy()
        if left <= 0.0:
            return np.zeros_like(room)
        steps = self._steps if members is None else np.where(members[self._owner], self._steps, 0.0)
        fixed, level, slope = np.cumsum(steps, axis=1)
        fixed += total
        demand = fixed + level - self._mu * slope  # at each kink; non-increasing in μ
        over = np.flatnonzero(demand > left)
        k = int(over[-1]) if over.size else 0
        upper = self._mu[k + 1] if k + 1 < self._mu.size else np.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing = (fixed[k] + level[k] - left) / slope[k]
        price = float(np.clip(crossing, self._mu[k], upper)) if slope[k] > 0.0 else self._mu[k]
        z = np.clip((self.log_peak - price) / self.beta, 0.0, room)
        spent = float(np.sum(z))
        return z * (left / spent) if spent > left else z  # the price's rounding, never over


def true_value(curves: Curves, b: FloatArray) -> float:
    """Σ v·U(b) on the true (not convexified) curves: v·A = exp(log_peak)/β."""
    with np.errstate(over="ignore"):
        mass = np.exp(curves.log_peak) / curves.beta
    return _true_value(curves, mass, b)


def _true_value(curves: Curves, mass: FloatArray, b: FloatArray) -> float:
    past = np.maximum(b - curves.tau, 0.0)
    return float(np.sum(np.where(past > 0.0, mass * -np.expm1(-curves.beta * past), 0.0)))


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


def equal_shares(room: FloatArray, total: float) -> NDArray[np.int64]:
    """Whole-token shares of `total`, as equal as `room` allows (water-filling): each is
    min(room, level), rounded down, the tokens rounding left given one each to the first."""
    room = np.floor(room)
    if float(room.sum()) <= total:
        return room.astype(np.int64)
    ordered = np.sort(room)
    below = np.concatenate([[0.0], np.cumsum(ordered)[:-1]])  # Σ of the rooms under each
    counts = np.arange(room.size, 0, -1)  # how many rooms are at least as large
    fits = below + counts * ordered >= total  # the level falls at or below this room
    k = int(np.argmax(fits))
    level = (total - below[k]) / counts[k]
    shares = np.floor(np.minimum(room, level)).astype(np.int64)
    spare = int(total - shares.sum())
    for i in np.flatnonzero(shares < room)[:spare]:
        shares[i] += 1
    return shares


def equal_shares_within(
    room: FloatArray, total: float, groups: Sequence[str], limits: Mapping[str, float]
) -> NDArray[np.int64]:
    """`equal_shares`, with each group's shares together at most its limit (a group with no
    limit has none): a group that would pass its limit gets equal shares of the limit alone,
    and the others share the rest, until no group passes its limit."""
    members = np.array(groups, dtype=object)
    shares = np.zeros(room.size, np.int64)
    open_ = np.ones(room.size, dtype=bool)  # not yet fixed at a group's limit
    left = total
    for _ in range(len(limits) + 1):
        shares[open_] = equal_shares(room[open_], left)
        over = [g for g, limit in limits.items()
                if float(shares[open_ & (members == g)].sum()) > max(limit, 0.0)]  # fmt: skip
        if not over:
            break
        for group in over:
            mine = open_ & (members == group)
            shares[mine] = equal_shares(room[mine], max(limits[group], 0.0))
            left -= float(shares[mine].sum())
            open_ &= ~mine
        shares[open_] = 0
    return shares
