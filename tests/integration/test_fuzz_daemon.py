"""Fuzz the real consumer path: over 10,000 generated valid and malformed messages through the
Tansu broker into a running `clearbudget run` process. Every message must end in exactly one
terminal outcome (a result, or a DLQ record plus a `rejected` result when its id is readable),
the daemon must stay healthy, and it must commit past everything it consumed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from clearbudget.daemon.kafka.intake import DUPLICATE_ID_ERROR
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port, wait_for_port
from clearbudget.schemas.messages import DeadLetter, QueryResult, Status
from tests.kafka.test_intake import records

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BATCHES = int(os.environ.get("CLEAR_TEST_FUZZ_BATCHES", "210"))
BATCH_SIZE = 50  # 210 × 50 = 10,500 messages (small examples: no hypothesis overruns)
TOPICS = ("fuzz.queries", "fuzz.results", "fuzz.dlq")


@dataclass
class Rig:
    """A running daemon process and the loop/clients that talk to its topics."""

    loop: asyncio.AbstractEventLoop
    producer: AIOKafkaProducer
    results: AIOKafkaConsumer
    dlq: AIOKafkaConsumer
    daemon: subprocess.Popen[bytes]
    http_port: int
    bootstrap: str
    sent: int = 0
    tally: Counter[str] = field(default_factory=Counter)


async def _make_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 2 if "queries" in t else 1, 1) for t in TOPICS])
    finally:
        await admin.close()


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def rig(
    kafka_broker: EmbeddedBroker, shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    logs = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_make_topics(kafka_broker.bootstrap))
    sim_port, http_port = free_loopback_port(), free_loopback_port()
    cli = [sys.executable, "-m", "clearbudget.daemon.cli"]
    simulator = _start(
        [*cli, "simulate-backend", "--rollouts", str(shared_data / "rollouts.jsonl"),
         "--port", str(sim_port)],
        dict(os.environ), logs / "simulator.log",
    )  # fmt: skip
    wait_for_port("127.0.0.1", sim_port, 60, simulator)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
        "CLEAR_INPUT_TOPIC": TOPICS[0],
        "CLEAR_RESULT_TOPIC": TOPICS[1],
        "CLEAR_DLQ_TOPIC": TOPICS[2],
        "CLEAR_CONSUMER_GROUP": "fuzz",
        "CLEAR_VLLM_ENDPOINTS": f"http://127.0.0.1:{sim_port}",
        "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
        "CLEAR_TOKENS_PER_SECOND": "3000",
        "CLEAR_WINDOW_SECONDS": "0.5",
        "CLEAR_MIN_TOKENS_PER_QUERY": "0",  # every message through fast: intake is under test
        "CLEAR_HTTP_PORT": str(http_port),
        "CLEAR_LOG_LEVEL": "WARNING",
    }
    daemon = _start([*cli, "run"], env, logs / "daemon.log")
    wait_for_port("127.0.0.1", http_port, 60, daemon)

    async def clients() -> tuple[AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaConsumer]:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, linger_ms=5)
        readers = [
            AIOKafkaConsumer(
                t, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest"
            )
            for t in TOPICS[1:]
        ]
        for client in (producer, *readers):
            await client.start()
        return producer, readers[0], readers[1]

    producer, results, dlq = loop.run_until_complete(clients())
    rig = Rig(loop, producer, results, dlq, daemon, http_port, kafka_broker.bootstrap)
    yield rig
    for client in (producer, results, dlq):
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(client.stop())
    loop.close()
    for process in (daemon, simulator):
        if process.poll() is None:
            process.terminate()
            process.wait(30)
    print((logs / "daemon.log").read_text()[-3000:])


async def _send(rig: Rig, values: list[bytes | None]) -> None:
    for value in values:
        # Kafka needs a key on a record without a value (a tombstone).
        await rig.producer.send(TOPICS[0], value, key=b"tombstone" if value is None else None)
    await rig.producer.flush()


def _outcomes(rig: Rig, sent: int) -> None:
    """Read outcomes until every message sent so far has one; fail on any extra or loss."""

    async def read() -> tuple[list[QueryResult], list[DeadLetter]]:
        results: list[QueryResult] = []
        letters: list[DeadLetter] = []
        async with asyncio.timeout(120):
            while rig.tally["outcomes"] + _outcome_count(results, letters) < sent:
                results.extend(map(QueryResult.model_validate_json, await _poll(rig.results)))
                letters.extend(map(DeadLetter.model_validate_json, await _poll(rig.dlq)))
        return results, letters

    results, letters = rig.loop.run_until_complete(read())
    rejected = [r for r in results if r.status is Status.REJECTED]
    # Each rejected result pairs with a DLQ record that could read its id, and vice versa;
    # a duplicate id goes to the DLQ only (its original has the result keyed by that id).
    assert Counter(r.id for r in rejected) == Counter(
        letter.query_id
        for letter in letters
        if letter.query_id is not None and letter.error != DUPLICATE_ID_ERROR
    )
    assert len({(letter.partition, letter.offset) for letter in letters}) == len(letters)
    rig.tally["outcomes"] += _outcome_count(results, letters)
    rig.tally["dead_letters"] += len(letters)
    rig.tally.update(r.status.value for r in results)
    assert rig.tally["outcomes"] <= sent, "a message got more than one terminal outcome"


async def _poll(consumer: AIOKafkaConsumer) -> list[bytes]:
    batch = await consumer.getmany(timeout_ms=100)
    return [record.value for part in batch.values() for record in part]


def _outcome_count(results: list[QueryResult], letters: list[DeadLetter]) -> int:
    """One per message: its DLQ record, or its (non-rejected) result."""
    return len(letters) + sum(1 for r in results if r.status is not Status.REJECTED)


@settings(
    max_examples=BATCHES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # shrinking would replay thousands of broker round trips
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(batch=st.lists(records, min_size=BATCH_SIZE, max_size=BATCH_SIZE))
def test_every_message_ends_in_exactly_one_outcome(rig: Rig, batch: list) -> None:
    rig.loop.run_until_complete(_send(rig, [value for _, value in batch]))
    rig.sent += len(batch)
    _outcomes(rig, rig.sent)
    assert rig.daemon.poll() is None, "the daemon exited"


def test_daemon_stayed_healthy_and_committed_everything(rig: Rig) -> None:
    assert rig.sent >= 10_000

    async def late_outcomes() -> int:
        await asyncio.sleep(2.0)  # a duplicate outcome would have arrived by now
        return len(await _poll(rig.results)) + len(await _poll(rig.dlq))

    assert rig.loop.run_until_complete(late_outcomes()) == 0
    health = httpx.get(f"http://127.0.0.1:{rig.http_port}/healthz", timeout=5)
    assert health.status_code == 200, health.text
    assert rig.tally["dead_letters"] > 1000
    assert rig.tally["answered"] + rig.tally["abandoned"] + rig.tally["expired"] > 500

    async def committed() -> int:
        checker = AIOKafkaConsumer(
            bootstrap_servers=rig.bootstrap,
            group_id="fuzz",
            enable_auto_commit=False,
        )
        await checker.start()
        try:
            total = 0
            async with asyncio.timeout(30):
                while True:  # commits trail the last results by at most a commit interval
                    parts = [TopicPartition(TOPICS[0], p) for p in range(2)]
                    total = sum([await checker.committed(tp) or 0 for tp in parts])
                    if total >= rig.sent:
                        return total
                    await asyncio.sleep(0.5)
        finally:
            await checker.stop()

    assert rig.loop.run_until_complete(committed()) == rig.sent
    # SIGTERM: the daemon drains and exits 0 well within its shutdown deadline.
    rig.daemon.terminate()
    assert rig.daemon.wait(40) == 0
