"""Shifted-surge (A, τ, β) fitted to a predicted curve so the allocator decides as it would on
the curve itself.

The allocator reads a query through its concave envelope: the best value per token s (whether
the query is solvent at a price) and the knee w where the chord touches the curve; past w it
follows the tail. The fit therefore keeps the predicted curve's own envelope exactly: w is the
grid budget maximising U(b)/b and s = U(w)/w. For a shifted surge with asymptote A, tangency at
w means, with x = β(w − τ): A(1 − e^{−x}) = s·w and β·w = e^x − 1, so

    x = −ln(1 − s·w/A),   β = (e^x − 1)/w,   τ = w − x/β   (τ ≥ 0 always).

One degree of freedom is left, A ∈ (U(w), U(horizon)]: it is chosen by least squares on the tail
past w (points on the log-spaced grid, so each doubling of the budget weighs alike).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["curve_price", "fit_at_price", "fit_surge"]

FloatArray = NDArray[np.float64]
_MAX_X = 6.0  # steepest surge allowed: β·(w − τ) ≤ 6, A ≥ U(w)/(1 − e^-6)
_CANDIDATES = np.linspace(0.0, 1.0, 6)
_TAIL_POINTS = 3  # the tail error reads every third grid point (the grid is ~13% steps)
_FLAT_BETA = 1e-3  # β of a curve that is zero everywhere (never funded; any β will do)


def fit_surge(
    budgets: FloatArray, utility: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(A, τ, β) per row of `utility` (U at `budgets`, which start at 0 and increase)."""
    u = np.maximum.accumulate(np.clip(utility, 0.0, 1.0), axis=1)
    g = budgets[1:]
    ratio = u[:, 1:] / g
    knee_at = np.argmax(ratio, axis=1)
    w = g[knee_at]
    u_w = u[np.arange(u.shape[0]), knee_at + 1]
    a = _best_asymptote(g, u, w, u_w)
    x = -np.log1p(-np.divide(u_w, a, out=np.zeros_like(a), where=a > 0))
    beta = np.where(u_w > 0, np.expm1(x) / w, _FLAT_BETA)
    tau = np.where(u_w > 0, np.maximum(w - x / beta, 0.0), 0.0)
    return np.where(u_w > 0, a, 0.0), tau, beta


def _best_asymptote(g: FloatArray, u: FloatArray, w: FloatArray, u_w: FloatArray) -> FloatArray:
    """A among candidates between the steepest allowed surge and the horizon's value."""
    low = u_w / -np.expm1(-_MAX_X)
    high = np.maximum(u[:, -1], low)
    cand = low[:, None] + (high - low)[:, None] * _CANDIDATES  # (n, C)
    safe = np.maximum(cand, 1e-300)
    x = np.maximum(-np.log1p(-np.minimum(u_w[:, None] / safe, 1.0 - 1e-12)), 1e-12)
    beta = np.expm1(x) / w[:, None]
    tau = w[:, None] - x / beta
    gs, us = g[::_TAIL_POINTS], u[:, 1::_TAIL_POINTS]
    past = np.maximum(gs[None, None, :] - tau[:, :, None], 0.0)  # (n, C, G/2)
    fitted = cand[:, :, None] * -np.expm1(-beta[:, :, None] * past)
    tail = gs[None, None, :] > w[:, None, None]
    err = np.where(tail, (fitted - us[:, None, :]) ** 2, 0.0).sum(axis=2)
    best = np.argmin(err, axis=1)
    return cand[np.arange(cand.shape[0]), best]


