"""The daemon against a real vLLM server: probe and continuation over the OpenAI-compatible API,
token usage taken from vLLM's own counts, one terminal result per query."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import QueryResult, Status
from tests.support.vllm_server import VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.kafka, pytest.mark.slow]

PROMPT = " ".join(["find the sum of one and two then check the answer"] * 20)


async def test_daemon_probes_and_continues_on_vllm(
    kafka_broker: EmbeddedBroker, kafka_topic, vllm_server: VllmServer
) -> None:
    queries, results_topic, dlq = (
        await kafka_topic("vq"), await kafka_topic("vr"), await kafka_topic("vd")
    )  # fmt: skip
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": queries,
            "CLEAR_RESULT_TOPIC": results_topic,
            "CLEAR_DLQ_TOPIC": dlq,
            "CLEAR_CONSUMER_GROUP": f"g-{queries}",
            "CLEAR_VLLM_ENDPOINTS": vllm_server.base_url,
            "CLEAR_MODEL": vllm_server.model,
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "100000",
            "CLEAR_WINDOW_SECONDS": "0.5",
            "CLEAR_PROBE_TOKENS": "16",
            "CLEAR_MAX_TOKENS_PER_QUERY": "600",
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    registry = CollectorRegistry()
    stop = asyncio.Event()
    daemon = asyncio.create_task(run_daemon(settings, stop, registry=registry))
    ids = [f"v{i}" for i in range(6)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    for qid in ids:
        body = {"id": qid, "prompt": f"{qid} {PROMPT}", "max_tokens": 500}
        await producer.send(queries, json.dumps(body).encode())
    await producer.stop()

    reader = AIOKafkaConsumer(
        results_topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest"
    )
    await reader.start()
    results: dict[str, QueryResult] = {}
    try:
        async with asyncio.timeout(180):
            while len(results) < len(ids):
                batch = await reader.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        result = QueryResult.model_validate_json(record.value)
                        assert result.id not in results, "two results for one query"
                        results[result.id] = result
    finally:
        await reader.stop()
        stop.set()
        await asyncio.wait_for(daemon, 60)

    assert sorted(results) == ids
    for result in results.values():
        assert result.status in {Status.ANSWERED, Status.ABANDONED}, result
        assert 0 < result.tokens_probe <= 16
        assert result.tokens_probe <= result.tokens_used <= 500  # the query's own cap holds
    generated = sum(r.tokens_used for r in results.values())
    dispatched = registry.get_sample_value("clear_tokens_total", {"phase": "dispatch"})
    probed = registry.get_sample_value("clear_tokens_total", {"phase": "probe"})
    assert probed + dispatched == generated
    assert dispatched > 0, "no censored probe was continued"
