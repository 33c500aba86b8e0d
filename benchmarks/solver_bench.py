"""Solver speed: closed form vs cvxpy (Clarabel, ECOS, SCS, HiGHS LP), first solve and re-solve.

Usage: python benchmarks/solver_bench.py [--sizes 100 1000 10000] [--repeats 5] [--record]
First solve: a fresh allocator (includes cvxpy's compile for the bucket). Re-solve: the median over
`--repeats` new windows of the same size on the same allocator (DPP: parameters only). Each row also
shows λ's relative error against the closed form. `--record` appends the table to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clearbudget.solver import CvxpyAllocator, WindowProblem, solve_window

RESULTS = Path(__file__).with_name("RESULTS.md")
# Slow paths are skipped above these sizes (minutes per solve, or an LP of n·cuts rows).
SIZE_LIMITS = {"cvxpy-scs": 1000, "cvxpy-highs-tangent": 1000}


def random_window(n: int, rng: np.random.Generator) -> WindowProblem:
    """Curves like the fitted rollouts: τ up to ~1k tokens, surge scale 1/β ~ 100-500 tokens."""
    return WindowProblem.create(
        [f"q{i}" for i in range(n)],
        rng.uniform(0.05, 1.0, n),
        rng.uniform(0.0, 1200.0, n),
        rng.lognormal(np.log(1 / 250), 0.6, n),
        budget=600.0 * n,
        weight=rng.uniform(0.5, 2.0, n),
        cap=np.full(n, 8192.0),
    )


def paths() -> dict[str, Callable[[], Callable[[WindowProblem], object]]]:
    """Each path: a factory returning a solve function with fresh state (for the first solve)."""

    def cvxpy(solver: str, **kw: object) -> Callable[[], Callable[[WindowProblem], object]]:
        def factory() -> Callable[[WindowProblem], object]:
            allocator = CvxpyAllocator(solver, **kw)  # type: ignore[arg-type]
            return lambda p: solve_window(p, method="cvxpy", allocator=allocator)

        return factory

    return {
        "closed_form": lambda: lambda p: solve_window(p, method="closed_form"),
        "cvxpy-clarabel": cvxpy("CLARABEL"),
        "cvxpy-clarabel-rebuild": cvxpy("CLARABEL", dpp_max_size=0),
        "cvxpy-ecos": cvxpy("ECOS"),
        "cvxpy-scs": cvxpy("SCS"),
        "cvxpy-highs-tangent": cvxpy("HIGHS"),
    }


def bench(n: int, name: str, factory: Callable, repeats: int, seed: int) -> dict[str, object]:  # type: ignore[type-arg]
    rng = np.random.default_rng(seed)
    windows = [random_window(n, rng) for _ in range(repeats + 1)]
    reference = [solve_window(w, method="closed_form").shadow_price for w in windows]
    solve = factory()
    times, errors, fallbacks = [], [], 0
    for k, window in enumerate(windows):
        start = time.perf_counter()
        result = solve(window)
        times.append((time.perf_counter() - start) * 1e3)
        errors.append(abs(result.shadow_price - reference[k]) / reference[k])  # type: ignore[attr-defined]
        fallbacks += result.fallbacks  # type: ignore[attr-defined]
    return {
        "n": n,
        "path": name,
        "first_ms": times[0],
        "resolve_ms": statistics.median(times[1:]),
        "lambda_rel_err": max(errors),
        "fallbacks": fallbacks,
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| queries | path | first solve (ms) | re-solve median (ms) "
        "| max λ rel. error | fallbacks |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['path']} | {r['first_ms']:.1f} | {r['resolve_ms']:.1f} "
            f"| {r['lambda_rel_err']:.1e} | {r['fallbacks']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paths", nargs="+", default=list(paths()))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for name in args.paths:
            if n > SIZE_LIMITS.get(name, n):
                continue
            rows.append(bench(n, name, paths()[name], args.repeats, args.seed))
            print(f"  done {name} n={n}", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.record:
        record(text, args)


def record(text: str, args: argparse.Namespace) -> None:
    command = "python benchmarks/solver_bench.py " + " ".join(sys.argv[1:])
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = "" if RESULTS.exists() else "# Benchmark results\n"
    block = (
        f"\n### Solver speed run, {when}\n\n`{command}` on {os.cpu_count()} CPU cores "
        f"(repeats={args.repeats}, seed={args.seed}).\n\n{text}\n"
    )
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(header + block)


if __name__ == "__main__":
    main()
