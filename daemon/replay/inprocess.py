"""Trace replay: recorded arrivals, each a query drawn from a rollout pool, through the real
window pipeline on a virtual clock, scored against the recorded grades.

Every policy runs through the same pipeline and the same simulated backend, so the report
counts every generated token (probes included) identically for clear, uniform and oracle.

With `config.feedback`, the replay plays the downstream grader: every answered query's
recorded grade (`simulator.grade` of the answer it published, as the report scores it) reaches
the policy's `feedback` `config.feedback_delay` trace seconds after its window ran, before the
first window that starts at or after that moment. A window runs at the trace time it closes, so
no query's grade exists before it was answered, and the policy deciding a query never reads its
own grade.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

import structlog
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery, WindowPipeline
from clearbudget.daemon.core.policies import AllocationPolicy
from clearbudget.daemon.core.windowing import Window, WindowAssembler
from clearbudget.daemon.replay.config import (
    REPLAY_MAX_TOKENS,
    ReplayConfig,
    ReplayQuery,
    budget_ledger,
    ledger_span,
    make_policy,
)
from clearbudget.daemon.replay.report import ReplayReport, score
from clearbudget.daemon.replay.rollouts import RolloutPool
from clearbudget.daemon.replay.simulator import SimulatedBackend, grade
from clearbudget.schemas.messages import QueryResult, Status


async def replay(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    *,
    on_window: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Replay `queries` on a virtual clock; returns the report of DESIGN.md's replay contract."""
    started = time.perf_counter()
    metrics = PipelineMetrics.create(CollectorRegistry())
    policy = make_policy(config, pool, queries)
    pipeline = _pipeline(config, pool, policy, metrics)
    ledger = budget_ledger(config)
    assembler: WindowAssembler[PendingQuery] = WindowAssembler(
        config.window_seconds, config.window_max_queries, queries[0].arrival if queries else 0.0
    )
    grader = None
    if config.feedback:
        grader = _Grader(pool, queries, policy, metrics, config.feedback_delay)
    results: dict[str, QueryResult] = {}
    budgets: list[float] = []
    solve_ms: list[float] = []

    async def run(window: Window[PendingQuery], now: float) -> None:
        if grader is not None:
            grader.deliver(now)
        span = ledger_span(config, window.duration, len(window.items))
        earned = ledger.earned(span)
        budget = ledger.reserve(span)  # earned + the carry, which this window takes
        outcome = await pipeline.run(window, budget, carry_room=ledger.carry_room)
        ledger.settle(budget, outcome.report.spent_tokens)
        budgets.append(earned)
        solve_ms.append(outcome.report.solve_ms)
        results.update((r.id, r) for r in outcome.results)
        if grader is not None:
            grader.published(outcome.results, now)
        if on_window:
            on_window(len(window.items))

    for query in queries:
        for window in assembler.add(PendingQuery(query.request, query.arrival), query.arrival):
            await run(window, query.arrival)
    end = queries[-1].arrival if queries else 0.0
    last = assembler.flush(end)
    if last is not None:
        await run(last, end)
    return score(
        config.policy, pool, queries, results,
        wall_seconds=time.perf_counter() - started,
        budget_tokens=sum(budgets), windows=len(budgets), solve_ms=solve_ms,
    )  # fmt: skip


def _pipeline(
    config: ReplayConfig, pool: RolloutPool, policy: AllocationPolicy, metrics: PipelineMetrics
) -> WindowPipeline:
    """The product's window pipeline with `policy` and the simulator as backend."""
    return WindowPipeline(
        SimulatedBackend(pool, seed=config.seed),
        policy,
        metrics,
        max_tokens_per_query=REPLAY_MAX_TOKENS,
        thinking_answer_tokens=config.thinking_answer_allowance,
        logger=structlog.get_logger("clearbudget.replay").bind(policy=config.policy),
    )


class _Grader:
    """The downstream grader of a replay: grades each answered result as the report scores it
    and hands the verdict to the policy `delay` trace seconds later (module docstring)."""

    def __init__(
        self,
        pool: RolloutPool,
        queries: Sequence[ReplayQuery],
        policy: AllocationPolicy,
        metrics: PipelineMetrics,
        delay: float,
    ) -> None:
        self._pool = pool
        self._records = {q.request.id: q.record for q in queries}
        self._policy = policy
        self._metrics = metrics
        self._delay = delay
        self._due: list[tuple[float, int, str, bool]] = []  # (due, sequence, id, correct)
        self._sequence = 0

    def published(self, results: Sequence[QueryResult], now: float) -> None:
        for result in results:
            if result.status is not Status.ANSWERED or result.text is None:
                continue
            record = self._pool.records[self._records[result.id]]
            due = (now + self._delay, self._sequence, result.id, grade(result.text, record))
            heapq.heappush(self._due, due)
            self._sequence += 1

    def deliver(self, now: float) -> None:
        """Every grade due by `now`, in the order they fell due."""
        while self._due and self._due[0][0] <= now:
            _, _, query_id, correct = heapq.heappop(self._due)
            outcome = self._policy.feedback(query_id, correct)
            self._metrics.feedback.labels(outcome=outcome).inc()
