"""Kafka adapters: client options from settings, and the sink that publishes results."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from daemon.settings import Settings
from schemas.messages import DeadLetter, QueryResult, WindowReport


class ResultSink(Protocol):
    """Where terminal outcomes go; the daemon marks offsets done only after these return."""

    async def publish_results(self, results: Sequence[QueryResult]) -> None: ...

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None: ...

    async def publish_window(self, report: WindowReport) -> None: ...


def security_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured TLS/SASL setup."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol.endswith("SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
        if settings.kafka_ssl_certfile and settings.kafka_ssl_keyfile:
            context.load_cert_chain(
                str(settings.kafka_ssl_certfile), str(settings.kafka_ssl_keyfile)
            )
        options["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": password.get_secret_value() if password else None,
        }
    return options


def make_consumer(settings: Settings) -> AIOKafkaConsumer:
    """The input consumer: group member, manual commits, bounded fetches."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=300_000,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        rebalance_timeout_ms=5_000,
        **security_options(settings),
    )


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """Results producer: acks from all replicas; idempotence where the broker supports it."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer,
        linger_ms=5,
        request_timeout_ms=10_000,  # fail fast into RetryingSink's backoff when the broker is gone
        **security_options(settings),
    )


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
