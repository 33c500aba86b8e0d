"""Publishing terminal outcomes to Kafka: results, dead letters and window reports, retried
with backoff through a broker outage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from daemon.core.ports import ResultSink
from daemon.settings import Settings
from schemas.messages import DeadLetter, QueryResult, WindowReport


def _encode(message: BaseModel) -> bytes:
    return message.model_dump_json().encode("utf-8")


class KafkaResultSink:
    """Publishes results keyed by query id, dead letters, and optional window reports."""

    def __init__(self, producer: AIOKafkaProducer, settings: Settings) -> None:
        self._producer = producer
        self._settings = settings

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        await self._send_all(
            self._settings.result_topic, [(r.id.encode("utf-8"), _encode(r)) for r in results]
        )

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        await self._send_all(
            self._settings.dlq_topic,
            [((r.query_id or "").encode("utf-8") or None, _encode(r)) for r in records],
        )

    async def publish_window(self, report: WindowReport) -> None:
        if self._settings.window_topic:
            await self._send_all(
                self._settings.window_topic, [(report.window_id.encode("utf-8"), _encode(report))]
            )

    async def _send_all(self, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
        # Queue every send first so the producer batches them, then wait for all acks.
        futures = [await self._producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)


@dataclass
class BrokerHealth:
    """Whether the broker answered the last time the daemon needed it (for /readyz)."""

    ok: bool = True
    last_error: str | None = None

    def down(self, error: BaseException) -> None:
        self.ok, self.last_error = False, f"{type(error).__name__}: {error}"

    def up(self) -> None:
        self.ok, self.last_error = True, None


class RetryingSink:
    """Wraps a sink so a broker outage delays publishing instead of losing or failing work:
    each publish is retried with capped exponential backoff until it lands (or the task is
    cancelled at shutdown, leaving its offsets uncommitted for a restart to redo)."""

    def __init__(
        self,
        inner: ResultSink,
        health: BrokerHealth,
        *,
        max_backoff_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._inner = inner
        self._health = health
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._log = logger or structlog.get_logger("clearbudget.kafka")

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        await self._retry("results", lambda: self._inner.publish_results(results))

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        await self._retry("dead letters", lambda: self._inner.publish_dead_letters(records))

    async def publish_window(self, report: WindowReport) -> None:
        await self._retry("window report", lambda: self._inner.publish_window(report))

    async def _retry(self, what: str, publish: Callable[[], Awaitable[None]]) -> None:
        delay = 0.1
        while True:
            try:
                await publish()
            except KafkaError as exc:
                if self._health.ok:
                    self._log.warning("publish_retrying", what=what, error=str(exc))
                self._health.down(exc)
                await self._sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self._health.up()
            return
