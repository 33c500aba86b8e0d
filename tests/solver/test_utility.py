"""The utility model: tangent point, chord slope and envelope, including the edges."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from clearbudget.solver.utility import envelope, envelope_value, marginal_value, surge_excess, value


def brute_tangent(tau: float, beta: float) -> float:
    """w from the tangency condition U(w)/w = U'(w), solved with a bracketing root finder."""

    def gap(w: float) -> float:
        return value(w, 1.0, tau, beta) / w - marginal_value(w, 1.0, tau, beta)

    return brentq(gap, tau + 1e-9 / beta, tau + 100.0 / beta, xtol=1e-12, rtol=1e-14)


@pytest.mark.parametrize(("tau", "beta"), [(500.0, 0.01), (10.0, 0.5), (3000.0, 1e-3), (1.0, 1.0)])
def test_tangent_point_matches_root_finder(tau: float, beta: float) -> None:
    env = envelope(0.7, tau, beta)
    assert env.knee == pytest.approx(brute_tangent(tau, beta), rel=1e-9)
    assert env.slope == pytest.approx(value(env.knee, 0.7, tau, beta) / env.knee, rel=1e-9)


def test_chord_slope_is_the_best_value_per_token() -> None:
    rng = np.random.default_rng(3)
    a, tau, beta = rng.uniform(0, 1, 50), rng.uniform(0, 2000, 50), 10 ** rng.uniform(-4, 0, 50)
    env = envelope(a, tau, beta)
    grid = np.linspace(1e-3, 1.0, 4001)[:, None] * (tau + 60.0 / beta)
    best = np.max(value(grid, a, tau, beta) / grid, axis=0)
    assert np.all(env.slope >= best * (1 - 1e-9))
    assert np.allclose(env.slope, best, rtol=1e-3)


def test_envelope_is_concave_and_above_the_curve() -> None:
    b = np.linspace(0, 3000, 3001)
    env_val = envelope_value(b, 0.9, 800.0, 0.004, cap=2500.0)
    assert np.all(env_val >= value(np.minimum(b, 2500.0), 0.9, 800.0, 0.004) - 1e-12)
    assert np.all(np.diff(env_val, 2) <= 1e-12)


def test_surge_excess_solves_its_equation_across_scales() -> None:
    t = np.array([1e-300, 1e-14, 1e-9, 1e-6, 0.3, 5.0, 599.0, 601.0, 1e6, 1e300])
    x = surge_excess(t)
    small = x < 1
    lhs = np.where(small, np.expm1(x) - x, x)
    rhs = np.where(small, t, np.log1p(t + x))
    assert np.allclose(lhs[~small], rhs[~small], rtol=1e-14)
    assert np.allclose(lhs[small][2:], rhs[small][2:], rtol=1e-9)
    assert x[0] == pytest.approx(np.sqrt(2e-300), rel=1e-12)
    assert np.all(np.isfinite(x))


def test_zero_threshold_has_no_chord() -> None:
    env = envelope(0.5, 0.0, 0.01)
    assert env.knee == 0.0
    assert env.slope == pytest.approx(0.5 * 0.01)
    assert env.tail_scale == pytest.approx(0.5)


def test_zero_mass_returns_nothing() -> None:
    env = envelope(0.0, 300.0, 0.01)
    assert env.slope == 0.0
    assert value(5000.0, 0.0, 300.0, 0.01) == 0.0


def test_huge_threshold_stays_finite() -> None:
    env = envelope(1.0, 1e12, 1e-3)
    assert np.isfinite(env.knee)
    assert env.knee > 1e12
    assert env.slope == pytest.approx(value(env.knee, 1.0, 1e12, 1e-3) / env.knee, rel=1e-6)


@pytest.mark.parametrize("beta", [1e-12, 1e-6, 1e3, 1e12, 1e300])
def test_extreme_surge_rates(beta: float) -> None:
    env = envelope(0.8, 200.0, beta)
    assert np.isfinite(env.knee)
    assert np.isfinite(env.slope)
    assert env.slope > 0
    if beta >= 1e3:  # a step at τ: the chord runs to τ and returns A/τ per token
        assert env.knee == pytest.approx(200.0, rel=1e-2)
        assert env.slope == pytest.approx(0.8 / 200.0, rel=1e-2)


def test_cap_below_tangent_point_makes_the_chord_end_at_the_cap() -> None:
    w = envelope(1.0, 500.0, 0.01).knee
    capped = envelope(1.0, 500.0, 0.01, cap=w * 0.8)
    assert capped.knee == pytest.approx(w * 0.8)
    assert capped.slope == pytest.approx(value(w * 0.8, 1.0, 500.0, 0.01) / (w * 0.8))
    assert capped.tail_scale == 0.0
    below_tau = envelope(1.0, 500.0, 0.01, cap=400.0)
    assert below_tau.slope == 0.0


def test_vectorised_shapes_broadcast() -> None:
    env = envelope(np.full((2, 3), 0.5), 100.0, np.array([0.01, 0.02, 0.03]))
    assert env.knee.shape == (2, 3)
    assert marginal_value(np.array([0.0, 100.0, 150.0]), 1.0, 100.0, 0.1).tolist()[0] == 0.0
