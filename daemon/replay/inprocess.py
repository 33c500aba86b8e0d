"""Trace replay: recorded arrivals, each a query drawn from a rollout pool, through the real
window pipeline on a virtual clock, scored against the recorded grades.

Every policy runs through the same pipeline and the same simulated backend, so the report
counts every generated token (probes included) identically for clear, uniform and oracle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import structlog
from prometheus_client import CollectorRegistry

from daemon.core.metrics import PipelineMetrics
from daemon.core.pipeline import PendingQuery, WindowPipeline
from daemon.core.windowing import Window, WindowAssembler
from daemon.replay.config import (
    REPLAY_MAX_TOKENS,
    ReplayConfig,
    ReplayQuery,
    budget_ledger,
    ledger_span,
    make_policy,
)
from daemon.replay.report import ReplayReport, score
from daemon.replay.rollouts import RolloutPool
from daemon.replay.simulator import SimulatedBackend
from schemas.messages import QueryResult


async def replay(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    *,
    on_window: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Replay `queries` on a virtual clock; returns the report of DESIGN.md's replay contract."""
    started = time.perf_counter()
    pipeline = _pipeline(config, pool, queries)
    ledger = budget_ledger(config)
    assembler: WindowAssembler[PendingQuery] = WindowAssembler(
        config.window_seconds, config.window_max_queries, queries[0].arrival if queries else 0.0
    )
    results: dict[str, QueryResult] = {}
    budgets: list[float] = []
    solve_ms: list[float] = []

    async def run(window: Window[PendingQuery]) -> None:
        span = ledger_span(config, window.duration, len(window.items))
        earned = ledger.earned(span)
        budget = ledger.reserve(span)  # earned + the carry, which this window takes
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
    return score(
        config.policy, pool, queries, results,
        wall_seconds=time.perf_counter() - started,
        budget_tokens=sum(budgets), windows=len(budgets), solve_ms=solve_ms,
    )  # fmt: skip


def _pipeline(
    config: ReplayConfig, pool: RolloutPool, queries: Sequence[ReplayQuery]
) -> WindowPipeline:
    """The product's window pipeline with `config`'s policy and the simulator as backend."""
    return WindowPipeline(
        SimulatedBackend(pool, seed=config.seed),
        make_policy(config, pool, queries),
        PipelineMetrics.create(CollectorRegistry()),
        max_tokens_per_query=REPLAY_MAX_TOKENS,
        logger=structlog.get_logger("clearbudget.replay").bind(policy=config.policy),
    )
