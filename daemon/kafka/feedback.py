"""The feedback topic's reader: a grader's verdicts in, the policy corrected, bad records to the
DLQ (`CLEAR_FEEDBACK_TOPIC`; unset, none of this runs).

A grade is only of use to the replica that served the query (the one whose policy remembers
it), and no replica knows which that was, so every replica reads every partition of the
feedback topic with a consumer of its own outside the consumer group: it never joins,
rebalances or moves the group that shares the input partitions, and the input offsets, their
commits and the revoke fencing (`daemon.kafka.service`) never see a feedback record. What a
grade corrects lives in memory and starts empty with the process, so a restart has nothing to
apply old grades to: the reader starts at the end of each partition and commits nothing (a
feedback record counts as done once applied). A replica that does not hold the graded query
counts `unknown_id` (with N replicas, each grade is `applied` once and `unknown_id` N − 1
times). A record that is not a valid `Feedback` is dead-lettered by one replica only, the one
holding input partition 0 (`dead_letters_here`), and counted `rejected` by all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from clearbudget.daemon.core.feedback import FeedbackOutcome
from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.ports import ResultSink
from clearbudget.daemon.kafka.clients import METADATA_MAX_AGE_MS, StartupError, security_options
from clearbudget.daemon.kafka.intake import Intake, Rejection
from clearbudget.daemon.kafka.sinks import FatalPublishError
from clearbudget.daemon.settings import Settings, env_var

POLL_TIMEOUT_MS = 200
MAX_RECORDS_PER_POLL = 2000
POLL_DEADLINE_S = 5.0  # a getmany without a broker must not hold the loop (or its stop) longer
RETRY_S = 1.0
STOP_GRACE_S = 3.0  # at shutdown: a poll or a dead-letter publish in progress gets this long


class FeedbackConsumer(Protocol):
    """What the loop needs of its consumer (aiokafka's has it), so tests can fake it."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]: ...


class Grader(Protocol):
    """The policy, as far as feedback goes (`AllocationPolicy.feedback`)."""

    def feedback(self, query_id: str, correct: bool) -> FeedbackOutcome: ...


def make_feedback_consumer(settings: Settings) -> AIOKafkaConsumer:
    """A consumer of `CLEAR_FEEDBACK_TOPIC` outside every group: all partitions, from the end,
    nothing committed (module docstring)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        **security_options(settings),
    )
    consumer.subscribe([settings.feedback_topic])
    return consumer


async def start_feedback_consumer(
    settings: Settings, log: structlog.typing.FilteringBoundLogger
) -> AIOKafkaConsumer:
    """A started `make_feedback_consumer`. A feedback topic that does not exist yet is one
    warning: it is read from the moment it appears (metadata is refreshed every minute)."""
    consumer = make_feedback_consumer(settings)
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        where = f"{env_var('kafka_bootstrap')}={settings.kafka_bootstrap}"
        raise StartupError(
            f"cannot read {env_var('feedback_topic')}={settings.feedback_topic} from the Kafka "
            f"broker at {where}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        if settings.feedback_topic not in await consumer.topics():
            log.warning(
                "feedback_topic_missing",
                topic=settings.feedback_topic,
                hint="grades are read once the topic exists",
            )
    except KafkaError as exc:  # the daemon's own clients just started: only a blip
        log.warning("feedback_topic_unchecked", error=str(exc))
    return consumer


class _Assigned(Protocol):
    def assignment(self) -> set[TopicPartition]: ...


def holds_first_partition(group_consumer: _Assigned, input_topic: str) -> Callable[[], bool]:
    """`dead_letters_here` for a replica: whether its group consumer holds input partition 0
    (one replica at a time, but for a moment during a rebalance)."""
    first = TopicPartition(input_topic, 0)
    return lambda: first in group_consumer.assignment()


class FeedbackLoop:
    """Reads feedback records, applies each valid one to the policy, dead-letters the rest;
    `clear_feedback_total{outcome}` counts them."""

    def __init__(
        self,
        *,
        consumer: FeedbackConsumer,
        sink: ResultSink,
        policy: Grader,
        intake: Intake,
        metrics: PipelineMetrics,
        on_fatal: Callable[[FatalPublishError], None],
        dead_letters_here: Callable[[], bool] = lambda: True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._consumer = consumer
        self._sink = sink
        self._policy = policy
        self._intake = intake
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._dead_letters_here = dead_letters_here
        self._sleep = sleep
        self._log = logger or structlog.get_logger("clearbudget.feedback")
        self.stopped_by: FatalPublishError | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set (or the DLQ refuses the daemon for good); never raises
        but on cancellation: feedback must not take the daemon down."""
        while not stop.is_set() and self.stopped_by is None:
            try:
                await self.poll_once()
            except Exception as exc:
                self._log.exception("feedback_poll_failed", error=str(exc))
                await self._sleep(RETRY_S)

    async def poll_once(self) -> int:
        """One poll: returns how many records it handled."""
        try:
            batch = await asyncio.wait_for(
                self._consumer.getmany(
                    timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS_PER_POLL
                ),
                POLL_DEADLINE_S,
            )
        except TimeoutError:
            return 0
        except KafkaError as exc:  # the broker's trouble shows on the main loop's health
            self._log.warning("feedback_poll_failed", error=str(exc))
            await self._sleep(RETRY_S)
            return 0
        rejections: list[Rejection] = []
        handled = 0
        for tp, records in batch.items():
            for record in records:
                handled += 1
                self._handle(tp, record, rejections)
        if rejections:
            await self._reject(rejections)
        return handled

    def _handle(
        self, tp: TopicPartition, record: ConsumerRecord[Any, Any], rejections: list[Rejection]
    ) -> None:
        admitted = self._intake.admit_feedback(
            record.value, topic=tp.topic, partition=tp.partition, offset=record.offset
        )
        if isinstance(admitted, Rejection):
            rejections.append(admitted)
            return
        try:
            outcome = self._policy.feedback(admitted.id, admitted.correct)
        except Exception as exc:  # a bug must not stop the reader; the grade is skipped
            self._log.exception("feedback_failed", query_id=admitted.id, error=str(exc))
            return
        self._metrics.feedback.labels(outcome=outcome).inc()

    async def _reject(self, rejections: list[Rejection]) -> None:
        self._metrics.feedback.labels(outcome="rejected").inc(len(rejections))
        if not self._dead_letters_here():
            return
        try:
            await self._sink.publish_dead_letters([r.dead_letter for r in rejections])
        except FatalPublishError as exc:
            self.stopped_by = exc
            self._on_fatal(exc)
            return
        self._metrics.dead_letters.inc(len(rejections))


async def stop_feedback(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Stop a running `FeedbackLoop.run` task: set `stop`, give it `STOP_GRACE_S` to finish
    its poll (or a dead-letter publish the sink keeps retrying), then cancel it."""
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, STOP_GRACE_S)
