"""The daemon's consume loop with an in-memory consumer: admit, window, publish, commit, drain."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.budget import BudgetLedger
from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import WindowPipeline
from clearbudget.daemon.core.policies import AllocationPolicy, UniformPolicy
from clearbudget.daemon.core.ports import CompletionBackend
from clearbudget.daemon.kafka.intake import Intake
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.kafka.sinks import FatalPublishError
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.schemas.messages import DeadLetter, QueryRequest, QueryResult, Status, WindowReport
from tests.support.backends import SlowBackend
from tests.support.waiting import until

TOPIC = "clear.queries"
POOL = RolloutPool(
    [
        RolloutRecord(
            model="m",
            benchmark="b",
            problem_id="p",
            prompt_tokens=10,
            gold="7",
            samples=(RolloutSample(tokens=100, correct=True, answer="7"),) * 2,
        )
    ]
)


class MemoryConsumer:
    """A consumer over in-memory partitions: assigns them all on the first poll."""

    def __init__(self, partitions: int) -> None:
        self.logs: dict[TopicPartition, list[bytes]] = {
            TopicPartition(TOPIC, p): [] for p in range(partitions)
        }
        self.positions = dict.fromkeys(self.logs, 0)
        self.committed: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self._listener: ConsumerRebalanceListener | None = None
        self._assigned: set[TopicPartition] = set()

    async def rebalance(self) -> None:
        """An eager rebalance that gives this member the same partitions back: everything is
        revoked, then fetching restarts from the committed offsets."""
        assert self._listener is not None
        await self._listener.on_partitions_revoked(set(self._assigned))
        self.positions = {tp: self.committed.get(tp, 0) for tp in self.logs}
        await self._listener.on_partitions_assigned(set(self._assigned))

    def append(self, partition: int, value: bytes) -> None:
        self.logs[TopicPartition(TOPIC, partition)].append(value)

    def subscribe(self, topics: list[str], *, listener: ConsumerRebalanceListener) -> None:
        assert topics == [TOPIC]
        self._listener = listener

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        if not self._assigned and self._listener is not None:
            self._assigned = set(self.logs)
            await self._listener.on_partitions_assigned(self._assigned)
        await asyncio.sleep(0.001)
        batch = {}
        for tp in self._assigned - self.paused:
            start = self.positions[tp]
            values = self.logs[tp][start:]
            if values:
                batch[tp] = [_record(tp, start + i, v) for i, v in enumerate(values)]
                self.positions[tp] = start + len(values)
        return batch

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused.difference_update(partitions)

    async def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        self.committed.update(offsets or {})

    async def topics(self) -> set[str]:
        return {TOPIC}

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.logs[partition]) if partition in self._assigned else None

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp]) for tp in partitions}

    async def position(self, partition: TopicPartition) -> int:
        return self.positions[partition]

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {tp.partition for tp in self.logs} if topic == TOPIC else None


def _record(tp: TopicPartition, offset: int, value: bytes) -> ConsumerRecord[Any, Any]:
    size = len(value)
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, None, value, None, 0, size, ())


class MemorySink:
    def __init__(self) -> None:
        self.results: list[QueryResult] = []
        self.dead_letters: list[DeadLetter] = []
        self.windows: list[WindowReport] = []

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        self.results.extend(results)

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        self.dead_letters.extend(records)

    async def publish_window(self, report: WindowReport) -> None:
        self.windows.append(report)


def make_daemon(
    consumer: MemoryConsumer,
    sink: MemorySink,
    backend: CompletionBackend | None = None,
    *,
    policy: AllocationPolicy | None = None,
    ledger: BudgetLedger | None = None,
    registry: CollectorRegistry | None = None,
    **kwargs: Any,
) -> Daemon:
    metrics = PipelineMetrics.create(registry or CollectorRegistry())
    pipeline = WindowPipeline(
        backend or SimulatedBackend(POOL),
        policy or UniformPolicy(cap=500),
        metrics,
        max_tokens_per_query=1 << 16,
    )
    options: dict[str, Any] = {"window_seconds": 0.05, "window_max_queries": 10} | kwargs
    return Daemon(
        consumer=consumer,
        sink=sink,
        pipeline=pipeline,
        ledger=ledger or BudgetLedger(tokens_per_second=1e6, carry_over_cap_tokens=0.0),
        intake=Intake(),
        metrics=metrics,
        input_topic=TOPIC,
        **options,
    )


def query(i: int) -> bytes:
    request = QueryRequest(id=f"q{i}", prompt=prompt_for(POOL.records[0]))
    return request.model_dump_json().encode()


async def run_until(daemon: Daemon, done: Any) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await until(done, within_s=10.0)
    finally:
        stop.set()
        await task


async def test_every_record_gets_one_result_and_offsets_commit_past_it() -> None:
    consumer, sink = MemoryConsumer(partitions=2), MemorySink()
    for i in range(25):
        consumer.append(i % 2, query(i))
    consumer.append(0, b"not json")
    daemon = make_daemon(consumer, sink)
    await run_until(daemon, lambda: len(sink.results) == 25 and sink.dead_letters)
    assert daemon.assigned.is_set()
    assert sorted(r.id for r in sink.results) == sorted(f"q{i}" for i in range(25))
    assert {r.status for r in sink.results} == {Status.ANSWERED}
    (letter,) = sink.dead_letters
    assert (letter.partition, letter.offset) == (0, 13)
    assert consumer.committed == {TopicPartition(TOPIC, 0): 14, TopicPartition(TOPIC, 1): 12}
    assert sum(w.counts.answered for w in sink.windows) == 25


async def test_a_duplicate_id_in_one_window_goes_to_the_dlq_not_run_twice() -> None:
    consumer, sink = MemoryConsumer(partitions=1), MemorySink()
    consumer.append(0, query(1))
    consumer.append(0, query(1))
    daemon = make_daemon(consumer, sink, window_seconds=5.0)
    await run_until(daemon, lambda: len(sink.results) == 1 and bool(sink.dead_letters))
    assert [r.status for r in sink.results] == [Status.ANSWERED]  # one result per id
    (letter,) = sink.dead_letters
    assert (letter.query_id, letter.offset) == ("q1", 1)


async def test_shutdown_leaves_the_unstarted_window_uncommitted_for_a_restart() -> None:
    """Started now, the open window would run on no budget: it is left in Kafka instead."""
    consumer, sink = MemoryConsumer(partitions=1), MemorySink()
    for i in range(3):
        consumer.append(0, query(i))
    daemon = make_daemon(consumer, sink, window_seconds=3600.0)  # never closes by itself
    await run_until(daemon, lambda: consumer.positions[TopicPartition(TOPIC, 0)] == 3)
    assert sink.results == []
    assert consumer.committed == {}
    restarted = make_daemon(consumer, sink, window_seconds=0.05)
    consumer.positions = dict.fromkeys(consumer.logs, 0)
    await run_until(restarted, lambda: len(sink.results) == 3)
    assert sorted(r.id for r in sink.results) == ["q0", "q1", "q2"]
    assert consumer.committed == {TopicPartition(TOPIC, 0): 3}


async def test_windows_in_flight_stay_bounded_and_the_partitions_pause() -> None:
    consumer, sink = MemoryConsumer(partitions=1), MemorySink()
    gate = asyncio.Event()

    class HeldSink(MemorySink):
        waiting = 0
        most_waiting = 0

        async def publish_results(self, results: Sequence[QueryResult]) -> None:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
            await gate.wait()
            self.waiting -= 1
            await super().publish_results(results)

    sink = HeldSink()
    for i in range(40):
        consumer.append(0, query(i))
    daemon = make_daemon(consumer, sink, window_max_queries=2, max_windows_in_flight=1)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await until(lambda: bool(consumer.paused))
    gate.set()
    await until(lambda: len(sink.results) == 40, within_s=10.0)
    await until(lambda: not consumer.paused)
    stop.set()
    await task
    assert consumer.committed == {TopicPartition(TOPIC, 0): 40}
    assert sink.most_waiting == 1  # one batch closed 20 windows; one ran at a time


class FetchedHighwater(MemoryConsumer):
    """Like aiokafka's: the highwater is what the last fetch of the partition said."""

    def __init__(self, partitions: int) -> None:
        super().__init__(partitions)
        self.fetched_ends: dict[TopicPartition, int] = {}

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        batch = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        for tp in self._assigned - self.paused:
            self.fetched_ends[tp] = len(self.logs[tp])
        return batch

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.fetched_ends.get(partition)


