"""Publishing terminal outcomes to Kafka: results, dead letters and window reports.

`KafkaResultSink` sends each record and reports which ones failed (`PublishFailed`), so a retry
re-sends only those: a record already acknowledged is never published twice by a retry.
`RetryingSink` classifies the failures: a broker outage is retried with capped backoff; a record
over the size limit is re-published once with its bulk cut (the reason says so); a topic that
refuses the daemon for good (authorization, policy, an invalid topic) raises `FatalPublishError`.
Window reports are best-effort: one attempt, a warning, and never a reason to block results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    PolicyViolationError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
)
from pydantic import BaseModel

from clearbudget.daemon.core.ports import ResultSink
from clearbudget.daemon.settings import Scrubber, Settings
from clearbudget.schemas.messages import MAX_REASON_CHARS, DeadLetter, QueryResult, WindowReport

# Errors no retry can cure: the topic refuses these records whatever the daemon does.
FATAL_ERRORS: tuple[type[KafkaError], ...] = (
    TopicAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    InvalidTopicError,
    PolicyViolationError,
    UnsupportedForMessageFormatError,
    CorruptRecordException,
)
TOO_LARGE_ERRORS: tuple[type[KafkaError], ...] = (MessageSizeTooLargeError, RecordListTooLargeError)
CUT_TEXT_REASON = "text cut: the result exceeded the broker's message size limit"

Record = TypeVar("Record", QueryResult, DeadLetter)


class PublishFailed(KafkaError):  # type: ignore[misc]
    """Some records of a publish were not acknowledged: their positions and errors."""

    def __init__(self, errors: dict[int, BaseException]) -> None:
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} record(s) not acknowledged: {type(first).__name__}")
        self.errors = errors


class FatalPublishError(RuntimeError):
    """A topic refuses the daemon's records for good; the daemon must stop, not retry."""


def _encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


