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

Prompts carry the records' problem texts; `--hint-field FIELD` replays that record field as
`difficulty_hint`; `--benchmark NAME` keeps only that benchmark's records. A pool whose records
hold one chain replays one lap (a second would replay identical chains). `--feedback` plays the
downstream grader through the same replay path as `clearbudget replay --feedback`: each
answered query's recorded grade reaches the policy `--feedback-delay` stream seconds (one
second per arrival) after its window.

    python benchmarks/quality_bench.py --seeds 5
    python benchmarks/quality_bench.py --rollouts data/rollouts-math500-gsm8k.jsonl \
        --benchmark math500 --hint-field level --budgets 150 250 400
    python benchmarks/quality_bench.py --seeds 1 --passes 1 --budgets 250 500 1000 --feedback
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
from ceilings import by_problem, by_tag, by_tag_and_hint, group_cap_ceiling

from clearbudget.daemon.replay.config import (
    RecordExtras,
    ReplayConfig,
    ReplayQuery,
    draw_queries,
    one_lap_error,
    read_extras,
)
from clearbudget.daemon.replay.inprocess import replay
from clearbudget.daemon.replay.report import ReplayReport
from clearbudget.daemon.replay.rollouts import (
    RolloutPool,
    RolloutRecord,
    load_rollouts,
    oracle_allocation,
    uniform_at_cost,
)
from clearbudget.daemon.replay.traces import Arrival
from clearbudget.solver.difficulty import DifficultyModel, QueryInfo
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.query_fit import allocate_curves, fit_queries

DEFAULT_POOL = Path(__file__).resolve().parents[1] / "data" / "rollouts.jsonl"
DEFAULT_BUDGETS = (250, 375, 500, 750, 1000, 1500, 2000)
ARRIVAL_GAP_S = 1.0  # evenly spaced arrivals; windows close by count, never by time


def laps(
    pool: RolloutPool, passes: int, seed: int, extras: RecordExtras | None = None
) -> list[ReplayQuery]:
    """`passes` shuffled laps over the pool: `draw_queries` reshuffles the records per lap."""
    arrivals = [Arrival(i * ARRIVAL_GAP_S, i + 1, {}) for i in range(passes * len(pool))]
    return draw_queries(arrivals, pool, seed, extras)


def run_clear(
    pool: RolloutPool,
    budget_per_query: float,
    plan: ProbePlan,
    *,
    seed: int,
    passes: int,
    window: int,
    extras: RecordExtras | None = None,
    feedback_delay: float | None = None,
    adaptive_probes: bool = True,
) -> ReplayReport:
    """`feedback_delay`: graded feedback after that many stream seconds (None: none)."""
    queries = laps(pool, passes, seed, extras)
    config = ReplayConfig(
        policy="clear",
        budget_per_query=budget_per_query,
        seed=seed,
        # Longer than the whole stream: only the count closes a window.
        window_seconds=ARRIVAL_GAP_S * (len(queries) + 1),
        window_max_queries=window,
        probe=plan,
        hint_field=extras.hint_field if extras else None,
        feedback=feedback_delay is not None,
        feedback_delay=feedback_delay or 0.0,
        adaptive_probes=adaptive_probes,
    )
    return asyncio.run(replay(queries, pool, config))


def evaluate(
    pool: RolloutPool,
    budgets: Sequence[float],
    plan: ProbePlan,
    seeds: Sequence[int],
    passes: int,
    window: int,
    extras: RecordExtras | None = None,
    feedback_delay: float | None = None,
    adaptive_probes: bool = True,
) -> list[dict[str, float]]:
    rows = []
    for bpq in budgets:
        runs = [
            run_clear(pool, bpq, plan, seed=s, passes=passes, window=window, extras=extras,
                      feedback_delay=feedback_delay, adaptive_probes=adaptive_probes)
            for s in seeds
        ]  # fmt: skip
        rows.append(_row(pool, bpq, runs, extras))
    return rows


