"""Kafka client factories from settings: the one place TLS/SASL options are built."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownError,
    UnsupportedVersionError,
)

from clearbudget.daemon.settings import Settings, env_var

# New partitions (and topics) are seen within a minute, not aiokafka's default five.
METADATA_MAX_AGE_MS = 60_000
STARTUP_RETRY_S = 1.0


class StartupError(RuntimeError):
    """The broker could not be used at start-up; the message names the variable to check."""


async def start_clients(
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    """Started consumer and producer. Waits up to CLEAR_KAFKA_STARTUP_WAIT_SECONDS for the
    broker; falls back, with one warning, to a plain producer where the broker refuses an
    idempotent one; anything else is one `StartupError` line naming the variable."""
    give_up_at = clock() + settings.kafka_startup_wait_seconds
    # aiokafka logs each failed connection itself; the one line that matters is ours.
    logging.getLogger("aiokafka").disabled = True
    try:
        return await _start_both(settings, log, sleep, clock, give_up_at)
    finally:
        logging.getLogger("aiokafka").disabled = False


async def _start_both(
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    give_up_at: float,
) -> tuple[AIOKafkaConsumer, AIOKafkaProducer]:
    waiting = False
    while True:
        try:
            producer = await _start_producer(settings, log)
            break
        except KafkaConnectionError as exc:
            if clock() >= give_up_at:
                raise StartupError(_unreachable(settings, exc)) from exc
            if not waiting:  # once: the wait is otherwise silent
                waiting = True
                log.warning("kafka_waiting", bootstrap=settings.kafka_bootstrap,
                            seconds_left=round(give_up_at - clock(), 1))  # fmt: skip
            await sleep(STARTUP_RETRY_S)
    consumer = make_consumer(settings)
    try:
        await consumer.start()
        missing = _missing_topics(settings, await consumer.topics())
    except KafkaError as exc:
        await asyncio.gather(consumer.stop(), producer.stop())
        raise StartupError(_unreachable(settings, exc)) from exc
    if missing:
        await asyncio.gather(consumer.stop(), producer.stop())
        raise StartupError(missing)
    return consumer, producer


async def window_reports_possible(
    settings: Settings, consumer: AIOKafkaConsumer, log: structlog.typing.FilteringBoundLogger
) -> bool:
    """Whether the optional window-report topic exists; if not, one warning (reports are
    best-effort and never hold results back)."""
    if not settings.window_topic:
        return False
    if settings.window_topic in await consumer.topics():
        return True
    log.warning(
        "window_topic_missing",
        topic=settings.window_topic,
        hint=f"window reports are off; create the topic or set {env_var('window_topic')}=",
    )
    return False


def _missing_topics(
    settings: Settings,
    existing: set[str],
    fields: Sequence[str] = ("input_topic", "result_topic", "dlq_topic"),
) -> str | None:
    """One line naming each configured topic the broker does not have, and its variable."""
    absent = [
        f"{getattr(settings, f)!r} ({env_var(f)})"
        for f in fields
        if getattr(settings, f) and getattr(settings, f) not in existing
    ]
    if not absent:
        return None
    return f"the Kafka broker at {settings.kafka_bootstrap} has no topic " + ", ".join(absent)


async def _start_producer(
    settings: Settings, log: structlog.typing.FilteringBoundLogger
) -> AIOKafkaProducer:
    producer = make_producer(settings)
    try:
        await producer.start()
        return producer
    except KafkaConnectionError:
        await producer.stop()
        raise
    except (UnknownError, UnsupportedVersionError) as exc:
        await producer.stop()
        if not settings.kafka_idempotent_producer:
            raise StartupError(_unreachable(settings, exc)) from exc
        log.warning(
            "idempotent_producer_refused",
            hint=f"the broker refused an idempotent producer; set "
            f"{env_var('kafka_idempotent_producer')}=false to silence this",
            error=type(exc).__name__,
        )
    except KafkaError as exc:
        await producer.stop()
        raise StartupError(_unreachable(settings, exc)) from exc
    producer = make_producer(settings, idempotent=False)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise StartupError(_unreachable(settings, exc)) from exc
    return producer


def _unreachable(settings: Settings, error: BaseException) -> str:
    where = f"{env_var('kafka_bootstrap')}={settings.kafka_bootstrap}"
    if settings.kafka_security_protocol != "PLAINTEXT":
        where += f" ({env_var('kafka_security_protocol')}={settings.kafka_security_protocol})"
    detail = str(error)
    if isinstance(error, KafkaConnectionError) and "Unable to bootstrap" in detail:
        detail = "no broker answered (refused, unreachable or not resolvable)"
    elif not detail.startswith(type(error).__name__):
        detail = f"{type(error).__name__}: {detail}"
    return f"cannot use the Kafka broker at {where}: {detail}"


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
        # A revoke lets running windows finish (up to the shutdown deadline, then a last
        # publish): the group must wait that long for this member to rejoin.
        rebalance_timeout_ms=int((settings.shutdown_deadline_seconds + 10) * 1000),
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        **security_options(settings),
    )


def make_producer(settings: Settings, *, idempotent: bool | None = None) -> AIOKafkaProducer:
    """Results producer: acks from all replicas; idempotence where the broker supports it."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=settings.kafka_idempotent_producer if idempotent is None else idempotent,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        linger_ms=5,
        request_timeout_ms=10_000,  # fail fast into RetryingSink's backoff when the broker is gone
        **security_options(settings),
    )


