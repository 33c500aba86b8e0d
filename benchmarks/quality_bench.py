"""Offline quality benchmark: clear vs cost-matched uniform vs oracle on the recorded rollout pool.

Clear runs the product: the in-process replay (`daemon.replay.inprocess.replay`) drives the real
window pipeline (probe → fit → solve → dispatch, `daemon.core.pipeline.WindowPipeline`) with the
rollout simulator as backend. Each seed streams `passes` shuffled laps over the pool's records
(one arrival per record per lap, evenly spaced) in windows of `window` queries, budgeted by
count at `budget` tokens per query with bounded carry-over. Cost = tokens actually generated
(probes included); answers are scored against the recorded grades; the priors start empty and
learn online from what the pipeline observes.

Uniform is cost-matched to clear's measured tokens/query (one cap for every record, exact
expected accuracy over the pool); the oracle is the per-record LP optimum at the same tokens.
Every lap visits every record once, so both are the exact pool means for the stream.
"abandoned" is the report's count: queries left without an answer (insolvent, or their chain
cut at its allocation).

    python benchmarks/quality_bench.py --seeds 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog

from daemon.replay.config import ReplayConfig, ReplayQuery, draw_queries
from daemon.replay.inprocess import replay
from daemon.replay.report import ReplayReport
from daemon.replay.rollouts import RolloutPool, load_rollouts, oracle_allocation, uniform_at_cost
from daemon.replay.traces import Arrival
from solver.fit import ProbeOutcome, ProbePlan, fit_window
from solver.priors import PriorBook

DEFAULT_POOL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "rollouts.jsonl"
DEFAULT_BUDGETS = (250, 375, 500, 750, 1000, 1500, 2000)
ARRIVAL_GAP_S = 1.0  # evenly spaced arrivals; windows close by count, never by time


def laps(pool: RolloutPool, passes: int, seed: int) -> list[ReplayQuery]:
    """`passes` shuffled laps over the pool: `draw_queries` reshuffles the records per lap."""
    arrivals = [Arrival(i * ARRIVAL_GAP_S, i + 1, {}) for i in range(passes * len(pool))]
    return draw_queries(arrivals, pool, seed)


def run_clear(
    pool: RolloutPool,
    budget_per_query: float,
    plan: ProbePlan,
    *,
    seed: int,
    passes: int,
    window: int,
) -> ReplayReport:
    queries = laps(pool, passes, seed)
    config = ReplayConfig(
        policy="clear",
        budget_per_query=budget_per_query,
        seed=seed,
        # Longer than the whole stream: only the count closes a window.
        window_seconds=ARRIVAL_GAP_S * (len(queries) + 1),
        window_max_queries=window,
        probe=plan,
    )
    return asyncio.run(replay(queries, pool, config))


def evaluate(
    pool: RolloutPool,
    budgets: Sequence[float],
    plan: ProbePlan,
    seeds: Sequence[int],
    passes: int,
    window: int,
) -> list[dict[str, float]]:
    rows = []
    for bpq in budgets:
        runs = [run_clear(pool, bpq, plan, seed=s, passes=passes, window=window) for s in seeds]
        rows.append(_row(pool, bpq, runs))
    return rows


def _row(pool: RolloutPool, bpq: float, runs: Sequence[ReplayReport]) -> dict[str, float]:
    tpq = float(np.mean([r.tokens_per_query for r in runs]))
    acc = float(np.mean([r.mean_accuracy for r in runs]))
    uni = uniform_at_cost(pool, tpq).accuracy
    ora = oracle_allocation(pool, tpq).accuracy
    return {
        "budget": bpq,
        "tokens_per_query": tpq,
        "probe_tokens_per_query": float(np.mean([r.tokens_probe / r.queries for r in runs])),
        "uniform": uni,
        "clear": acc,
        "clear_sd": float(np.std([r.mean_accuracy for r in runs])),
        "oracle": ora,
        "ratio": acc / uni if uni > 0 else float("nan"),
        "gap_closed": (acc - uni) / (ora - uni) if ora > uni else float("nan"),
        "abandoned": float(np.mean([r.abandoned / r.queries for r in runs])),
        "failed": float(np.mean([r.failed / r.queries for r in runs])),
        "solve_ms": float(np.mean([r.solve_ms_p50 for r in runs])),
        "seconds": float(np.mean([r.wall_seconds for r in runs])),
    }


def format_table(rows: Sequence[dict[str, float]]) -> str:
    head = (
        "| budget/q | tokens/q | probe/q | uniform | clear (sd) | oracle | clear/uniform | "
        "gap closed | abandoned | failed |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['budget']:.0f} | {r['tokens_per_query']:.0f} | {r['probe_tokens_per_query']:.0f}"
            f" | {r['uniform']:.3f} | {r['clear']:.3f} ({r['clear_sd']:.3f}) | {r['oracle']:.3f}"
            f" | {r['ratio']:.2f}x | {r['gap_closed']:+.0%} | {r['abandoned']:.1%}"
            f" | {r['failed']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--probe-samples", type=int, default=1)
    ap.add_argument("--probe-tokens", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args(argv)
    # The pipeline logs each window at INFO; the table is the output here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pool = load_rollouts(args.rollouts.resolve())
    plan = ProbePlan(args.probe_samples, args.probe_tokens)
    t0 = time.perf_counter()
    rows = evaluate(pool, args.budgets, plan, range(args.seeds), args.passes, args.window)
    print(format_table(rows))
    solve_ms = np.mean([r["solve_ms"] for r in rows])
    seconds = np.mean([r["seconds"] for r in rows])
    print(f"\nsolve (probe selection + fit + allocation): {solve_ms:.2f} ms p50 per window of "
          f"{args.window}; {seconds:.2f} s per replay (mean)")  # fmt: skip
    print(f"fit_window, 1,000 queries x 4 probes: {time_fit(pool, 1000, 4):.1f} ms (median of 5)")
    print(f"total {time.perf_counter() - t0:.1f} s")


def time_fit(pool: RolloutPool, queries: int, samples: int) -> float:
    """Median wall time of one fit_window over `queries` queries, priors warmed on the pool."""
    rng = np.random.default_rng(0)
    plan = ProbePlan(samples, 256)
    book = PriorBook()
    for r in pool:
        for s in r.samples:
            book.observe(_tags(r.benchmark, r.model), s.tokens, finished=True, answered=True)
    records = rng.integers(0, len(pool), size=queries)
    tags = [_tags(pool[int(i)].benchmark, pool[int(i)].model) for i in records]
    outcomes = [_probe_outcomes(pool, int(i), plan, rng) for i in records]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fit_window(outcomes, tags, None, plan, book)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _tags(benchmark: str, model: str) -> dict[str, str]:
    return {"task": benchmark, "model": model}


def _probe_outcomes(
    pool: RolloutPool, record: int, plan: ProbePlan, rng: np.random.Generator
) -> list[ProbeOutcome]:
    """`plan.samples` distinct recorded chains of `record`, censored at `plan.tokens`."""
    chains = rng.permutation(pool.tokens.shape[1])[: plan.samples]
    out = []
    for j in chains:
        sample = pool[record].samples[int(j)]
        done = sample.tokens <= plan.tokens
        answer = sample.answer if done else None
        out.append(
            ProbeOutcome(finished=done, tokens=min(sample.tokens, plan.tokens), answer=answer)
        )
    return out


if __name__ == "__main__":
    main()