async def test_the_lag_keeps_counting_what_arrives_while_the_partitions_are_paused() -> None:
    consumer, sink = FetchedHighwater(partitions=1), MemorySink()
    ready = True
    registry = CollectorRegistry()
    daemon = make_daemon(consumer, sink, backend_ready=lambda: ready,
                         broker_check_interval_s=0.05, registry=registry)  # fmt: skip
    lag = registry.get_sample_value
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    for i in range(5):
        consumer.append(0, query(i))
    await until(lambda: len(sink.results) == 5)
    ready = False  # no pod: the loop pauses its partitions
    await until(lambda: bool(consumer.paused))
    for i in range(5, 35):
        consumer.append(0, query(i))
    await until(lambda: lag("clear_consumer_lag") == 30)
    assert consumer.highwater(TopicPartition(TOPIC, 0)) == 5  # no fetch told it of the 30
    ready = True
    await until(lambda: len(sink.results) == 35)
    await until(lambda: lag("clear_consumer_lag") == 0)
    stop.set()
    await task


async def test_a_backlog_waiting_before_anything_was_read_counts_as_lag() -> None:
    consumer, sink = FetchedHighwater(partitions=2), MemorySink()
    daemon = make_daemon(consumer, sink, backend_ready=lambda: False,
                         broker_check_interval_s=0.05, registry=(registry := CollectorRegistry()))
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await until(lambda: bool(consumer.paused))  # no pod from the start: nothing read
    for i in range(12):
        consumer.append(i % 2, query(i))
    await until(lambda: registry.get_sample_value("clear_consumer_lag") == 12)
    stop.set()
    await task


