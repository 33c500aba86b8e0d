"""The one budget-span rule and the typed replay report, shared by every replay path."""

from __future__ import annotations

import dataclasses

import pytest

from clearbudget.daemon.replay.config import (
    ReplayConfig,
    ReplayQuery,
    budget_ledger,
    ledger_span,
    token_rate,
    tokens_per_query,
    trace_span,
)
from clearbudget.daemon.replay.demo import MIN_WINDOW_SECONDS, daemon_settings
from clearbudget.daemon.replay.report import ReplayReport, score
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import ChainRef, format_marker
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import QueryRequest, QueryResult, Status, reason_codes_of

CONTRACT_KEYS = [
    "policy", "queries", "answered", "abandoned", "failed", "mean_accuracy", "tokens_total",
    "tokens_probe", "tokens_per_query", "budget_tokens", "windows", "solve_ms_p50",
    "solve_ms_p99", "wall_seconds",
]  # fmt: skip


def queries_at(*arrivals: float) -> list[ReplayQuery]:
    return [
        ReplayQuery(t, QueryRequest(id=f"q{i}", prompt="p"), record=0)
        for i, t in enumerate(arrivals)
    ]


# ------------------------------------------------------------------ the span rule


def test_span_is_first_to_last_arrival_at_least_one_window() -> None:
    assert trace_span(queries_at(3.0, 5.0, 13.0), 2.0) == 10.0
    assert trace_span(queries_at(3.0, 4.0), 2.0) == 2.0  # shorter than a window
    assert trace_span([], 2.0) == 2.0
    assert trace_span(queries_at(0.0, 10.0), 0.5, speedup=10.0) == 1.0  # replayed faster


def test_budget_per_query_spreads_over_the_span() -> None:
    queries = queries_at(0.0, 4.0, 6.0, 10.0)
    config = ReplayConfig(policy="clear", budget_per_query=500)
    assert token_rate(config, queries) == pytest.approx(500 * 4 / 10)
    assert token_rate(config, queries, speedup=10.0) == pytest.approx(500 * 4 / 10 * 10)
    assert tokens_per_query(config, queries) == 500


def test_tokens_per_second_is_the_rate_itself() -> None:
    queries = queries_at(0.0, 4.0, 6.0, 10.0)
    config = ReplayConfig(policy="uniform", tokens_per_second=200)
    assert token_rate(config, queries) == 200
    assert token_rate(config, queries, speedup=3.0) == 600
    assert tokens_per_query(config, queries) == pytest.approx(200 * 10 / 4)
    # A one-query trace lasts one window.
    assert tokens_per_query(config, queries_at(7.0)) == pytest.approx(200 * 2.0)


def test_ledger_earns_per_second_or_per_query() -> None:
    by_count = ReplayConfig(policy="clear", budget_per_query=100, window_max_queries=8)
    ledger = budget_ledger(by_count)
    assert ledger.carry_over_cap_tokens == 800
    assert ledger.earned(ledger_span(by_count, 99.0, 3)) == 300
    by_time = ReplayConfig(policy="clear", tokens_per_second=50, window_seconds=2.0)
    ledger = budget_ledger(by_time)
    assert ledger.carry_over_cap_tokens == 100
    assert ledger.earned(ledger_span(by_time, 1.5, 3)) == 75


def test_daemon_settings_take_the_rule_in_wall_clock_terms() -> None:
    queries = queries_at(0.0, 5.0, 20.0)
    config = ReplayConfig(policy="clear", budget_per_query=300, window_seconds=2.0)
    settings = daemon_settings(load_settings({}), config, queries, 10.0, "http://127.0.0.1:9")
    assert settings.tokens_per_second == pytest.approx(token_rate(config, queries, 10.0))
    assert settings.window_seconds == MIN_WINDOW_SECONDS  # 2 s / 10x, clamped
    assert settings.vllm_endpoints == ("http://127.0.0.1:9",)
    # What the daemon earns over the replayed trace is the budget asked for.
    span = trace_span(queries, settings.window_seconds, 10.0)
    assert settings.tokens_per_second * span == pytest.approx(300 * 3)


# ------------------------------------------------------------------ the report


def tiny_pool() -> RolloutPool:
    samples = (RolloutSample(10, True, "7"), RolloutSample(20, False, "8"))
    return RolloutPool([RolloutRecord("m", "b", "p", 5, "7", samples)])


def result(qid: str, status: Status, chain: int | None, used: int, probe: int) -> QueryResult:
    text = None if chain is None else format_marker(ChainRef("m/p", chain, 20))
    return QueryResult(
        id=qid, status=status, text=text, tokens_used=used, tokens_probe=probe,
        allocated_tokens=used, window_id="w0", shadow_price=0.0,
        reason_code=reason_codes_of(status)[0], reason="why" if status is Status.FAILED else None,
    )  # fmt: skip


def test_score_counts_outcomes_and_tokens() -> None:
    queries = queries_at(0.0, 1.0, 2.0)
    results = {
        "q0": result("q0", Status.ANSWERED, 0, 30, 10),  # the right chain, finished
        "q1": result("q1", Status.ANSWERED, 1, 20, 10),  # the wrong one
        "q2": result("q2", Status.ABANDONED, None, 10, 10),
    }
    report = score("clear", tiny_pool(), queries, results, wall_seconds=1.5, budget_tokens=90.0,
                   windows=2, solve_ms=[1.0, 3.0])  # fmt: skip
    assert report.to_dict() == {
        "policy": "clear", "queries": 3, "answered": 2, "abandoned": 1, "failed": 0,
        "mean_accuracy": pytest.approx(1 / 3), "tokens_total": 60, "tokens_probe": 30,
        "tokens_per_query": 20.0, "budget_tokens": 90.0, "windows": 2, "solve_ms_p50": 2.0,
        "solve_ms_p99": pytest.approx(2.98), "wall_seconds": 1.5,
    }  # fmt: skip
    assert list(report.to_dict()) == CONTRACT_KEYS
    later = dataclasses.replace(report, wall_seconds=9.0)
    assert (later.wall_seconds, report.wall_seconds) == (9.0, 1.5)


def test_report_is_frozen_and_holds_exactly_the_contract() -> None:
    assert [f.name for f in dataclasses.fields(ReplayReport)] == CONTRACT_KEYS
    report = score("uniform", tiny_pool(), [], {}, wall_seconds=0.0)
    assert (report.queries, report.mean_accuracy, report.solve_ms_p99) == (0, 0.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.windows = 3  # type: ignore[misc]
