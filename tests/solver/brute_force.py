"""Exact optima of small windows by brute force, independent of the solver's own code.

For a fixed set S of funded queries the problem is concave: each gets its threshold τ_i, and what
is left is water-filled over the concave tails v·A·(1 − e^(−β z)), z ∈ [0, cap − τ]. Any allocation
is matched by the set of queries it lifts past τ, so the best set's water-fill is the optimum.

Run as a script to measure the rounding's gap over random small windows:

    python tests/solver/brute_force.py [--windows 200] [--seed 0] [--max-queries 6]

(with ``PYTHONPATH=DIR`` naming another copy of ``solver/`` to measure that one instead).
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

from clearbudget.solver import WindowProblem, solve_window, value


def water_fill(problem: WindowProblem, members: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """Best value and allocation with exactly `members` lifted past τ (−inf if they do not fit)."""
    b = np.zeros(problem.size)
    idx = np.array(members, dtype=np.int64)
    if idx.size == 0:
        return 0.0, b
    tau, beta = problem.tau[idx], problem.beta[idx]
    mass = problem.weight[idx] * problem.a[idx]
    room = np.minimum(problem.cap[idx], problem.budget) - tau
    left = problem.budget - float(np.sum(tau))
    if left < 0.0 or np.any(room <= 0.0) or np.any(mass <= 0.0):
        return -np.inf, b
    peak = mass * beta

    def fill(price: float) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.clip(np.log(peak / price) / beta, 0.0, room)

    if float(np.sum(room)) <= left:
        z = room
    else:
        low, high = 0.0, float(np.max(peak))
        for _ in range(200):
            mid = 0.5 * (low + high)
            if float(np.sum(fill(mid))) > left:
                low = mid
            else:
                high = mid
        z = fill(high)
    b[idx] = tau + z
    return float(np.sum(mass * -np.expm1(-beta * z))), b


def exact_optimum(problem: WindowProblem) -> tuple[float, np.ndarray]:
    """The optimum of Σ v·U(b) over Σ b ≤ B, 0 ≤ b ≤ cap (no tag budgets): every set tried."""
    best, best_b = 0.0, np.zeros(problem.size)
    for k in range(1, problem.size + 1):
        for members in itertools.combinations(range(problem.size), k):
            total, b = water_fill(problem, members)
            if total > best:
                best, best_b = total, b
    return best, best_b


def random_small_window(rng: np.random.Generator, max_queries: int = 6) -> WindowProblem:
    """Scarce budgets over curves like the fitted rollouts: the relaxation leaves chord queries."""
    n = int(rng.integers(1, max_queries + 1))
    with_caps = rng.random() < 0.3
    return WindowProblem.create(
        [f"q{i}" for i in range(n)],
        rng.uniform(0.1, 1.0, n),
        rng.uniform(0.0, 1000.0, n),
        rng.lognormal(np.log(0.005), 0.6, n),
        float(rng.uniform(100.0, 900.0) * n),
        weight=rng.uniform(0.5, 2.0, n),
        cap=rng.uniform(300.0, 3000.0, n) if with_caps else None,
    )


def real_value(problem: WindowProblem, b: np.ndarray) -> float:
    return float(np.sum(problem.weight * value(b, problem.a, problem.tau, problem.beta)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-queries", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    problems = [random_small_window(rng, args.max_queries) for _ in range(args.windows)]
    optima = [exact_optimum(problem)[0] for problem in problems]
    print(f"windows={args.windows} seed={args.seed} queries<={args.max_queries}")
    for rounding in ("chord", "swap"):
        try:
            got = [solve_window(p, method="closed_form", rounding=rounding) for p in problems]
        except TypeError:  # a solver without the `rounding` option (an older copy)
            if rounding != "chord":
                continue
            rounding = "(default)"
            got = [solve_window(p, method="closed_form") for p in problems]
        gaps = np.array(
            [
                (opt - r.objective) / opt if opt > 0 else 0.0
                for opt, r in zip(optima, got, strict=True)
            ]
        )
        print(
            f"rounding={rounding}: relative gap to the exact optimum: mean {gaps.mean():.3e},"
            f" max {gaps.max():.3e} (window {int(np.argmax(gaps))});"
            + "".join(f" >{cut:g}: {int(np.sum(gaps > cut))}" for cut in (1e-6, 1e-3, 1e-2))
        )


if __name__ == "__main__":
    main()