async def test_end_offsets_that_fail_keep_the_broker_healthy_and_the_loop_going() -> None:
    class NoEndOffsets(FetchedHighwater):
        asked = 0

        async def end_offsets(
            self, partitions: list[TopicPartition]
        ) -> dict[TopicPartition, int]:
            self.asked += 1
            raise KafkaConnectionError("leader moving")

    consumer, sink = NoEndOffsets(partitions=1), MemorySink()
    ready = False
    daemon = make_daemon(consumer, sink, backend_ready=lambda: ready,
                         broker_check_interval_s=0.05)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await until(lambda: consumer.asked >= 3)  # paused, and asked again at each check
    assert daemon.broker_health.ok
    consumer.append(0, query(0))
    ready = True
    await until(lambda: len(sink.results) == 1)
    stop.set()
    await task


@pytest.mark.parametrize("in_flight", [4, 1])
async def test_a_revoke_finishes_running_windows_and_the_reread_gives_one_result_per_id(
    in_flight: int,
) -> None:
    """Running windows publish before the hand-over; windows not started (queued, or held by
    the dispatcher for a slot when `in_flight` is 1) are dropped and re-read: every id gets
    exactly one result, and the commit covers all."""
    consumer, sink = MemoryConsumer(partitions=2), MemorySink()
    slow = SlowBackend(SimulatedBackend(POOL), delay_s=0.3)
    for i in range(12):
        consumer.append(i % 2, query(i))
    daemon = make_daemon(
        consumer, sink, slow, window_max_queries=4, max_windows_in_flight=in_flight
    )
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await until(lambda: sum(consumer.positions.values()) == 12)  # all read, windows running
    await until(lambda: bool(daemon._running))
    await consumer.rebalance()
    published_by_revoke = len(sink.results)
    assert published_by_revoke >= 4  # at least the running window finished and published
    slow.delay_s = 0.0
    await until(lambda: len(sink.results) >= 12)
    await asyncio.sleep(0.3)  # a duplicate, if any, would land now
    stop.set()
    await task
    assert sorted(r.id for r in sink.results) == sorted(f"q{i}" for i in range(12))
    assert consumer.committed == {TopicPartition(TOPIC, 0): 6, TopicPartition(TOPIC, 1): 6}


