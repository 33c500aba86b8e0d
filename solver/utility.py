"""Shifted-surge utility U(b) = A·(1 − exp(−β·(b − τ))) for b > τ, and its concave envelope.

Everything here is vectorised over numpy arrays (scalars broadcast). The envelope from b = 0 is a
chord to the tangent point w, then U itself. With x = β·(w − τ) the tangency condition
U(w)/w = U'(w) reduces to e^x = 1 + β·τ + x; writing u = 1 + β·τ + x gives
u = −W₋₁(−exp(−(1 + β·τ))) and the chord slope s = U(w)/w = A·β/u.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import lambertw

FloatArray = NDArray[np.float64]

# Below this β·τ the Lambert W argument sits within rounding of the branch point −1/e, and
# above it exp(−(1 + β·τ)) underflows; both ends use a series start and Newton polishing instead.
_SMALL_T = 1e-8
_LARGE_T = 600.0
_NEWTON_STEPS = 3


def value(b: ArrayLike, a: ArrayLike, tau: ArrayLike, beta: ArrayLike) -> FloatArray:
    """U(b): expected accuracy with b tokens (0 up to the emergence threshold τ)."""
    b, a, tau, beta = _as_float(b, a, tau, beta)
    past = np.maximum(b - tau, 0.0)
    return a * -np.expm1(-beta * past)


def marginal_value(b: ArrayLike, a: ArrayLike, tau: ArrayLike, beta: ArrayLike) -> FloatArray:
    """U'(b): 0 up to τ (right-derivative A·β at τ itself), A·β·exp(−β(b − τ)) after."""
    b, a, tau, beta = _as_float(b, a, tau, beta)
    past = b - tau
    with np.errstate(over="ignore"):
        tail = a * beta * np.exp(-beta * np.maximum(past, 0.0))
    return np.where(past >= 0.0, tail, 0.0)


def surge_excess(beta_tau: ArrayLike) -> FloatArray:
    """x = β·(w − τ) ≥ 0, the root of e^x = 1 + β·τ + x (via the lower Lambert W branch)."""
    t_in = np.asarray(beta_tau, dtype=np.float64)
    t = np.atleast_1d(t_in).ravel()
    x = np.empty_like(t)
    small = t < _SMALL_T
    large = t > _LARGE_T
    mid = ~(small | large)
    # Near the branch point: e^x − 1 − x ≈ x²/2 + x³/6 = t.
    root = np.sqrt(2.0 * t[small])
    x[small] = root - root**2 / 6.0
    # Asymptotic u ≈ L + ln L with L = 1 + t, where exp(−L) would underflow.
    big = 1.0 + t[large]
    x[large] = np.log(big) + np.log(big) / big
    u_mid = -lambertw(-np.exp(-(1.0 + t[mid])), k=-1).real
    x[mid] = u_mid - 1.0 - t[mid]
    return _polish_excess(np.maximum(x, 0.0), t).reshape(t_in.shape)


def _polish_excess(x: FloatArray, t: FloatArray) -> FloatArray:
    """Newton on a residual form that is well conditioned on each side of x = 1."""
    for _ in range(_NEWTON_STEPS):
        near = x < 1.0
        # f(x) = e^x − 1 − x − t with f' = expm1(x): no overflow and no cancellation for x < 1.
        xn = x[near]
        fprime = np.expm1(xn)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(fprime > 0.0, (_expm1_minus_x(xn) - t[near]) / fprime, 0.0)
        x[near] = np.maximum(xn - step, 0.0)
        # h(x) = x − ln(1 + t + x) with h' = 1 − 1/(1 + t + x) ≥ 1 − 1/e for x ≥ 1.
        xf, tf = x[~near], t[~near]
        grow = 1.0 + tf + xf
        x[~near] = xf - (xf - np.log(grow)) / (1.0 - 1.0 / grow)
    return x


def _expm1_minus_x(x: FloatArray) -> FloatArray:
    """e^x − 1 − x without the cancellation of expm1(x) − x at small x."""
    series = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x / 720))))
    return np.where(x < 1e-2, series, np.expm1(x) - x)


@dataclass(frozen=True, slots=True)
class Envelope:
    """Concave-envelope geometry of each curve, after any per-query cap.

    knee: where the chord ends (the tangent point w, or the cap when the cap is below w).
    slope: chord slope U(knee)/knee, the best value per token the query can return (A·β at τ = 0).
    tail_scale: A·exp(−β(knee − τ)): U(knee + z) = U(knee) + tail_scale·(1 − exp(−β z)).
    """

    knee: FloatArray
    slope: FloatArray
    tail_scale: FloatArray


def tangent_point(tau: ArrayLike, beta: ArrayLike) -> FloatArray:
    """w, where the chord from the origin touches U (independent of A)."""
    tau_arr, beta_arr = _as_float(tau, beta)
    return tau_arr + surge_excess(beta_arr * tau_arr) / beta_arr


def envelope(a: ArrayLike, tau: ArrayLike, beta: ArrayLike, cap: ArrayLike = np.inf) -> Envelope:
    """Chord end point, chord slope and tail scale of each query's envelope on [0, cap]."""
    a, tau, beta, cap = np.broadcast_arrays(*_as_float(a, tau, beta, cap))
    x = surge_excess(beta * tau)
    w = tau + x / beta
    knee = np.minimum(w, cap)
    capped = cap < w
    u = 1.0 + beta * tau + x
    with np.errstate(divide="ignore", invalid="ignore"):
        capped_slope = np.where(knee > 0.0, value(knee, a, tau, beta) / knee, 0.0)
    slope = np.where(capped, capped_slope, a * beta / u)
    # Uncapped: A·exp(−x) = A/u, exact even where τ + x/β rounds back to τ.
    tail_scale = np.where(capped, 0.0, a / u)
    return Envelope(knee=knee, slope=slope, tail_scale=tail_scale)


def envelope_value(
    b: ArrayLike, a: ArrayLike, tau: ArrayLike, beta: ArrayLike, cap: ArrayLike = np.inf
) -> FloatArray:
    """Ũ(b): the concave envelope (linear chord up to the knee, U beyond, flat past the cap)."""
    b, a, tau, beta, cap = _as_float(b, a, tau, beta, cap)
    env = envelope(a, tau, beta, cap)
    b = np.minimum(b, cap)
    chord = env.slope * np.minimum(b, env.knee)
    return np.where(b <= env.knee, chord, value(b, a, tau, beta))


def _as_float(*arrays: ArrayLike) -> tuple[FloatArray, ...]:
    return tuple(np.asarray(arr, dtype=np.float64) for arr in arrays)
