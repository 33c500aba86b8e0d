"""Graded feedback on the real path: Tansu broker → daemon (with CLEAR_FEEDBACK_TOPIC) →
simulator; queries answered, then a grader's verdicts on the feedback topic are applied, an
unknown id is counted and ignored, and bad feedback goes to the DLQ without a result."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port
from clearbudget.daemon.replay.rollouts import load_rollouts
from clearbudget.daemon.replay.sim_server import start_simulator
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import DeadLetter, QueryResult, Status
from tests.integration.test_daemon_kafka import read_all
from tests.support.waiting import until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

QUERIES = 12
BAD_FEEDBACK = [b"{not json", b'{"id": "q0"}', b'{"id": "q1", "correct": "yes"}']


def feedback_count(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("clear_feedback_total", {"outcome": outcome}) or 0.0


async def test_grades_are_applied_and_bad_feedback_is_dead_lettered(
    kafka_broker: EmbeddedBroker, kafka_topic, shared_data: Path
) -> None:
    topics = {name: await kafka_topic(name) for name in ("queries", "results", "dlq", "grades")}
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    backend = SimulatedBackend(pool, seed=0)
    simulator = await start_simulator(backend, port=0)
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": topics["queries"],
            "CLEAR_RESULT_TOPIC": topics["results"],
            "CLEAR_DLQ_TOPIC": topics["dlq"],
            "CLEAR_FEEDBACK_TOPIC": topics["grades"],
            "CLEAR_WINDOW_TOPIC": "",
            "CLEAR_CONSUMER_GROUP": f"g-{topics['queries']}",
            "CLEAR_VLLM_ENDPOINTS": simulator.url,
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "50000",
            "CLEAR_WINDOW_SECONDS": "0.5",
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    stop = asyncio.Event()
    registry = CollectorRegistry()
    daemon_task = asyncio.create_task(run_daemon(settings, stop, registry=registry))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        # Easy records (short chains) so that most queries are answered.
        easy = sorted(range(len(pool)), key=lambda i: int(pool.tokens[i].min()))[:QUERIES]
        for n, record in enumerate(easy):
            body = {"id": f"q{n}", "prompt": prompt_for(pool.records[record])}
            await producer.send(topics["queries"], json.dumps(body).encode())
        await producer.flush()
        raw = await read_all(kafka_broker.bootstrap, topics["results"], QUERIES, timeout_s=40)
        results = [QueryResult.model_validate_json(v) for v in raw]
        assert len(results) == QUERIES
        answered = [r for r in results if r.status is Status.ANSWERED and r.text]
        assert answered, "no query was answered"
        grades = {r.id: backend.grade(r.text or "") for r in answered}

        for query_id, correct in grades.items():
            body = {"id": query_id, "correct": correct, "schema_version": 1}
            await producer.send(topics["grades"], json.dumps(body).encode())
        await producer.send(topics["grades"], b'{"id": "never-asked", "correct": true}')
        for bad in BAD_FEEDBACK:
            await producer.send(topics["grades"], bad)
        await producer.flush()

        await until(lambda: feedback_count(registry, "applied") == len(grades)
                    and feedback_count(registry, "rejected") == len(BAD_FEEDBACK),
                    within_s=20.0)  # fmt: skip
        assert feedback_count(registry, "unknown_id") == 1.0
        letters = [DeadLetter.model_validate_json(v) for v in await read_all(
            kafka_broker.bootstrap, topics["dlq"], len(BAD_FEEDBACK), timeout_s=20)]  # fmt: skip
        assert len(letters) == len(BAD_FEEDBACK)
        assert {letter.topic for letter in letters} == {topics["grades"]}
        assert sorted(str(letter.query_id) for letter in letters) == ["None", "q0", "q1"]
        assert letters[0].error.startswith("message: not valid JSON")
        # Bad feedback publishes no result: the results topic still holds one per query.
        again = await read_all(kafka_broker.bootstrap, topics["results"], QUERIES, timeout_s=20)
        assert len(again) == QUERIES
    finally:
        await producer.stop()
        stop.set()
        await asyncio.wait_for(daemon_task, 60)
        await simulator.close()
