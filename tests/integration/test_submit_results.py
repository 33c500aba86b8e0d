"""A way in and out, for real: `clearbudget submit` sends to the Tansu broker, a `clearbudget run`
daemon (the recorded-rollout simulator as its backend) answers, `submit --wait` prints each
result as it arrives and `clearbudget results` finds them again, all configured only by the
daemon's CLEAR_* variables, and without ever joining a consumer group."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clearbudget.daemon.replay.embedded import EmbeddedBroker, free_loopback_port, stop_process
from clearbudget.schemas.messages import QueryResult, Status
from tests.integration.test_reliability import Cluster, start_simulator

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WAIT_S = "45"


@pytest.fixture
def topics(kafka_broker: EmbeddedBroker, tmp_path: Path) -> Cluster:
    """Fresh queries, results, DLQ and idle topics (no processes yet)."""
    run = f"sub{free_loopback_port()}"
    names = (f"{run}.queries", f"{run}.results", f"{run}.dlq", f"{run}.idle")

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 2, 1) for t in names])
        finally:
            await admin.close()

    asyncio.run(create())
    return Cluster(kafka_broker.bootstrap, "", tmp_path, names[:3], run)


@pytest.fixture
def rig(topics: Cluster, shared_data: Path, tmp_path: Path) -> Iterator[Cluster]:
    """The topics, the simulator and one `clearbudget run` daemon, stopped at the end."""
    port = free_loopback_port()
    simulator = start_simulator(shared_data / "rollouts.jsonl", port, tmp_path / "simulator.log")
    topics.simulator_url = f"http://127.0.0.1:{port}"
    daemon, _ = topics.start_daemon("daemon")
    yield topics
    stop_process(daemon, 30)
    stop_process(simulator, 10)


def cli(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`clearbudget ARGS` in a fresh process, configured as the daemon is (idempotence left at
    its default, so the fallback Tansu needs is exercised too)."""
    variables = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
        "CLEAR_KAFKA_BOOTSTRAP": cluster.bootstrap,
        "CLEAR_INPUT_TOPIC": cluster.topics[0],
        "CLEAR_RESULT_TOPIC": cluster.topics[1],
        "CLEAR_DLQ_TOPIC": cluster.topics[2],
        "CLEAR_CONSUMER_GROUP": cluster.group,
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "clearbudget.daemon.cli", *args], env=variables, cwd=cluster.logs,
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def results_of(stdout: str) -> list[QueryResult]:
    return [QueryResult.model_validate_json(line) for line in stdout.splitlines()]


def consumer_groups(bootstrap: str) -> set[str]:
    async def groups() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return {group[0] for group in await admin.list_consumer_groups()}
        finally:
            await admin.close()

    return asyncio.run(groups())


def test_submit_wait_prints_the_answer_and_results_finds_it(rig: Cluster) -> None:
    groups_before = consumer_groups(rig.bootstrap)  # the broker is shared with other tests
    # One prompt: its new id on stderr's summary, its result on stdout as it arrives.
    one = cli(rig, "submit", "What is 2+2?", "--tag", "task=demo", "--wait", "--json",
              "--timeout", WAIT_S)  # fmt: skip
    assert one.returncode == 0, one.stderr
    (answer,) = results_of(one.stdout)
    assert answer.id.startswith("q-")
    assert answer.status in (Status.ANSWERED, Status.ABANDONED)
    assert f"submitted 1 query to '{rig.topics[0]}'" in one.stderr

    # A file (one line without an id) and a table.
    queries = rig.logs / "queries.jsonl"
    queries.write_text(
        '{"id": "f-1", "prompt": "problem: one", "tags": {"task": "t"}}\n\n'
        '{"id": "f-2", "prompt": "problem: two", "max_tokens": 300}\n'
        '{"prompt": "problem: three"}\n'
    )
    many = cli(rig, "submit", "--file", str(queries), "--wait", "--timeout", WAIT_S)
    assert many.returncode == 0, many.stderr
    header, *rows = many.stdout.splitlines()
    assert header.split()[:2] == ["id", "status"]
    assert len(rows) == 3
    row_ids = {row.split()[0] for row in rows}
    assert {"f-1", "f-2"} <= row_ids
    (generated,) = row_ids - {"f-1", "f-2"}
    assert generated.startswith("q-")

    # Without --wait the ids go to stdout, one per line.
    sent = cli(rig, "submit", "no wait", "--id", "plain-1")
    assert (sent.returncode, sent.stdout) == (0, "plain-1\n"), sent.stderr

    # `results` reads them back from the topic, filtered.
    found = cli(rig, "results", "--id", answer.id, "--json")
    assert found.returncode == 0, found.stderr
    again = results_of(found.stdout)
    assert {r.id for r in again} == {answer.id}
    assert again[0] == answer
    several = cli(rig, "results", "--id", "f-1", "--id", generated, "--json")
    assert sorted({r.id for r in results_of(several.stdout)}) == sorted(["f-1", generated])
    by_status = cli(rig, "results", "--status", answer.status.value, "--json")
    assert answer.id in {r.id for r in results_of(by_status.stdout)}
    assert {r.status for r in results_of(by_status.stdout)} == {answer.status}
    missing = cli(rig, "results", "--id", "never-sent")
    assert missing.returncode == 1
    assert missing.stderr == "error: no matching result for 1 of 1 ids: never-sent\n"
    followed = cli(rig, "results", "--follow", "--from-beginning", "--limit", "2", "--json")
    assert followed.returncode == 0, followed.stderr
    assert len(results_of(followed.stdout)) == 2

    # Nobody answers queries sent to a topic no daemon reads: a time-out, naming what is missing.
    idle = cli(rig, "submit", "unheard", "--id", "lost-1", "--wait", "--timeout", "2",
               env={"CLEAR_INPUT_TOPIC": f"{rig.group}.idle"})  # fmt: skip
    assert idle.returncode == 1
    assert (
        idle.stderr.splitlines()[-1]
        == "error: timed out after 2 s: no result for 1 of 1 ids: lost-1"
    )

    # None of it joined or created a consumer group: at most the daemon's is new.
    assert consumer_groups(rig.bootstrap) - groups_before <= {rig.group}


def test_a_missing_topic_is_named_with_its_variable(topics: Cluster) -> None:
    sent = cli(topics, "submit", "x", env={"CLEAR_INPUT_TOPIC": "no-such-topic"})
    assert sent.returncode == 2
    assert sent.stderr == (f"error: the Kafka broker at {topics.bootstrap} has no topic "
                           "'no-such-topic' (CLEAR_INPUT_TOPIC)\n")  # fmt: skip
    read = cli(topics, "results", env={"CLEAR_RESULT_TOPIC": "no-such-results"})
    assert read.returncode == 2
    assert "'no-such-results' (CLEAR_RESULT_TOPIC)" in read.stderr
