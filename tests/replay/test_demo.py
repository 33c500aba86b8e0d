"""The demo and `replay --kafka` rig raise exceptions (the CLI words them) and report progress
through a callback; one run through a real embedded broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import clearbudget.daemon.replay.demo
from clearbudget.daemon.replay.config import ReplayConfig, draw_queries
from clearbudget.daemon.replay.demo import demo_settings, replay_with_simulator, run_demo
from clearbudget.daemon.replay.embedded import BrokerStartError, start_embedded_broker
from clearbudget.daemon.replay.report import ReplayReport
from clearbudget.daemon.replay.rollouts import load_rollouts
from clearbudget.daemon.replay.traces import read_trace


@pytest.fixture(scope="module")
def inputs(shared_data: Path):
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    queries = draw_queries(read_trace(shared_data / "azure_llm_conv_2023.csv", limit=60), pool, 0)
    return pool, queries


DEMO = ("uniform", "clear")
CONFIGS = [ReplayConfig(policy=p, budget_per_query=500) for p in DEMO]


def test_a_broker_that_cannot_start_is_an_exception(
    monkeypatch: pytest.MonkeyPatch, inputs
) -> None:
    def no_broker() -> None:
        raise BrokerStartError("no tansu here")

    monkeypatch.setattr(clearbudget.daemon.replay.demo, "start_embedded_broker", no_broker)
    lines: list[str] = []
    with pytest.raises(BrokerStartError, match="no tansu"):
        run_demo(*inputs, CONFIGS, speedup=10.0, on_progress=lines.append)
    assert lines == []


def test_a_bad_speedup_is_a_value_error(inputs) -> None:
    with pytest.raises(ValueError, match="speedup"):
        run_demo(*inputs, CONFIGS, speedup=0.0)


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_runs_both_policies_through_kafka(inputs) -> None:
    pool, queries = inputs
    lines: list[str] = []
    reports = run_demo(pool=pool, queries=queries, configs=CONFIGS, speedup=20.0,
                       on_progress=lines.append)  # fmt: skip
    assert tuple(r.policy for r in reports) == DEMO
    assert lines == [
        f"  {p}: 60 queries through Kafka at 20x pace ..." for p in ("uniform", "clear")
    ]
    for report in reports:
        assert report.queries == 60
        assert report.answered + report.abandoned + report.failed == 60
        assert report.windows >= 1
        assert report.wall_seconds > 0
        # The budget asked for, spread over the replayed trace (what the daemon spends can
        # exceed it: its windows keep earning while the results drain).
        assert report.budget_tokens == pytest.approx(500 * 60, rel=1e-6)
        assert report.tokens_total > 0


@pytest.mark.kafka
@pytest.mark.slow
def test_replays_on_the_same_topics_score_only_their_own_results(inputs) -> None:
    """`replay --kafka` against one set of topics, twice: the second run (clear, which probes)
    must not score the first run's results (uniform, which never probes), though the
    recorded query ids are the same."""
    pool, queries = inputs
    broker = start_embedded_broker()
    try:
        base = demo_settings(broker.bootstrap, "shared")

        async def both() -> list[ReplayReport]:
            return [
                await replay_with_simulator(queries, pool, config, base, speedup=20.0)
                for config in CONFIGS
            ]

        first, second = asyncio.run(both())
    finally:
        broker.stop()
    assert (first.policy, first.tokens_probe) == ("uniform", 0)
    assert second.policy == "clear"
    assert second.queries == 60
    assert second.tokens_probe > 0  # its own results, not the first run's
