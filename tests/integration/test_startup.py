"""Start-up that explains itself: Tansu with the default (idempotent) producer setting, and a
broker that is not there."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import structlog
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.kafka.clients import StartupError
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import QueryRequest, QueryResult, Status
from tests.integration.test_daemon_kafka import read_all

pytestmark = [pytest.mark.kafka]

POOL = RolloutPool(
    [RolloutRecord("m", "b", "p", 10, "7", (RolloutSample(tokens=50, correct=True, answer="7"),))]
)


async def test_default_settings_run_on_tansu_with_one_warning(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": topics[0],
            "CLEAR_RESULT_TOPIC": topics[1],
            "CLEAR_DLQ_TOPIC": topics[2],
            "CLEAR_CONSUMER_GROUP": topics[0],
            "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",  # the backend is injected
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },  # CLEAR_KAFKA_IDEMPOTENT_PRODUCER left at its default: true
        env_file=None,
    )
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        daemon = asyncio.create_task(
            run_daemon(settings, stop, registry=CollectorRegistry(),
                       backend=SimulatedBackend(POOL))
        )  # fmt: skip
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
        await producer.start()
        request = QueryRequest(id="q-1", prompt=prompt_for(POOL.records[0]))
        await producer.send_and_wait(topics[0], request.model_dump_json().encode())
        await producer.stop()
        (value,) = await read_all(kafka_broker.bootstrap, topics[1], want=1)
        stop.set()
        await daemon
    assert QueryResult.model_validate_json(value).status is Status.ANSWERED
    warnings = [e for e in logs if e["event"] == "idempotent_producer_refused"]
    assert len(warnings) == 1
    assert "CLEAR_KAFKA_IDEMPOTENT_PRODUCER" in warnings[0]["hint"]


def test_an_unreachable_broker_is_one_line_naming_the_variable() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "CLEAR_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_loopback_port()}",
        "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",
        "CLEAR_HTTP_PORT": str(free_loopback_port()),
        "CLEAR_HTTP_HOST": "127.0.0.1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "clearbudget.daemon.cli", "run"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: cannot use the Kafka broker at CLEAR_KAFKA_BOOTSTRAP=")


async def test_a_missing_topic_is_named_with_its_variable(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    results = await kafka_topic("results")
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": "no-such-queries",
            "CLEAR_RESULT_TOPIC": results,
            "CLEAR_DLQ_TOPIC": "no-such-dlq",
            "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    with pytest.raises(StartupError) as caught:
        await run_daemon(settings, asyncio.Event(), backend=SimulatedBackend(POOL))
    message = str(caught.value)
    assert "'no-such-queries' (CLEAR_INPUT_TOPIC)" in message
    assert "'no-such-dlq' (CLEAR_DLQ_TOPIC)" in message
    assert "CLEAR_RESULT_TOPIC" not in message