def _row(
    pool: RolloutPool, bpq: float, runs: Sequence[ReplayReport], extras: RecordExtras | None
) -> dict[str, float]:
    tpq = float(np.mean([r.tokens_per_query for r in runs]))
    acc = float(np.mean([r.mean_accuracy for r in runs]))
    uni = uniform_at_cost(pool, tpq).accuracy
    ora = oracle_allocation(pool, tpq).accuracy
    hints = extras.hints if extras is not None else None
    return {
        # In-sample ceilings at clear's tokens (benchmarks/ceilings.py): one cap per group.
        "per_tag": group_cap_ceiling(pool, tpq, by_tag),
        "per_tag_hint": group_cap_ceiling(pool, tpq, by_tag_and_hint(hints)) if hints else None,
        "per_problem": group_cap_ceiling(pool, tpq, by_problem),
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
    """The table; the ceilings (one cap per tag, per tag+hint, per problem; in-sample) are shown
    as accuracy and as a ratio to uniform, beside clear's."""
    head = (
        "| budget/q | tokens/q | probe/q | uniform | clear (sd) | clear/uniform | per-tag ceiling "
        "| per tag+hint | per-problem ceiling | oracle | gap closed | abandoned | failed |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        def vs_uniform(accuracy: float | None, r: dict[str, float] = r) -> str:
            if accuracy is None:
                return "-"
            return f"{accuracy:.3f} ({accuracy / r['uniform']:.2f}x)" if r["uniform"] else "-"

        lines.append(
            f"| {r['budget']:.0f} | {r['tokens_per_query']:.0f} | {r['probe_tokens_per_query']:.0f}"
            f" | {r['uniform']:.3f} | {r['clear']:.3f} ({r['clear_sd']:.3f}) | {r['ratio']:.2f}x"
            f" | {vs_uniform(r['per_tag'])} | {vs_uniform(r['per_tag_hint'])}"
            f" | {vs_uniform(r['per_problem'])} | {vs_uniform(r['oracle'])}"
            f" | {r['gap_closed']:+.0%} | {r['abandoned']:.1%} | {r['failed']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", type=Path, default=DEFAULT_POOL)
    ap.add_argument("--benchmark", help="keep only this benchmark's records (e.g. math500)")
    ap.add_argument("--hint-field", help="record field replayed as difficulty_hint (e.g. level)")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS))
    ap.add_argument("--probe-samples", type=int, default=1)
    ap.add_argument("--probe-tokens", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--passes", type=int, help="laps over the pool (default 3; 1 for one-chain "
                                               "pools, which allow no more)")  # fmt: skip
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument(
        "--feedback",
        action="store_true",
        help="graded feedback from the recorded grades (replay's --feedback)",
    )
    ap.add_argument("--feedback-delay", type=float, default=0.0,
                    help="--feedback: stream seconds from an answer to its grade (one second "
                         "per arrival; default 0: before the next window)")  # fmt: skip
    ap.add_argument("--fixed-probes", action="store_true",
                    help="every probe --probe-tokens long (default: a query predicted to finish "
                         "sooner gets a probe that just covers it)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.feedback_delay < 0:
        ap.error("--feedback-delay must be >= 0")
    delay = args.feedback_delay if args.feedback else None
    # The pipeline logs each window at INFO; the table is the output here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    pool, extras = load_pool(args.rollouts.resolve(), args.benchmark, args.hint_field)
    passes = args.passes or (1 if pool.tokens.shape[1] == 1 else 3)
    lap_error = one_lap_error(pool, passes * len(pool))
    if lap_error is not None:
        ap.error(lap_error.replace("--limit", "--passes 1, not more:").split(";")[0])
    plan = ProbePlan(args.probe_samples, args.probe_tokens)
    graded = "off" if delay is None else f"on (delay {delay:g} s)"
    print(f"pool {pool.source}: {len(pool)} records x {pool.tokens.shape[1]} chains, {passes} "
          f"lap(s), hints: {args.hint_field or 'off'}, feedback: {graded}, probes: "
          f"{'one length' if args.fixed_probes else 'a length per query'}\n")  # fmt: skip
    t0 = time.perf_counter()
    rows = evaluate(pool, args.budgets, plan, range(args.seeds), passes, args.window, extras,
                    delay, adaptive_probes=not args.fixed_probes)  # fmt: skip
    print(format_table(rows))
    solve_ms = np.mean([r["solve_ms"] for r in rows])
    seconds = np.mean([r["seconds"] for r in rows])
    print(f"\nsolve (curves + price + fits + allocation): {solve_ms:.2f} ms p50 per window of "
          f"{args.window}; {seconds:.2f} s per replay (mean)")  # fmt: skip
    print(f"fit + solve, 1,000 queries x 1 probe: {time_fit(pool, 1000, 1):.1f} ms (median of 5)")
    print(f"total {time.perf_counter() - t0:.1f} s")


def load_pool(
    path: Path, benchmark: str | None, hint_field: str | None
) -> tuple[RolloutPool, RecordExtras]:
    """The pool (only `benchmark`'s records if given) and its problem texts and hints."""
    pool = load_rollouts(path)
    if benchmark is not None:
        kept = [r for r in pool if r.benchmark == benchmark]
        if not kept:
            raise SystemExit(f"--benchmark {benchmark}: no such records in {path}")
        pool = RolloutPool(kept, source=f"{path} [{benchmark}]")
    return pool, read_extras(path, pool, hint_field)


def time_fit(pool: RolloutPool, queries: int, samples: int) -> float:
    """Median wall time of one decision over a `queries`-query window (curves conditioned on
    the probe, price, fits, allocation), the model warmed on the pool's chains."""
    rng = np.random.default_rng(0)
    plan = ProbePlan(samples, 256)
    model = DifficultyModel()
    for r in pool:
        for s in r.samples:
            model.observe(_info(r), s.tokens, finished=True, answered=True, answer=s.answer)
    records = rng.integers(0, len(pool), size=queries)
    infos = [_info(pool[int(i)]) for i in records]
    outcomes = [_probe_outcomes(pool, int(i), plan, rng) for i in records]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        window = fit_queries(outcomes, infos, plan, model)
        ids = [f"q{i}" for i in range(queries)]
        envelope = (window.fit.a, window.fit.tau, window.fit.beta)
        allocate_curves(ids, window.budgets, window.utility, 500.0 * queries, envelope=envelope)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _info(record: RolloutRecord) -> QueryInfo:
    return QueryInfo(f"problem: {record.key}\n", {"task": record.benchmark, "model": record.model})


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
