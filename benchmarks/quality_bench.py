"""Offline quality benchmark: clear vs cost-matched uniform vs oracle on the recorded rollout pool.

Simulation (directly on the pool, no daemon): each seed streams `passes` shuffled passes over the
pool's records in windows of `window` queries. Per query the probe draws `k` distinct recorded
chains and censors each at p; the fit (solver.fit + an online PriorBook) gives a continuation
curve; solve_window allocates the window budget left after probes (+ bounded carry-over) over the
queries that still need a chain; dispatch continues the first censored chain up to its
allocation. Cost = tokens actually generated (probes included). Answers are scored with the
recorded `correct` flag only; the priors learn from observable signals (lengths, finish, whether
an answer exists), in arrival order, starting empty.

Uniform is cost-matched to clear's measured tokens/query (one cap for every record, exact
expected accuracy over the pool); the oracle is the per-record LP optimum at the same tokens.
Every pass visits every record once, so both are the exact pool means for the stream.

    python benchmarks/quality_bench.py --seeds 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.replay.rollouts import RolloutPool, load_rollouts, oracle_allocation, uniform_at_cost
from solver.allocate import solve_window
from solver.fit import ProbeOutcome, ProbePlan, WindowFit, fit_window, select_probes
from solver.priors import PriorBook
from solver.problem import WindowProblem

DEFAULT_POOL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "rollouts.jsonl"
DEFAULT_BUDGETS = (250, 375, 500, 750, 1000, 1500, 2000)
MAX_TOKENS_PER_QUERY = 32768


@dataclass(frozen=True, slots=True)
class RunResult:
    accuracy: float
    tokens_per_query: float
    probe_tokens_per_query: float
    answered_by_probe: float
    abandoned: float
    fit_ms_per_window: float


@dataclass
class _Stream:
    correct: int = 0
    tokens: int = 0
    probe_tokens: int = 0
    queries: int = 0
    by_probe: int = 0
    abandoned: int = 0
    fit_seconds: float = 0.0
    windows: int = 0


def run_clear(
    pool: RolloutPool,
    budget_per_query: float,
    plan: ProbePlan,
    *,
    seed: int,
    passes: int,
    window: int,
    adaptive: bool = True,
) -> RunResult:
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(passes)])
    book = PriorBook()
    stats = _Stream()
    carry = 0.0
    for start in range(0, order.size, window):
        records = order[start : start + window]
        budget = budget_per_query * records.size + carry
        spent = _run_window(pool, records, budget, plan, book, rng, stats, adaptive)
        carry = min(max(budget - spent, 0.0), budget_per_query * window)  # bounded carry-over
    n = stats.queries
    return RunResult(
        accuracy=stats.correct / n,
        tokens_per_query=stats.tokens / n,
        probe_tokens_per_query=stats.probe_tokens / n,
        answered_by_probe=stats.by_probe / n,
        abandoned=stats.abandoned / n,
        fit_ms_per_window=1e3 * stats.fit_seconds / stats.windows,
    )


def _run_window(
    pool: RolloutPool,
    records: np.ndarray,
    budget: float,
    plan: ProbePlan,
    book: PriorBook,
    rng: np.random.Generator,
    stats: _Stream,
    adaptive: bool,
) -> float:
    n = records.size
    tags = [_tags(pool, int(r)) for r in records]
    t0 = time.perf_counter()
    chosen = select_probes(tags, None, budget, book) if adaptive else np.ones(n, dtype=bool)
    stats.fit_seconds += time.perf_counter() - t0
    stats.queries += n
    stats.abandoned += int(n - chosen.sum())
    stats.windows += 1
    records = records[chosen]
    tags = [t for t, keep in zip(tags, chosen, strict=True) if keep]
    n = records.size
    if n == 0:
        return 0.0
    width = pool.tokens.shape[1]
    chains = np.array([rng.permutation(width)[: max(plan.samples, 1)] for _ in range(n)])
    lengths = pool.tokens[records[:, None], chains]
    correct = pool.correct[records[:, None], chains]
    outcomes = [_probe(pool, int(r), chains[i], lengths[i], plan) for i, r in enumerate(records)]
    t0 = time.perf_counter()
    fit = fit_window(outcomes, tags, None, plan, book)
    stats.fit_seconds += time.perf_counter() - t0
    probe_spent = int(fit.probe_tokens.sum())
    alloc = _allocate(fit, budget - probe_spent)
    spent = probe_spent
    for i in range(n):
        used, right, by_probe = _settle(fit, i, alloc[i], lengths[i], correct[i], plan)
        spent += used
        stats.correct += right
        stats.by_probe += by_probe
        stats.abandoned += fit.answer_now[i] is None and alloc[i] <= 0 and not by_probe
        _report(book, tags[i], fit, i, alloc[i], lengths[i], plan, pool, int(records[i]), chains[i])
    stats.tokens += spent
    stats.probe_tokens += probe_spent
    return float(spent)


def _tags(pool: RolloutPool, record: int) -> dict[str, str]:
    r = pool[record]
    return {"task": r.benchmark, "model": r.model}


def _probe(
    pool: RolloutPool, record: int, chains: np.ndarray, lengths: np.ndarray, plan: ProbePlan
) -> list[ProbeOutcome]:
    out = []
    for j in range(plan.samples):
        done = int(lengths[j]) <= plan.tokens
        answer = pool[record].samples[int(chains[j])].answer if done else None
        out.append(
            ProbeOutcome(finished=done, tokens=min(int(lengths[j]), plan.tokens), answer=answer)
        )
    return out


def _allocate(fit: WindowFit, budget: float) -> np.ndarray:
    alloc = np.zeros(fit.size)
    live = np.flatnonzero(fit.needs_dispatch)
    if live.size == 0 or budget <= 0:
        return alloc
    problem = WindowProblem.create(
        [str(i) for i in live], fit.a[live], fit.tau[live], fit.beta[live], budget,
        cap=np.full(live.size, float(MAX_TOKENS_PER_QUERY)),
    )  # fmt: skip
    alloc[live] = solve_window(problem, method="closed_form").token_allocations()
    return alloc


def _settle(
    fit: WindowFit,
    i: int,
    alloc: float,
    lengths: np.ndarray,
    correct: np.ndarray,
    plan: ProbePlan,
) -> tuple[int, int, int]:
    """(continuation tokens, 1 if the returned answer is right, 1 if the probe answered)."""
    if fit.answer_now[i] is not None:
        j = _first_finished_with(fit.answer_now[i], lengths, plan)
        return 0, int(correct[j]), 1
    j = int(fit.continue_from[i])
    if alloc <= 0 or (plan.enabled and j < 0):
        return 0, 0, 0
    j = max(j, 0)
    done = plan.tokens if plan.enabled else 0
    used = int(min(lengths[j] - done, alloc))
    finished = lengths[j] <= done + alloc
    return used, int(finished and correct[j]), 0


def _first_finished_with(answer: str, lengths: np.ndarray, plan: ProbePlan) -> int:
    # Probes that agree were scored alike by the recorder (same normalised answer).
    finished = np.flatnonzero(lengths[: plan.samples] <= plan.tokens)
    return int(finished[0])


def _report(
    book: PriorBook,
    tags: dict[str, str],
    fit: WindowFit,
    i: int,
    alloc: float,
    lengths: np.ndarray,
    plan: ProbePlan,
    pool: RolloutPool,
    record: int,
    chains: np.ndarray,
) -> None:
    """Tell the book each chain's final state once (what the pipeline sees, nothing more)."""
    continued = int(fit.continue_from[i]) if fit.answer_now[i] is None and alloc > 0 else -2
    if not plan.enabled:
        continued = 0 if alloc > 0 else -2
    for j in range(max(plan.samples, 1 if continued == 0 else 0)):
        reach = (plan.tokens if plan.enabled else 0) + (alloc if j == continued else 0)
        if reach <= 0:
            continue
        total = int(min(lengths[j], reach))
        done = bool(lengths[j] <= reach)
        answered = done and pool[record].samples[int(chains[j])].answer is not None
        book.observe(tags, total, finished=done, answered=answered)


