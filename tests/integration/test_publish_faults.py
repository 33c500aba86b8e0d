"""Publish faults on the real path: Tansu broker → daemon (real sink, real producer) → recorded-
rollout simulator over HTTP. A result over the producer's request size is re-published once, cut;
a window-report topic that is missing or deleted never holds results back; a topic created
mid-run changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.kafka.sinks import CUT_TEXT_REASON
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.sim_server import start_simulator
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.settings import Settings, load_settings
from clearbudget.schemas.messages import (
    QueryRequest,
    QueryResult,
    ReasonCode,
    Status,
    WindowReport,
)
from tests.integration.test_daemon_kafka import read_all
from tests.support.waiting import until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

# The daemon's producer keeps aiokafka's default max_request_size (1 MiB; no CLEAR_* setting
# changes it). A result carries its answer twice (`answer`, and `text` ending in
# \boxed{answer}): a 600 kB answer makes a ~1.2 MB result, and ~600 kB once its text is cut.
PRODUCER_MAX_REQUEST_BYTES = 1_048_576
HUGE_ANSWER = "x" * 600_000  # not a number: normalised, "99…9" would be "inf"


def _record(problem_id: str, answer: str) -> RolloutRecord:
    sample = RolloutSample(tokens=50, correct=True, answer=answer)
    return RolloutRecord("m", "b", problem_id, 10, answer, (sample,))


SMALL = _record("small", "7")
HUGE = _record("huge", HUGE_ANSWER)
POOL = RolloutPool([SMALL, HUGE])


def _settings(broker: EmbeddedBroker, topics: Sequence[str], url: str, **extra: str) -> Settings:
    queries, results, dlq = topics
    return load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": broker.bootstrap,
            "CLEAR_INPUT_TOPIC": queries,
            "CLEAR_RESULT_TOPIC": results,
            "CLEAR_DLQ_TOPIC": dlq,
            "CLEAR_WINDOW_TOPIC": "",
            "CLEAR_CONSUMER_GROUP": f"g-{queries}",
            "CLEAR_VLLM_ENDPOINTS": url,
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "20000",
            "CLEAR_WINDOW_SECONDS": "0.3",
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
            **extra,
        },
        env_file=None,
    )


@contextlib.asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[list[Daemon]]:
    """The daemon, on the simulator its settings name, until the block ends (then stopped)."""
    stop = asyncio.Event()
    started: list[Daemon] = []
    task = asyncio.create_task(
        run_daemon(settings, stop, registry=CollectorRegistry(), on_start=started.append)
    )
    try:
        await until(lambda: bool(started) or task.done(), 30)
        assert not task.done(), "the daemon stopped at start-up"
        yield started
        assert not task.done(), "the daemon stopped by itself"
        assert started[0].state.fatal_error is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _send(bootstrap: str, topic: str, queries: Sequence[tuple[str, RolloutRecord]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for qid, record in queries:
            query = QueryRequest(id=qid, prompt=prompt_for(record))
            await producer.send(topic, query.model_dump_json().encode(), key=qid.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _results(bootstrap: str, topic: str, want: int) -> list[QueryResult]:
    raw = await read_all(bootstrap, topic, want, timeout_s=30)
    return [QueryResult.model_validate_json(v) for v in raw]


def _one_each(results: Sequence[QueryResult], ids: Sequence[str]) -> dict[str, QueryResult]:
    """The results by id, asserting exactly one per expected id and nothing else."""
    counts = Counter(r.id for r in results)
    assert {i: n for i, n in counts.items() if n > 1} == {}, "duplicate results"
    assert sorted(counts) == sorted(ids), "missing or unexpected results"
    return {r.id: r for r in results}


async def _committed(settings: Settings) -> int:
    """The group's committed offset on the (one) input partition, asserting that a member of
    the group, restarted there, would re-read nothing (the pattern of test_daemon_kafka: by
    assignment, not by a group join, which Tansu answers slowly after a member leaves)."""
    checker = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await checker.start()
    try:
        partition = TopicPartition(settings.input_topic, 0)
        checker.assign([partition])
        committed = await checker.committed(partition) or 0
        assert await checker.getmany(timeout_ms=1500) == {}, "uncommitted queries left"
        return committed
    finally:
        await checker.stop()


async def test_an_oversized_result_is_published_once_cut_and_committed(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    simulator = await start_simulator(SimulatedBackend(POOL, seed=0), port=0)
    settings = _settings(kafka_broker, topics, simulator.url)
    small_ids = [f"s{i}" for i in range(6)]
    # The huge query sits among small ones, so it shares their windows' publishes.
    queries = [(i, SMALL) for i in small_ids[:3]] + [("big", HUGE)]
    queries += [(i, SMALL) for i in small_ids[3:]]
    try:
        async with _running(settings):
            await _send(kafka_broker.bootstrap, topics[0], queries)
            results = await _results(kafka_broker.bootstrap, topics[1], len(queries))
            by_id = _one_each(results, [q for q, _ in queries])
            assert await read_all(kafka_broker.bootstrap, topics[2], 0) == []

            big = by_id["big"]
            assert big.status is Status.ANSWERED
            assert big.text is None
            assert big.reason is not None
            assert big.reason.endswith(CUT_TEXT_REASON)
            assert big.answer == HUGE_ANSWER  # the answer stays: only the bulk is cut
            for qid in small_ids:
                assert by_id[qid].status is Status.ANSWERED
                assert by_id[qid].text is not None, qid
                assert CUT_TEXT_REASON not in (by_id[qid].reason or ""), qid

        # Every offset was committed: the group, restarted, re-reads nothing.
        assert await _committed(settings) == len(queries)
    finally:
        await simulator.close()


def test_the_huge_result_really_exceeds_the_producer_limit() -> None:
    """Guards the test above: its result is over the limit whole, and under it once cut."""
    result = QueryResult(
        id="big", status=Status.ANSWERED, answer=HUGE_ANSWER, text=f"x\\boxed{{{HUGE_ANSWER}}}",
        tokens_used=50, tokens_probe=50, allocated_tokens=0, shadow_price=None, window_id=None,
        reason_code=ReasonCode.PROBE_ANSWERED,
    )  # fmt: skip
    assert len(result.model_dump_json()) > PRODUCER_MAX_REQUEST_BYTES
    cut = result.model_copy(update={"text": None})
    assert len(cut.model_dump_json()) < PRODUCER_MAX_REQUEST_BYTES


async def test_a_missing_window_topic_never_holds_results_back(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    simulator = await start_simulator(SimulatedBackend(POOL, seed=0), port=0)
    missing = f"no-such-windows-{uuid.uuid4().hex[:10]}"
    settings = _settings(kafka_broker, topics, simulator.url, CLEAR_WINDOW_TOPIC=missing)
    first, second = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]
    try:
        async with _running(settings):
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in first])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 5), first)
            # Still consuming: a later batch is served too.
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in second])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 10), first + second)
        assert await _committed(settings) == 10
    finally:
        await simulator.close()


async def test_a_window_topic_deleted_mid_run_never_holds_results_back(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    windows = await kafka_topic("windows")
    simulator = await start_simulator(SimulatedBackend(POOL, seed=0), port=0)
    settings = _settings(kafka_broker, topics, simulator.url, CLEAR_WINDOW_TOPIC=windows)
    first, second = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        async with _running(settings):
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in first])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 5), first)
            # The reports were on: the topic held at least one before it went.
            reports = await read_all(kafka_broker.bootstrap, windows, 1)
            assert [WindowReport.model_validate_json(r) for r in reports]

            await admin.delete_topics([windows])
            assert windows not in await admin.list_topics()
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in second])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 10), first + second)
            assert await read_all(kafka_broker.bootstrap, topics[2], 0) == []
        assert await _committed(settings) == 10
    finally:
        await admin.close()
        await simulator.close()


async def test_a_topic_created_mid_run_changes_nothing(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    simulator = await start_simulator(SimulatedBackend(POOL, seed=0), port=0)
    settings = _settings(kafka_broker, topics, simulator.url)
    first, second = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)]
    try:
        async with _running(settings):
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in first])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 5), first)
            unrelated = await kafka_topic("unrelated", partitions=3)
            await _send(kafka_broker.bootstrap, topics[0], [(i, SMALL) for i in second])
            _one_each(await _results(kafka_broker.bootstrap, topics[1], 10), first + second)
            assert await read_all(kafka_broker.bootstrap, topics[2], 0) == []
            assert await read_all(kafka_broker.bootstrap, unrelated, 0) == []
        assert await _committed(settings) == 10
    finally:
        await simulator.close()