async def start_command_producer(
    settings: Settings, log: structlog.typing.FilteringBoundLogger, topic_fields: Sequence[str]
) -> AIOKafkaProducer:
    """A started producer for a one-shot command (`clearbudget submit`): the daemon's producer
    and idempotence fallback, but no waiting for the broker (CLEAR_KAFKA_STARTUP_WAIT_SECONDS is
    the daemon's); an unreachable broker or a missing topic of `topic_fields` is one
    `StartupError` line naming the variable. Bounded by the producer's request time-out per
    bootstrap address."""
    try:
        producer = await _start_producer(settings, log)
    except KafkaConnectionError as exc:
        raise StartupError(_unreachable(settings, exc)) from exc
    try:
        existing = (await producer.client.fetch_all_metadata()).topics()
    except KafkaError as exc:
        await producer.stop()
        raise StartupError(_unreachable(settings, exc)) from exc
    if missing := _missing_topics(settings, existing, topic_fields):
        await producer.stop()
        raise StartupError(missing)
    return producer


def make_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer outside every consumer group, for the command-line readers (`clearbudget
    results`, `submit --wait`): partitions are assigned by hand and nothing is ever committed,
    so it never joins, rebalances or moves the daemon's group."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",  # only when a position fell out of retention: skip none
        request_timeout_ms=10_000,
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
        **security_options(settings),
    )


async def start_reader(settings: Settings, topic_fields: Sequence[str]) -> AIOKafkaConsumer:
    """A started `make_reader` consumer; an unreachable broker or a missing topic of
    `topic_fields` is one `StartupError` line naming the variable."""
    consumer = make_reader(settings)
    try:
        await consumer.start()
        missing = _missing_topics(settings, await consumer.topics(), topic_fields)
    except KafkaError as exc:
        await consumer.stop()
        raise StartupError(_unreachable(settings, exc)) from exc
    if missing:
        await consumer.stop()
        raise StartupError(missing)
    return consumer


async def ensure_topics(settings: Settings, topics: Sequence[str], partitions: int = 1) -> None:
    """Create those of `topics` that do not exist (replay and the demo), with the daemon's
    TLS/SASL settings."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, **security_options(settings)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica made them
                await admin.create_topics(new)
    finally:
        await admin.close()
