"""The replay report (DESIGN.md's replay contract) and the scoring that builds it.

Every replay path (in-process, through Kafka, the demo) scores its results here, so all report
the same keys, counted the same way: every generated token, probes included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clearbudget.daemon.replay.config import ReplayQuery
from clearbudget.daemon.replay.rollouts import RolloutPool
from clearbudget.daemon.replay.simulator import grade
from clearbudget.schemas.messages import QueryResult, Status


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """One replay's outcome; `to_dict()` is the JSON report, keys in this order."""

    policy: str
    queries: int
    answered: int
    abandoned: int
    failed: int
    mean_accuracy: float
    tokens_total: int
    tokens_probe: int
    tokens_per_query: float
    budget_tokens: float
    windows: int
    solve_ms_p50: float
    solve_ms_p99: float
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def score(
    policy: str,
    pool: RolloutPool,
    queries: Sequence[ReplayQuery],
    results: Mapping[str, QueryResult],
    *,
    wall_seconds: float,
    budget_tokens: float = 0.0,
    windows: int = 0,
    solve_ms: Sequence[float] = (),
) -> ReplayReport:
    """The report of `results` (one per query): outcomes, accuracy against the recorded grades,
    every token counted; the rest as the replay path measured it."""
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
    return ReplayReport(
        policy=policy,
        queries=len(queries),
        answered=statuses.count(Status.ANSWERED),
        abandoned=statuses.count(Status.ABANDONED),
        failed=statuses.count(Status.FAILED),
        mean_accuracy=correct / n,
        tokens_total=total,
        tokens_probe=sum(r.tokens_probe for r in results.values()),
        tokens_per_query=total / n,
        budget_tokens=budget_tokens,
        windows=windows,
        solve_ms_p50=_percentile(solve_ms, 50),
        solve_ms_p99=_percentile(solve_ms, 99),
        wall_seconds=wall_seconds,
    )


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0
