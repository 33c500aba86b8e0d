"""Closed-form prices: bisection on λ with the allocation rule (the fast path and the fallback).

Single budget: total demand Σ b_i(λ) falls as λ rises (with a jump of knee_i where λ passes
v_i·s_i), so a geometric bisection brackets λ* to 1e-12 relative. Tag budgets: with one tag per
query the dual splits. A tag's own price ν_t (the smallest price meeting its budget alone) does not
depend on λ, and each query then pays max(λ, ν_t); ν for all tags is bisected at once, then λ
against a total demand in which each tag spends min(its demand at λ, its budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.curves import Curves, allocation_at
from clearbudget.solver.problem import NO_TAG, FloatArray

_REL_TOL = 1e-12
_MAX_HALVINGS = 80
_EXPAND_FACTOR = 1e-3
_SMALLEST_PRICE = 1e-300


@dataclass(frozen=True, slots=True)
class Prices:
    """Bracketed prices: λ* lies in [low, high]; queries pay max(λ, their tag's ν)."""

    shadow_low: float
    shadow_high: float
    tag_low: FloatArray
    tag_high: FloatArray

    def per_query(self, tag_index: NDArray[np.int64], *, high: bool) -> FloatArray:
        shadow = self.shadow_high if high else self.shadow_low
        tag = self.tag_high if high else self.tag_low
        floor = np.append(tag, 0.0)[tag_index]  # NO_TAG (−1) reads the trailing 0
        return np.maximum(shadow, floor)

    def tag_premiums(self) -> FloatArray:
        """Extra price per token of each tag over λ (0 where its budget is slack)."""
        return np.maximum(self.tag_high - self.shadow_high, 0.0)


def closed_form_prices(curves: Curves, budget: float, tag_budgets: FloatArray) -> Prices:
    n_tags = tag_budgets.size
    tagged = curves.tag_index != NO_TAG
    tag_of = curves.tag_index[tagged]
    tag_low = tag_high = np.zeros(n_tags)
    if n_tags:

        def tag_demand(price: FloatArray) -> FloatArray:
            b = allocation_at(curves, np.append(price, 0.0)[curves.tag_index])
            return np.bincount(tag_of, weights=b[tagged], minlength=n_tags)

        tag_low, tag_high = _bisect(tag_demand, _top_rates(curves, n_tags), tag_budgets)

    def total_demand(price: FloatArray) -> FloatArray:
        # A tag spends at most its budget: below its own price ν_t it is pinned at B_t
        # (its chord query absorbs the rest), above ν_t its queries follow λ.
        b = allocation_at(curves, price[0])
        per_tag = np.bincount(tag_of, weights=b[tagged], minlength=n_tags)
        return np.array([np.sum(b[~tagged]) + np.sum(np.minimum(per_tag, tag_budgets))])

    top = np.array([float(np.max(curves.return_rate, initial=0.0))])
    low, high = _bisect(total_demand, top, np.array([budget]))
    return Prices(float(low[0]), float(high[0]), tag_low, tag_high)


def _top_rates(curves: Curves, n_tags: int) -> FloatArray:
    top = np.zeros(n_tags)
    tagged = curves.tag_index != NO_TAG
    np.maximum.at(top, curves.tag_index[tagged], curves.return_rate[tagged])
    return top


def _bisect(
    demand: Callable[[FloatArray], FloatArray], top: FloatArray, budgets: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per group g the bracket [low_g, high_g] where demand_g crosses budget_g (vectorised)."""
    n_groups = budgets.size
    high = top * (1.0 + 4 * _REL_TOL) + _SMALLEST_PRICE  # nobody is solvent above this
    slack = demand(np.zeros(n_groups)) <= budgets
    low = np.where(slack, 0.0, high * _EXPAND_FACTOR)
    high = np.where(slack, 0.0, high)
    low, high = _expand_low(demand, budgets, low, high, slack)
    for _ in range(_MAX_HALVINGS):
        open_ = (high > low * (1.0 + _REL_TOL)) & (low > 0)
        if not open_.any():
            break
        mid = np.where(open_, np.sqrt(low * high), high)
        over = demand(mid) > budgets
        low = np.where(open_ & over, mid, low)
        high = np.where(open_ & ~over, mid, high)
    return low, high


def _expand_low(
    demand: Callable[[FloatArray], FloatArray],
    budgets: FloatArray,
    low: FloatArray,
    high: FloatArray,
    slack: NDArray[np.bool_],
) -> tuple[FloatArray, FloatArray]:
    """Lower `low` until demand there exceeds the budget (the bracket's other end)."""
    for _ in range(120):
        short = ~slack & (low > 0) & (demand(low) <= budgets)
        if not short.any():
            break
        high = np.where(short, low, high)
        low = np.where(short, low * _EXPAND_FACTOR, low)
        low = np.where(low < _SMALLEST_PRICE, 0.0, low)
    return low, high