def fit_at_price(
    budgets: FloatArray,
    utility: FloatArray,
    price: FloatArray,
    cap: FloatArray | None = None,
    *,
    spread: float = 2.0,
    envelope: tuple[FloatArray, FloatArray, FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(A, τ, β) that decide like the predicted curve near a per-query price λ.

    A single exponential tail cannot follow a heavy-tailed curve everywhere, so once the
    window's price is roughly known the fit is made where the allocator will act: at λ the
    curve's own demand b₀ = argmax_b U(b) − λ·b (on the grid, within the cap) and its value
    U(b₀) are kept exactly, and β is the demand's local elasticity: b moves by ln(κ)/β when the
    price moves by a factor κ (`spread`), measured on the curve. Then A = U(b₀) + λ/β and
    τ = b₀ + ln(λ/(A·β))/β. Queries insolvent at λ, queries whose demand does not move with the
    price (a step), and λ = 0 keep the envelope fit (`fit_surge`, or `envelope` if already
    computed), which keeps solvency exact.
    """
    envelope_fit = envelope if envelope is not None else fit_surge(budgets, utility)
    u = np.maximum.accumulate(np.clip(utility, 0.0, 1.0), axis=1)
    blocked = _blocked(budgets, cap, u.shape)
    lam = np.asarray(price, dtype=np.float64)
    b0, u0 = _demand(budgets, u, lam, blocked)
    b_lo, _ = _demand(budgets, u, lam * spread, blocked)
    b_hi, _ = _demand(budgets, u, lam / spread, blocked)
    two_sided = b_lo > 0
    width = np.where(two_sided, b_hi - b_lo, b_hi - b0)
    moves = (width > 0) & (b0 > 0) & np.isfinite(lam) & (lam > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.where(two_sided, 2.0, 1.0) * np.log(spread) / width
        # A ≤ 1: a curve this elastic at this value reads as a slower surge toward 1.
        beta = np.where(u0 + lam / beta > 1.0, lam / np.maximum(1.0 - u0, 1e-12), beta)
        a = np.minimum(u0 + lam / beta, 1.0)
        # τ < 0 (no strict phase at this price) is clipped: the fitted demand then runs a
        # little past the curve's, which measured better than refitting at τ = 0 (1.33x vs
        # 1.29x uniform at 500 tokens/query, one lap of rollouts.jsonl, 3 seeds).
        tau = np.maximum(b0 + np.log(lam / (beta * a)) / beta, 0.0)
    ok = moves & np.isfinite(beta) & (beta > 0) & np.isfinite(tau) & (a > 0)
    env_a, env_tau, env_beta = envelope_fit
    return np.where(ok, a, env_a), np.where(ok, tau, env_tau), np.where(ok, beta, env_beta)


def _demand(
    budgets: FloatArray, u: FloatArray, price: FloatArray, blocked: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Per row: the grid budget maximising U(b) − λ·b (0 where nothing beats b = 0), U there.
    `blocked` is 0 where a budget is allowed and −inf past the query's cap."""
    # An infinite price (weight 0) would make ∞·0 at b = 0; any huge price decides alike.
    lam = np.minimum(price, 1e300)[:, None]
    surplus = u - lam * budgets[None, :] + blocked
    best = np.argmax(surplus, axis=1)
    rows = np.arange(u.shape[0])
    funded = surplus[rows, best] > 0.0
    return np.where(funded, budgets[best], 0.0), np.where(funded, u[rows, best], 0.0)


def _blocked(budgets: FloatArray, cap: FloatArray | None, shape: tuple[int, ...]) -> FloatArray:
    if cap is None:
        return np.zeros(shape)
    return np.where(budgets[None, :] <= cap[:, None], 0.0, -np.inf)


def curve_price(
    budgets: FloatArray,
    utility: FloatArray,
    budget: float,
    weight: FloatArray,
    cap: FloatArray,
    *,
    steps: int = 18,
    groups: NDArray[np.int64] | None = None,
    group_budgets: FloatArray | None = None,
) -> float:
    """The price at which the curves' own demands (each query's grid budget maximising
    v·U(b) − λ·b, within its cap) fit the budget: the smallest such λ, by bisection in log λ
    (0 when every query's whole demand fits; `steps` halvings of a 10⁹ range leave < 0.01%).

    With `groups` (a group index per query, −1 for none) and `group_budgets`, a group spends at
    most its own budget, whatever its demand at λ (as the window budget's tag rows have it)."""
    u = np.maximum.accumulate(np.clip(utility, 0.0, 1.0), axis=1) * weight[:, None]
    allowed = budgets[None, :] <= cap[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(allowed[:, 1:], u[:, 1:] / budgets[1:], 0.0)
    high = float(rate.max(initial=0.0))
    if high <= 0.0:
        return 0.0
    blocked = _blocked(budgets, cap, u.shape)

    def spent(lam: float) -> float:
        demand = _demand(budgets, u, np.full(u.shape[0], lam), blocked)[0]
        if groups is None or group_budgets is None:
            return float(demand.sum())
        grouped = groups >= 0
        per_group = np.bincount(groups[grouped], demand[grouped], minlength=group_budgets.size)
        return float(demand[~grouped].sum() + np.minimum(per_group, group_budgets).sum())

    low = high * 1e-9
    if spent(low) <= budget:
        return 0.0
    for _ in range(steps):
        mid = float(np.sqrt(low * high))
        low, high = (mid, high) if spent(mid) > budget else (low, mid)
    return high
