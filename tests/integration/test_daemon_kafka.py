"""The real daemon path: Tansu broker → daemon (consumer, windows, pipeline, HTTP pool) →
recorded-rollout simulator over HTTP → results and DLQ topics; offsets committed; metrics up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import load_rollouts
from clearbudget.daemon.replay.sim_server import start_simulator
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import DeadLetter, QueryResult, Status

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BAD_MESSAGES = [
    b"{not json",
    b'{"id": "bad-nan", "prompt": "x", "weight": NaN}',
    b'{"id": "bad-field", "prompt": "x", "colour": "red"}',
    b'{"id": "bad-tokens", "prompt": "x", "max_tokens": -5}',
    b"\xff\xfe\xfa",
]
BAD_WITH_ID = {"bad-nan", "bad-field", "bad-tokens"}


async def read_all(bootstrap: str, topic: str, want: int, timeout_s: float = 60.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(values) < want:
                batch = await consumer.getmany(timeout_ms=200)
                values += [r.value for records in batch.values() for r in records]
        # Nothing more than expected shows up shortly after.
        extra = await consumer.getmany(timeout_ms=1000)
        values += [r.value for records in extra.values() for r in records]
    finally:
        await consumer.stop()
    return values


async def test_queries_in_one_terminal_result_each_out(
    kafka_broker: EmbeddedBroker, kafka_topic, shared_data: Path
) -> None:
    queries_topic = await kafka_topic("queries", partitions=2)
    results_topic = await kafka_topic("results")
    dlq_topic = await kafka_topic("dlq")
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    simulator = await start_simulator(SimulatedBackend(pool, seed=0), port=0)
    http_port = free_loopback_port()
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": queries_topic,
            "CLEAR_RESULT_TOPIC": results_topic,
            "CLEAR_DLQ_TOPIC": dlq_topic,
            "CLEAR_CONSUMER_GROUP": f"g-{queries_topic}",
            "CLEAR_VLLM_ENDPOINTS": simulator.url,
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "20000",
            "CLEAR_WINDOW_SECONDS": "0.5",
            "CLEAR_HTTP_PORT": str(http_port),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    stop = asyncio.Event()
    registry = CollectorRegistry()
    daemon_task = asyncio.create_task(run_daemon(settings, stop, registry=registry))
    good_ids = [f"q{i}" for i in range(40)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        for i, qid in enumerate(good_ids):
            body = {"id": qid, "prompt": prompt_for(pool.records[i]), "tags": {"task": "t"}}
            await producer.send(queries_topic, json.dumps(body).encode(), key=qid.encode())
        for bad in BAD_MESSAGES:
            await producer.send(queries_topic, bad)
        await producer.flush()
    finally:
        await producer.stop()

    expected_results = len(good_ids) + len(BAD_WITH_ID)
    raw = await read_all(kafka_broker.bootstrap, results_topic, expected_results)
    results = [QueryResult.model_validate_json(v) for v in raw]
    assert sorted(r.id for r in results) == sorted([*good_ids, *BAD_WITH_ID])
    by_id = {r.id: r for r in results}
    assert {by_id[i].status for i in BAD_WITH_ID} == {Status.REJECTED}
    assert "weight" in (by_id["bad-nan"].reason or "")
    good_statuses = {by_id[i].status for i in good_ids}
    assert good_statuses <= {Status.ANSWERED, Status.ABANDONED}
    assert Status.ANSWERED in good_statuses
    # Probed queries spent tokens; unprobed ones were priced out before any spend.
    for qid in good_ids:
        result = by_id[qid]
        assert result.tokens_probe > 0 or "insolvent" in (result.reason or "")
        assert result.tokens_used >= result.tokens_probe

    letters = [DeadLetter.model_validate_json(v) for v in await read_all(
        kafka_broker.bootstrap, dlq_topic, len(BAD_MESSAGES))]  # fmt: skip
    assert len(letters) == len(BAD_MESSAGES)
    assert {letter.topic for letter in letters} == {queries_topic}

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
    # Every consumed message counts once: five rejected (three of them had a readable id).
    assert f'clear_queries_total{{status="rejected"}} {len(BAD_MESSAGES)}.0' in metrics
    assert f"clear_dead_letters_total {len(BAD_MESSAGES)}.0" in metrics
    assert "clear_shadow_price" in metrics
    assert "clear_window_budget_tokens" in metrics

    stop.set()
    await asyncio.wait_for(daemon_task, 60)
    await simulator.close()

    # Every consumed offset was committed: the group, restarted, re-reads nothing. (Checked by
    # reading, not by end offsets: Tansu reports a batch-based high watermark for batched sends.)
    checker = AIOKafkaConsumer(
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
    )
    await checker.start()
    try:
        partitions = [TopicPartition(queries_topic, p) for p in range(2)]
        checker.assign(partitions)
        committed = [await checker.committed(tp) for tp in partitions]
        assert sum(committed) == len(good_ids) + len(BAD_MESSAGES)
        assert await checker.getmany(timeout_ms=1500) == {}
    finally:
        await checker.stop()
