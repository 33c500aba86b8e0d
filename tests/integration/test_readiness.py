"""A topic that refuses the daemon for good: /readyz and /healthz say why while it drains."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from prometheus_client import CollectorRegistry

import clearbudget.daemon.app
from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.kafka.sinks import KafkaResultSink, PublishFailed
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import DeadLetter, QueryRequest, QueryResult
from tests.support.waiting import until

pytestmark = [pytest.mark.kafka]

POOL = RolloutPool(
    [RolloutRecord("m", "b", "p", 10, "7", (RolloutSample(tokens=50, correct=True, answer="7"),))]
)


class RefusingResults(KafkaResultSink):
    """The real sink, except the results topic refuses every record (as a broker ACL would)
    and dead letters wait for `release`: the drain, and so the HTTP server, stays up meanwhile."""

    release: ClassVar[asyncio.Event]

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        raise PublishFailed({i: TopicAuthorizationFailedError() for i in range(len(results))})

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        await self.release.wait()
        await super().publish_dead_letters(records)


async def test_a_refusing_results_topic_is_the_reason_on_readyz_and_healthz(
    kafka_broker: EmbeddedBroker, kafka_topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clearbudget.daemon.app, "KafkaResultSink", RefusingResults)
    RefusingResults.release = asyncio.Event()
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    port = free_loopback_port()
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": topics[0],
            "CLEAR_RESULT_TOPIC": topics[1],
            "CLEAR_DLQ_TOPIC": topics[2],
            "CLEAR_WINDOW_TOPIC": "",
            "CLEAR_CONSUMER_GROUP": topics[0],
            "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",  # the backend is injected
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_WINDOW_SECONDS": "0.2",
            "CLEAR_HTTP_PORT": str(port),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    started: list[Daemon] = []
    task = asyncio.create_task(
        run_daemon(settings, asyncio.Event(), registry=CollectorRegistry(),
                   backend=SimulatedBackend(POOL), on_start=started.append)
    )  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:  # a dead letter first (its publish holds the drain open), then a query to answer
        await producer.send_and_wait(topics[0], b"{not json")
        query = QueryRequest(id="q-1", prompt=prompt_for(POOL.records[0]))
        await producer.send_and_wait(topics[0], query.model_dump_json().encode())
    finally:
        await producer.stop()

    await until(lambda: bool(started) and started[0].state.fatal_error is not None, 30)
    fatal = started[0].state.fatal_error
    assert fatal is not None
    assert fatal.startswith("publishing refused: results: TopicAuthorizationFailedError")
    assert not task.done()  # still draining: the dead letter waits
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for path in ("/readyz", "/healthz"):
            answer = await client.get(path)
            assert answer.status_code == 503, path
            assert answer.json() == {"status": "fail", "reason": fatal}, path

    RefusingResults.release.set()
    stopped = await asyncio.wait_for(task, 30)  # returns by itself: the refusal stops it
    assert stopped.state.fatal_error == fatal
