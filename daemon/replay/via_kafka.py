"""Replay through the real daemon path: produce the trace into Kafka at recorded pace, run the
daemon (consumer, windows, pipeline, HTTP backend pool), and read the results topic back.

Every run tags its query ids with a run id (`<run>.<id>`) and reads back only results with
that tag, so results of earlier runs on the same topics are never scored; all clients use the
daemon's TLS/SASL settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.kafka.clients import ensure_topics, make_producer, make_reader
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.replay.config import ReplayConfig, ReplayQuery, make_policy, trace_span
from clearbudget.daemon.replay.report import ReplayReport, score
from clearbudget.daemon.replay.rollouts import RolloutPool
from clearbudget.daemon.settings import Settings
from clearbudget.schemas.messages import QueryResult

RESULT_WAIT_S = 120.0


async def replay_via_kafka(
    queries: Sequence[ReplayQuery],
    pool: RolloutPool,
    config: ReplayConfig,
    settings: Settings,
    *,
    speedup: float = 1.0,
    on_result: Callable[[int], None] | None = None,
) -> ReplayReport:
    """Produce `queries` at recorded pace / `speedup` into the input topic, run the daemon with
    `config`'s policy against `settings.vllm_endpoints`, and score the results topic."""
    started = time.perf_counter()
    topics = [settings.input_topic, settings.result_topic, settings.dlq_topic]
    await ensure_topics(settings, topics)
    run_id = f"r{time.time_ns():x}"
    queries = [
        replace(q, request=q.request.model_copy(update={"id": f"{run_id}.{q.request.id}"}))
        for q in queries
    ]
    stop = asyncio.Event()
    policy = make_policy(config, pool, queries)
    started_daemon: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
    daemon_task = asyncio.create_task(
        run_daemon(settings, stop, policy=policy, on_start=started_daemon.set_result)
    )
    reader = make_reader(settings)  # no group: reads from the start, commits nothing
    reader.subscribe([settings.result_topic])
    await reader.start()
    try:
        # The budget accrues in wall-clock time: start the trace once the daemon holds partitions.
        daemon = await _wait_for_assignment(started_daemon, daemon_task)
        await _produce_at_pace(queries, settings, speedup)
        results = await _collect(reader, {q.request.id for q in queries}, daemon_task, on_result)
    finally:
        stop.set()
        await reader.stop()
        await daemon_task
    # The daemon earns its rate in wall-clock time over the replayed (sped-up) trace.
    span = trace_span(queries, settings.window_seconds, speedup)
    return score(
        config.policy, pool, queries, results,
        wall_seconds=time.perf_counter() - started,
        budget_tokens=settings.tokens_per_second * span,
        windows=daemon.state.windows_done,
    )  # fmt: skip


async def _produce_at_pace(
    queries: Sequence[ReplayQuery], settings: Settings, speedup: float
) -> None:
    producer = make_producer(settings, idempotent=False)  # the daemon's client, TLS/SASL included
    await producer.start()
    try:
        t0, first = time.monotonic(), queries[0].arrival if queries else 0.0
        for query in queries:
            delay = (query.arrival - first) / speedup - (time.monotonic() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            request = query.request
            await producer.send(
                settings.input_topic, request.model_dump_json().encode(), key=request.id.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def _collect(
    reader: AIOKafkaConsumer,
    expected: set[str],
    daemon_task: asyncio.Task[Any],
    on_result: Callable[[int], None] | None,
) -> dict[str, QueryResult]:
    results: dict[str, QueryResult] = {}
    deadline = time.monotonic() + RESULT_WAIT_S
    while expected - results.keys():
        if daemon_task.done():
            daemon_task.result()  # surface the daemon's error
            raise RuntimeError("the daemon stopped before every result arrived")
        if time.monotonic() > deadline:
            missing = len(expected - results.keys())
            raise TimeoutError(f"{missing} results did not arrive within {RESULT_WAIT_S:.0f} s")
        batch = await reader.getmany(timeout_ms=200)
        for records in batch.values():
            for record in records:
                result = QueryResult.model_validate_json(record.value)
                if result.id in expected and result.id not in results:
                    results[result.id] = result
                    if on_result:
                        on_result(1)
    return results


async def _wait_for_assignment(
    started: asyncio.Future[Daemon], daemon_task: asyncio.Task[Any], limit_s: float = 60.0
) -> Daemon:
    """The running daemon, once its consumer group has given it partitions."""

    async def assigned() -> Daemon:
        daemon = await started
        await daemon.assigned.wait()
        return daemon

    waiter = asyncio.ensure_future(assigned())
    done, _ = await asyncio.wait(
        {waiter, daemon_task}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
    )
    if waiter in done:
        return waiter.result()
    waiter.cancel()
    if daemon_task.done():
        daemon_task.result()
        raise RuntimeError("the daemon stopped before joining its consumer group")
    raise TimeoutError(f"the daemon got no partitions within {limit_s:.0f} s")