def evaluate(
    pool: RolloutPool,
    budgets: Sequence[float],
    plan: ProbePlan,
    seeds: Sequence[int],
    passes: int,
    window: int,
    adaptive: bool,
) -> list[dict[str, float]]:
    rows = []
    for bpq in budgets:
        runs = [
            run_clear(pool, bpq, plan, seed=s, passes=passes, window=window, adaptive=adaptive)
            for s in seeds
        ]
        rows.append(_row(pool, bpq, runs))
    return rows


def _row(pool: RolloutPool, bpq: float, runs: Sequence[RunResult]) -> dict[str, float]:
    tpq = float(np.mean([r.tokens_per_query for r in runs]))
    acc = float(np.mean([r.accuracy for r in runs]))
    uni = uniform_at_cost(pool, tpq).accuracy
    ora = oracle_allocation(pool, tpq).accuracy
    return {
        "budget": bpq,
        "tokens_per_query": tpq,
        "probe_tokens_per_query": float(np.mean([r.probe_tokens_per_query for r in runs])),
        "uniform": uni,
        "clear": acc,
        "clear_sd": float(np.std([r.accuracy for r in runs])),
        "oracle": ora,
        "ratio": acc / uni if uni > 0 else float("nan"),
        "gap_closed": (acc - uni) / (ora - uni) if ora > uni else float("nan"),
        "by_probe": float(np.mean([r.answered_by_probe for r in runs])),
        "abandoned": float(np.mean([r.abandoned for r in runs])),
        "fit_ms": float(np.mean([r.fit_ms_per_window for r in runs])),
    }


