"""Trace replay: recorded arrivals, each a query drawn from a rollout pool, through the real
window pipeline on a virtual clock, scored against the recorded grades.

Every policy runs through the same pipeline and the same simulated backend, so the report
counts every generated token (probes included) identically for clear, uniform and oracle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
from prometheus_client import CollectorRegistry

from daemon.core.budget import BudgetLedger
from daemon.core.metrics import PipelineMetrics
from daemon.core.pipeline import PendingQuery, WindowPipeline
from daemon.core.policies import AllocationPolicy, ClearPolicy, OraclePolicy, UniformPolicy
from daemon.core.windowing import Window, WindowAssembler
from daemon.replay.rollouts import (
    RolloutPool,
    draw_counts,
    oracle_allocation,
    uniform_cap_for_cost,
)
from daemon.replay.simulator import SimulatedBackend, grade, prompt_for
from daemon.replay.traces import Arrival
from schemas.messages import QueryRequest, QueryResult, Status
from solver.fit import ProbePlan
from solver.priors import PriorBook

PolicyName = Literal["clear", "uniform", "oracle"]
POLICIES: tuple[PolicyName, ...] = ("clear", "uniform", "oracle")
# A chain may run this long in replay: longer than any recorded chain, so only budgets bind.
REPLAY_MAX_TOKENS = 1 << 16
DEFAULT_PROBE = ProbePlan(samples=1, tokens=256)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    policy: PolicyName
    budget_per_query: float | None = None
    tokens_per_second: float | None = None
    seed: int = 0
    window_seconds: float = 2.0
    window_max_queries: int = 256
    probe: ProbePlan = DEFAULT_PROBE
    carry_over_windows: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if (self.budget_per_query is None) == (self.tokens_per_second is None):
            raise ValueError("give exactly one of budget_per_query or tokens_per_second")
        for name in ("budget_per_query", "tokens_per_second"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class ReplayQuery:
    arrival: float
    request: QueryRequest
    record: int  # index into the rollout pool


def draw_queries(arrivals: Iterable[Arrival], pool: RolloutPool, seed: int) -> list[ReplayQuery]:
    """One query per arrival, drawing pool records evenly: a seeded shuffle, reshuffled per lap."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    queries = []
    for i, arrival in enumerate(arrivals):
        if not order:
            order = rng.permutation(len(pool)).tolist()
        index = order.pop()
        record = pool.records[index]
        request = QueryRequest(
            id=f"q{i:06d}",
            prompt=prompt_for(record),
            tags={"task": record.benchmark, "model": record.model},
        )
        queries.append(ReplayQuery(arrival.arrival, request, index))
    return queries


def make_policy(
    config: ReplayConfig, pool: RolloutPool, queries: Sequence[ReplayQuery]
) -> AllocationPolicy:
    tokens_per_query = _tokens_per_query(config, queries)
    if config.policy == "clear":
        return ClearPolicy(config.probe, PriorBook())
    if config.policy == "uniform":
        # Cost-matched: the one cap whose expected cost per query equals the budget.
        if config.budget_per_query is None:
            return UniformPolicy()
        return UniformPolicy(round(uniform_cap_for_cost(pool, tokens_per_query)))
    weights = draw_counts(pool, [pool.records[q.record].key for q in queries])
    oracle = oracle_allocation(pool, tokens_per_query, weights=weights)
    return OraclePolicy({q.request.id: int(oracle.caps[q.record]) for q in queries})


def _tokens_per_query(config: ReplayConfig, queries: Sequence[ReplayQuery]) -> float:
    if config.budget_per_query is not None:
        return config.budget_per_query
    span = (queries[-1].arrival - queries[0].arrival) if queries else 0.0
    return config.tokens_per_second * max(span, config.window_seconds) / max(len(queries), 1)


async def replay(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    *,
    on_window: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Replay `queries` on a virtual clock; returns the report of DESIGN.md's replay contract."""
    started = time.perf_counter()
    policy = make_policy(config, pool, queries)
    registry = CollectorRegistry()
    backend = SimulatedBackend(pool, seed=config.seed)
    pipeline = WindowPipeline(
        backend,
        policy,
        PipelineMetrics.create(registry),
        max_tokens_per_query=REPLAY_MAX_TOKENS,
        logger=structlog.get_logger("clearbudget.replay").bind(policy=config.policy),
    )
    ledger = _ledger(config)
    assembler: WindowAssembler[PendingQuery] = WindowAssembler(
        config.window_seconds, config.window_max_queries, queries[0].arrival if queries else 0.0
    )
    results: dict[str, QueryResult] = {}
    budgets: list[float] = []
    solve_ms: list[float] = []

    async def run(window: Window[PendingQuery]) -> None:
        # Budget by time (tokens/second) or by count (tokens per query: "time" is queries).
        span = window.duration if config.tokens_per_second else len(window.items)
        earned = ledger.earned(span)
        budget = ledger.window_budget(span)
        outcome = await pipeline.run(window, budget)
        ledger.settle(budget, outcome.report.spent_tokens)
        budgets.append(earned)
        solve_ms.append(outcome.report.solve_ms)
        results.update((r.id, r) for r in outcome.results)
        if on_window:
            on_window(len(window.items))

    for query in queries:
        for window in assembler.add(PendingQuery(query.request, query.arrival), query.arrival):
            await run(window)
    last = assembler.flush(queries[-1].arrival if queries else 0.0)
    if last is not None:
        await run(last)
    report = score(config, pool, queries, results, started)
    report |= {
        "budget_tokens": sum(budgets),
        "windows": len(budgets),
        "solve_ms_p50": _percentile(solve_ms, 50),
        "solve_ms_p99": _percentile(solve_ms, 99),
    }
    return report


def _ledger(config: ReplayConfig) -> BudgetLedger:
    if config.tokens_per_second is not None:
        rate, window = config.tokens_per_second, config.window_seconds
    else:
        rate, window = float(config.budget_per_query or 0.0), float(config.window_max_queries)
    return BudgetLedger(rate, carry_over_cap_tokens=rate * window * config.carry_over_windows)


def score(
    config: ReplayConfig,
    pool: RolloutPool,
    queries: Sequence[ReplayQuery],
    results: dict[str, QueryResult],
    started: float,
) -> dict[str, Any]:
    """The replay report: outcomes, accuracy against the recorded grades, every token counted."""
    statuses = [results[q.request.id].status for q in queries]
    correct = sum(
        1
        for q in queries
        if (r := results[q.request.id]).status is Status.ANSWERED
        and r.text is not None
        and grade(r.text, pool.records[q.record])
    )
    total = sum(r.tokens_used for r in results.values())
    n = max(len(queries), 1)
    return {
        "policy": config.policy,
        "queries": len(queries),
        "answered": statuses.count(Status.ANSWERED),
        "abandoned": statuses.count(Status.ABANDONED),
        "failed": statuses.count(Status.FAILED),
        "mean_accuracy": correct / n,
        "tokens_total": total,
        "tokens_probe": sum(r.tokens_probe for r in results.values()),
        "tokens_per_query": total / n,
        "budget_tokens": 0.0,
        "windows": 0,
        "solve_ms_p50": 0.0,
        "solve_ms_p99": 0.0,
        "wall_seconds": time.perf_counter() - started,
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0