class KafkaResultSink:
    """Publishes results keyed by query id, dead letters, and optional window reports."""

    def __init__(self, producer: AIOKafkaProducer, settings: Settings) -> None:
        self._producer = producer
        self._settings = settings
        # A reason may quote a pod's error body, and a careless gateway echoes credentials.
        self._scrubber = Scrubber(settings.secret_values())

    def _encode(self, message: BaseModel) -> bytes:
        value = _encode(message)
        return self._scrubber.data(value) if self._scrubber else value

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        await self._send_all(
            self._settings.result_topic,
            [(r.id.encode("utf-8"), self._encode(r)) for r in results],
        )

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        await self._send_all(
            self._settings.dlq_topic,
            [((r.query_id or "").encode("utf-8") or None, self._encode(r)) for r in records],
        )

    async def publish_window(self, report: WindowReport) -> None:
        if self._settings.window_topic:
            key = report.window_id.encode("utf-8")
            await self._send_all(self._settings.window_topic, [(key, self._encode(report))])

    async def _send_all(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        # Queue every send first so the producer batches them, then wait for all acks; report
        # exactly the records that failed.
        errors: dict[int, BaseException] = {}
        futures: dict[int, asyncio.Future[object]] = {}
        for i, (key, value) in enumerate(messages):
            try:
                futures[i] = await self._producer.send(topic, value, key=key)
            except KafkaError as exc:  # refused before queueing (e.g. over max_request_size)
                errors[i] = exc
        outcomes = await asyncio.gather(*futures.values(), return_exceptions=True)
        for i, outcome in zip(futures, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                errors[i] = outcome
        if errors:
            raise PublishFailed(errors)


@dataclass
class BrokerHealth:
    """Whether the broker answered the last time the daemon needed it (for /readyz)."""

    ok: bool = True
    last_error: str | None = None

    def down(self, error: BaseException) -> None:
        self.ok, self.last_error = False, f"{type(error).__name__}: {error}"

    def up(self) -> None:
        self.ok, self.last_error = True, None


# How long a window report may wait for its ack before it is dropped.
REPORT_TIMEOUT_S = 5.0


class RetryingSink:
    """Wraps a sink so a broker outage delays publishing instead of losing or failing work;
    see the module docstring for how failures are told apart."""

    def __init__(
        self,
        inner: ResultSink,
        health: BrokerHealth,
        *,
        max_backoff_s: float = 5.0,
        report_timeout_s: float = REPORT_TIMEOUT_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._inner = inner
        self._health = health
        self._max_backoff_s = max_backoff_s
        self._report_timeout_s = report_timeout_s
        self._sleep = sleep
        self._log = logger or structlog.get_logger("clearbudget.kafka")

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        await self._retry("results", list(results), self._inner.publish_results, _cut_result)

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        await self._retry(
            "dead letters", list(records), self._inner.publish_dead_letters, _cut_dead_letter
        )

    async def publish_window(self, report: WindowReport) -> None:
        """Best-effort: one try, at most `report_timeout_s` (a broker that neither acks nor
        refuses would otherwise hold the send for the producer's whole request timeout)."""
        try:
            async with asyncio.timeout(self._report_timeout_s):
                await self._inner.publish_window(report)
        except (KafkaError, TimeoutError) as exc:  # results and commits never wait on reports
            error = str(exc) or f"no ack within {self._report_timeout_s:g} s"
            self._log.warning("window_report_dropped", window_id=report.window_id, error=error)

    async def _retry(
        self,
        what: str,
        pending: list[Record],
        publish: Callable[[list[Record]], Awaitable[None]],
        cut: Callable[[Record], Record],
    ) -> None:
        delay, cut_done = 0.1, False
        while True:
            try:
                await publish(pending)
            except KafkaError as exc:
                errors = _per_record(exc, len(pending))
                _raise_if_fatal(what, errors, cut_done, exc)
                too_large = {i for i, e in errors.items() if isinstance(e, TOO_LARGE_ERRORS)}
                pending = [cut(pending[i]) if i in too_large else pending[i] for i in errors]
                if too_large:  # re-sent at once, cut: the broker is fine, the record was not
                    cut_done = True
                    self._log.warning("publish_cut", what=what, records=len(too_large))
                    continue
                await self._back_off(what, exc, delay)
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self._health.up()
            return

    async def _back_off(self, what: str, error: KafkaError, delay: float) -> None:
        if self._health.ok:
            self._log.warning("publish_retrying", what=what, error=str(error))
        self._health.down(error)
        await self._sleep(delay)


def _per_record(error: KafkaError, count: int) -> dict[int, BaseException]:
    """Which records failed, and why (a sink that cannot tell failed them all)."""
    if isinstance(error, PublishFailed):
        return dict(sorted(error.errors.items()))
    return dict.fromkeys(range(count), error)


def _raise_if_fatal(
    what: str, errors: dict[int, BaseException], cut_done: bool, cause: KafkaError
) -> None:
    fatal = next((e for e in errors.values() if isinstance(e, FATAL_ERRORS)), None)
    if fatal is not None:
        raise FatalPublishError(f"{what}: {type(fatal).__name__}: {fatal}") from cause
    if cut_done and any(isinstance(e, TOO_LARGE_ERRORS) for e in errors.values()):
        raise FatalPublishError(f"{what}: a record is too large even when cut") from cause


def _cut_result(result: QueryResult) -> QueryResult:
    """The result without its generated text (the answer stays), saying why."""
    reason = f"{result.reason}; {CUT_TEXT_REASON}" if result.reason else CUT_TEXT_REASON
    return result.model_copy(update={"text": None, "reason": reason[-MAX_REASON_CHARS:]})


def _cut_dead_letter(letter: DeadLetter) -> DeadLetter:
    """The dead letter without the copy of the refused value (its size, location and error
    stay: topic/partition/offset find the original)."""
    kept_nothing = {"value_b64": "", "value_truncated": letter.value_bytes > 0}
    return letter.model_copy(update={**kept_nothing, "value_preview": None})