def format_table(rows: Sequence[dict[str, float]]) -> str:
    head = (
        "| budget/q | tokens/q | probe/q | uniform | clear (sd) | oracle | clear/uniform | "
        "gap closed | by probe | abandoned |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['budget']:.0f} | {r['tokens_per_query']:.0f} | {r['probe_tokens_per_query']:.0f}"
            f" | {r['uniform']:.3f} | {r['clear']:.3f} ({r['clear_sd']:.3f}) | {r['oracle']:.3f}"
            f" | {r['ratio']:.2f}x | {r['gap_closed']:+.0%} | {r['by_probe']:.1%}"
            f" | {r['abandoned']:.1%} |"
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
    ap.add_argument("--no-adapt", action="store_true", help="always probe with the given plan")
    args = ap.parse_args(argv)
    pool = load_rollouts(args.rollouts.resolve())
    plan = ProbePlan(args.probe_samples, args.probe_tokens)
    t0 = time.perf_counter()
    rows = evaluate(
        pool, args.budgets, plan, range(args.seeds), args.passes, args.window, not args.no_adapt
    )
    print(format_table(rows))
    fit_ms = np.mean([r["fit_ms"] for r in rows])
    print(f"\nfit + probe selection: {fit_ms:.2f} ms per window of {args.window} (mean)")
    print(f"fit_window, 1,000 queries x 4 probes: {time_fit(pool, 1000, 4):.1f} ms (median of 5)")
    print(f"total {time.perf_counter() - t0:.1f} s")


def time_fit(pool: RolloutPool, queries: int, samples: int) -> float:
    """Median wall time of one fit_window over `queries` queries, priors warmed on the pool."""
    rng = np.random.default_rng(0)
    plan = ProbePlan(samples, 256)
    book = PriorBook()
    for r in range(len(pool)):
        for t in pool.tokens[r]:
            book.observe(_tags(pool, r), int(t), finished=True, answered=True)
    records = rng.integers(0, len(pool), size=queries)
    chains = np.array([rng.permutation(pool.tokens.shape[1])[:samples] for _ in range(queries)])
    lengths = pool.tokens[records[:, None], chains]
    tags = [_tags(pool, int(r)) for r in records]
    outcomes = [_probe(pool, int(r), chains[i], lengths[i], plan) for i, r in enumerate(records)]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fit_window(outcomes, tags, None, plan, book)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


if __name__ == "__main__":
    main()
