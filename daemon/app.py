"""Builds the daemon from settings and runs it until stopped: the composition root."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import signal
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.budget import BudgetLedger
from clearbudget.daemon.core.feedback import DEFAULT_REMEMBERED_QUERIES
from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import WindowPipeline
from clearbudget.daemon.core.policies import AllocationPolicy, ClearPolicy
from clearbudget.daemon.core.ports import CompletionBackend
from clearbudget.daemon.core.tag_spend import TagSpendPipeline
from clearbudget.daemon.http_server import HealthChecks, start_http_server
from clearbudget.daemon.kafka.clients import start_clients, window_reports_possible
from clearbudget.daemon.kafka.feedback import (
    FeedbackLoop,
    holds_first_partition,
    start_feedback_consumer,
    stop_feedback,
)
from clearbudget.daemon.kafka.intake import Intake, IntakeLimits
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.kafka.sinks import BrokerHealth, KafkaResultSink, RetryingSink
from clearbudget.daemon.settings import Scrubber, Settings
from clearbudget.daemon.vllm.pool import VllmPool
from clearbudget.solver.fit import ProbePlan

# A poll loop silent for this long means the consumer is stuck (max_poll_interval is 300 s).
LIVENESS_STALL_S = 120.0


# Collect the youngest generation after this many net allocations instead of Python's 700: at
# thousands of queries/s the default ran gen-0 collections so often that they cost a third of the
# daemon's CPU (benchmarks/RESULTS.md, "Daemon"). Garbage cycles still go, just in larger batches.
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Before serving: move everything loaded so far (modules, solver, settings) out of the
    collector's sight, and collect young objects in larger batches."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


# Libraries whose DEBUG records carry payloads (aiokafka logs every produced record): they log at
# INFO at most, whatever CLEAR_LOG_LEVEL says.
QUIET_LIBRARIES = ("aiokafka", "aiohttp", "asyncio")


def configure_logging(level: str, secrets: Iterable[str] = ()) -> None:
    """JSON lines, the libraries' records too; prompts and record values are never logged, and
    `secrets` (`Settings.secret_values()`) are masked wherever they turn up."""
    scrubber = Scrubber(secrets)
    scrub: list[structlog.typing.Processor] = [_scrubbing(scrubber)] if scrubber else []
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(),
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                *scrub,
            ],
        )
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.INFO))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *scrub,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )


def _scrubbing(scrubber: Scrubber) -> structlog.typing.Processor:
    """A processor masking the secrets in every value of an event (before it is rendered)."""

    def scrubbed(value: object) -> object:
        if isinstance(value, str):
            return scrubber.text(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {key: scrubbed(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [scrubbed(item) for item in value]
        shown = repr(value)  # what the renderer would write for it
        masked = scrubber.text(shown)
        return value if masked == shown else masked

    def processor(_: object, __: str, event: structlog.typing.EventDict) -> Any:
        return {
            key: value if key.startswith("_") else scrubbed(value)  # "_record": logging's own
            for key, value in event.items()
        }

    return processor


def build_backend(settings: Settings, registry: CollectorRegistry) -> VllmPool:
    api_key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
    return VllmPool(
        settings.vllm_endpoints,
        model=settings.model,
        registry=registry,
        api_key=api_key,
        max_concurrency_per_endpoint=settings.endpoint_concurrency,
        request_timeout_s=settings.request_timeout_seconds,
        max_attempts=settings.request_retries + 1,
        outage_wait_s=settings.vllm_outage_wait_seconds,
        discovery=settings.vllm_discovery,
        discovery_interval_s=settings.vllm_discovery_interval_seconds,
        mask_secrets=Scrubber(settings.secret_values()).text,
    )


async def run_daemon(
    settings: Settings,
    stop: asyncio.Event,
    *,
    registry: CollectorRegistry | None = None,
    backend: CompletionBackend | None = None,
    policy: AllocationPolicy | None = None,
    on_start: Callable[[Daemon], None] | None = None,
) -> Daemon:
    """Run until `stop` is set; returns the daemon (its state) after a clean drain.

    `on_start` receives the daemon once it is built, before it consumes (e.g. to wait on its
    `assigned` event)."""
    registry = registry or CollectorRegistry()
    tag_budgets = settings.tag_budgets
    metrics = PipelineMetrics.create(registry, tag_budgets.label_keys if tag_budgets else ())
    log = structlog.get_logger("clearbudget")
    async with AsyncExitStack() as stack:
        if backend is None:
            pool = build_backend(settings, registry)
            stack.push_async_callback(pool.aclose)
            await pool.start()  # DNS discovery: the first lookup, so the pods are known at once
            backend = pool
        consumer, producer = await start_clients(settings, log)
        stack.push_async_callback(producer.stop)
        stack.push_async_callback(consumer.stop)
        if not await window_reports_possible(settings, consumer, log):
            settings = settings.model_copy(update={"window_topic": None})
        feedback_consumer = None
        if settings.feedback_topic:
            feedback_consumer = await start_feedback_consumer(settings, log)
            stack.push_async_callback(feedback_consumer.stop)
        # One policy, so one long-lived cvxpy allocator, for the life of the process.
        if policy is None:
            policy = ClearPolicy(
                ProbePlan(settings.probe_samples, settings.probe_tokens),
                tag_budgets=tag_budgets, tag_metrics=metrics.tags,
                remember_queries=DEFAULT_REMEMBERED_QUERIES if settings.feedback_topic else 0,
                max_tokens_per_query=settings.max_tokens_per_query,
            )  # fmt: skip
            if tag_budgets is not None:  # tagged windows go to cvxpy: load it off the loop
                await asyncio.to_thread(policy.prepare)
        limits = {
            "max_tokens_per_query": settings.max_tokens_per_query,
            "thinking_answer_tokens": settings.thinking_answer_allowance,
        }
        pipeline = WindowPipeline(backend, policy, metrics, **limits)
        if tag_budgets is not None:
            pipeline = TagSpendPipeline(
                backend, policy, metrics, tag_budgets=tag_budgets, **limits
            )
        health = BrokerHealth()
        sink = RetryingSink(KafkaResultSink(producer, settings), health, logger=log)
        daemon = Daemon(
            broker_health=health,
            consumer=consumer,
            sink=sink,
            pipeline=pipeline,
            ledger=BudgetLedger(settings.tokens_per_second, settings.carry_over_cap_tokens),
            intake=Intake(IntakeLimits(max_prompt_bytes=settings.max_prompt_bytes)),
            metrics=metrics,
            input_topic=settings.input_topic,
            window_seconds=settings.window_seconds,
            window_max_queries=settings.window_max_queries,
            min_tokens_per_query=settings.paced_tokens_per_query,
            shutdown_deadline_s=settings.shutdown_deadline_seconds,
            backend_ready=backend.ready,
            window_id_prefix=window_id_prefix(),
            logger=log,
        )
        scrubber = Scrubber(settings.secret_values())
        checks = HealthChecks(
            liveness=lambda: _scrubbed(scrubber, _liveness(daemon)),
            readiness=lambda: _scrubbed(scrubber, _readiness(daemon, backend)),
        )
        runner = await start_http_server(
            registry, checks, host=settings.http_host, port=settings.http_port
        )
        stack.push_async_callback(runner.cleanup)
        log.info(
            "started", input_topic=settings.input_topic, endpoints=len(settings.vllm_endpoints)
        )
        feedback = None
        if feedback_consumer is not None:
            reader = FeedbackLoop(
                consumer=feedback_consumer, sink=sink, policy=policy,
                intake=Intake(IntakeLimits(max_prompt_bytes=settings.max_prompt_bytes)),
                metrics=metrics, on_fatal=daemon.publish_refused,
                dead_letters_here=holds_first_partition(consumer, settings.input_topic), logger=log,
            )  # fmt: skip
            feedback_stop = asyncio.Event()
            feedback = (asyncio.create_task(reader.run(feedback_stop)), feedback_stop)
        if on_start is not None:
            on_start(daemon)
        try:
            await daemon.run(stop)
        finally:
            if feedback is not None:
                await stop_feedback(*feedback)
        log.info("stopped", windows=daemon.state.windows_done)
    return daemon


def _liveness(daemon: Daemon) -> str | None:
    if daemon.state.fatal_error:
        return daemon.state.fatal_error
    if daemon.state.consuming and time.monotonic() - daemon.state.last_poll_at > LIVENESS_STALL_S:
        return "the consume loop has not polled Kafka for two minutes"
    return None


def _scrubbed(scrubber: Scrubber, reason: str | None) -> str | None:
    return scrubber.text(reason) if reason is not None and scrubber else reason


def _readiness(daemon: Daemon, backend: CompletionBackend) -> str | None:
    if daemon.state.fatal_error:  # why it stopped consuming, while it drains before exiting
        return daemon.state.fatal_error
    if not daemon.state.consuming:
        return "not consuming"
    if not daemon.broker_health.ok:
        return f"Kafka broker unreachable ({daemon.broker_health.last_error})"
    if not backend.ready():
        return "no vLLM endpoint is available (all circuit breakers open)"
    return None


def window_id_prefix() -> str:
    """Replica and start time, so window ids never repeat across replicas or restarts (a
    compacted window topic would otherwise overwrite one replica's reports with another's)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:100] or "replica"
    return f"{host}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
