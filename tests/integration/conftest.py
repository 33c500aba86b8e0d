"""The real components on loopback ports: one Tansu broker and one vLLM server per session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clearbudget.daemon.replay.embedded import (
    BrokerStartError,
    EmbeddedBroker,
    start_embedded_broker,
)
from tests.support.vllm_server import VllmServer, VllmStartError, start_vllm_server


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real Tansu broker per test session; topics are created per test."""
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    try:
        broker = start_embedded_broker(log_path=log_path)
    except BrokerStartError as exc:
        pytest.fail(f"cannot start the Tansu broker: {exc}", pytrace=False)
    yield broker
    broker.stop()


TopicFactory = Callable[..., Awaitable[str]]


@pytest.fixture
async def kafka_topic(kafka_broker: EmbeddedBroker) -> AsyncIterator[TopicFactory]:
    """Create uniquely named topics per test: `await kafka_topic("in", partitions=3)`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()

    async def create(prefix: str = "t", *, partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        return name

    yield create
    await admin.close()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM OpenAI-compatible server on a tiny random Llama, started once per session.

    Set CLEAR_TEST_VLLM_URL (and CLEAR_TEST_VLLM_MODEL) to reuse a server that is already up.
    """
    if url := os.environ.get("CLEAR_TEST_VLLM_URL"):
        yield VllmServer(
            url.rstrip("/"), os.environ.get("CLEAR_TEST_VLLM_MODEL", "tiny-llama"), None, None
        )
        return
    try:
        server = start_vllm_server(tmp_path_factory.mktemp("vllm"))
    except VllmStartError as exc:
        pytest.fail(f"cannot start the vLLM server: {exc}", pytrace=False)
    yield server
    server.stop()