async def test_a_backlog_is_paced_at_the_budget_rate_not_dumped_into_starved_windows() -> None:
    consumer, sink = MemoryConsumer(partitions=1), MemorySink()
    for i in range(100):
        consumer.append(0, query(i))  # queued before start; each needs 100 tokens
    rate, window_s, cap = 10_000.0, 0.05, 500.0
    ledger = BudgetLedger(tokens_per_second=rate, carry_over_cap_tokens=cap)
    daemon = make_daemon(
        consumer, sink, policy=UniformPolicy(), ledger=ledger, window_seconds=window_s,
        window_max_queries=256, min_tokens_per_query=100,
    )  # fmt: skip
    started = asyncio.get_running_loop().time()
    await run_until(daemon, lambda: len(sink.results) == 100)
    elapsed = asyncio.get_running_loop().time() - started
    assert {r.status for r in sink.results} == {Status.ANSWERED}  # none starved, none dropped
    assert all(w.budget_tokens >= 100 * (w.counts.answered) for w in sink.windows)
    spent = sum(r.tokens_used for r in sink.results)
    assert spent == 100 * 100
    assert spent <= rate * elapsed + cap  # the rate held over the burst
    assert ledger.outstanding <= ledger.earned_total + 1e-6


async def test_a_refusing_results_topic_stops_the_daemon_and_commits_nothing_more() -> None:
    consumer = MemoryConsumer(partitions=1)

    class RefusingSink(MemorySink):
        async def publish_results(self, results: Sequence[QueryResult]) -> None:
            raise FatalPublishError("results: TopicAuthorizationFailedError")

    for i in range(5):
        consumer.append(0, query(i))
    daemon = make_daemon(consumer, RefusingSink())
    stop = asyncio.Event()
    await asyncio.wait_for(daemon.run(stop), 10)  # returns by itself: no SIGTERM needed
    assert daemon.state.fatal_error is not None
    assert "TopicAuthorizationFailedError" in daemon.state.fatal_error
    assert consumer.committed == {}


async def test_a_report_waiting_for_its_ack_does_not_hold_the_next_window_back() -> None:
    """Window reports are best-effort: with one window in flight, a report that hangs must not
    keep the slot, or every later window would wait on it."""
    release = asyncio.Event()

    class HangingReports(MemorySink):
        async def publish_window(self, report: WindowReport) -> None:
            await release.wait()
            await super().publish_window(report)

    consumer, sink = MemoryConsumer(partitions=1), HangingReports()
    for i in range(12):
        consumer.append(0, query(i))
    daemon = make_daemon(consumer, sink, window_max_queries=2, max_windows_in_flight=1)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await until(lambda: len(sink.results) == 12, within_s=10.0)  # six windows, one slot
        await until(lambda: consumer.committed == {TopicPartition(TOPIC, 0): 12})
    finally:
        release.set()
        stop.set()
        await task


async def test_a_report_that_raises_never_gives_published_queries_a_second_result() -> None:
    class BrokenReports(MemorySink):
        async def publish_window(self, report: WindowReport) -> None:
            raise RuntimeError("report encoder broke")

    consumer, sink = MemoryConsumer(partitions=1), BrokenReports()
    for i in range(6):
        consumer.append(0, query(i))
    daemon = make_daemon(consumer, sink, window_max_queries=2)
    await run_until(daemon, lambda: consumer.committed == {TopicPartition(TOPIC, 0): 6})
    assert sorted(r.id for r in sink.results) == [f"q{i}" for i in range(6)]  # once each
    assert {r.status for r in sink.results} == {Status.ANSWERED}
