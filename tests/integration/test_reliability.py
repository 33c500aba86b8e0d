"""Delivery under faults, with real processes: the Tansu broker, the recorded-rollout simulator
served over HTTP and `clearbudget run` daemons that are killed, stopped and run side by side.

Every produced query id must end with at least one terminal result and, after de-duplication by
id, exactly one; duplicates may only come from work in flight when a daemon died."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from clearbudget.daemon.replay.embedded import (
    EmbeddedBroker,
    free_loopback_port,
    start_embedded_broker,
    stop_process,
    wait_for_port,
)
from clearbudget.schemas.messages import QueryResult

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 4


@dataclass
class Cluster:
    bootstrap: str
    simulator_url: str
    logs: Path
    topics: tuple[str, str, str]
    group: str

    def start_daemon(
        self, name: str, endpoints: str | None = None, **settings: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_loopback_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CLEAR_")},
            "CLEAR_KAFKA_BOOTSTRAP": self.bootstrap,
            "CLEAR_INPUT_TOPIC": self.topics[0],
            "CLEAR_RESULT_TOPIC": self.topics[1],
            "CLEAR_DLQ_TOPIC": self.topics[2],
            "CLEAR_CONSUMER_GROUP": self.group,
            "CLEAR_VLLM_ENDPOINTS": endpoints or self.simulator_url,
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "40000",
            "CLEAR_WINDOW_SECONDS": "1.0",
            "CLEAR_MIN_TOKENS_PER_QUERY": "0",  # delivery is under test, not pacing
            "CLEAR_HTTP_PORT": str(port),
            "CLEAR_LOG_LEVEL": "WARNING",
            **settings,
        }
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "clearbudget.daemon.cli", "run"], env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port("127.0.0.1", port, 60, process)
        return process, port


def start_simulator(rollouts: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clearbudget.daemon.cli", "simulate-backend",
             "--rollouts", str(rollouts), "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for_port("127.0.0.1", port, 60, process)
    return process


@pytest.fixture
def cluster(kafka_broker: EmbeddedBroker, shared_data: Path, tmp_path: Path) -> Iterator[Cluster]:
    run = f"rel{time.monotonic_ns()}"
    topics = (f"{run}.queries", f"{run}.results", f"{run}.dlq")

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(t, PARTITIONS if t == topics[0] else 1, 1) for t in topics]
            )
        finally:
            await admin.close()

    asyncio.run(create())
    port = free_loopback_port()
    simulator = start_simulator(shared_data / "rollouts.jsonl", port, tmp_path / "simulator.log")
    yield Cluster(kafka_broker.bootstrap, f"http://127.0.0.1:{port}", tmp_path, topics, run)
    stop_process(simulator, 10)


def produce(cluster: Cluster, ids: list[str], seconds: float) -> None:
    """Produce `ids` spread evenly over `seconds` (a steady stream, so faults land mid-window)."""

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            for i, qid in enumerate(ids):
                lag = start + seconds * i / len(ids) - time.monotonic()
                if lag > 0:
                    await asyncio.sleep(lag)
                body = {"id": qid, "prompt": f"problem: {qid}"}
                await producer.send(cluster.topics[0], json.dumps(body).encode(), key=qid.encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(send())


def read_results(cluster: Cluster, ids: set[str], timeout_s: float = 120.0) -> Counter[str]:
    """Result counts per id, read until every id has one (plus a short grace for late extras)."""
    return Counter(r.id for r in read_result_records(cluster, ids, timeout_s))


def read_result_records(
    cluster: Cluster, ids: set[str], timeout_s: float = 120.0
) -> list[QueryResult]:
    async def read() -> list[QueryResult]:
        consumer = AIOKafkaConsumer(
            cluster.topics[1], bootstrap_servers=cluster.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        results: list[QueryResult] = []
        try:
            deadline = time.monotonic() + timeout_s
            while not ids <= {r.id for r in results} and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                results += [QueryResult.model_validate_json(r.value) for rs in batch.values()
                            for r in rs]  # fmt: skip
            await asyncio.sleep(1.0)
            batch = await consumer.getmany(timeout_ms=500)
            results += [QueryResult.model_validate_json(r.value) for rs in batch.values()
                        for r in rs]  # fmt: skip
        finally:
            await consumer.stop()
        return results

    return asyncio.run(read())


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_kill9_mid_window_then_restart_loses_nothing(cluster: Cluster) -> None:
    ids = [f"k{i:05d}" for i in range(1500)]
    daemon, _ = cluster.start_daemon("first")
    time.sleep(1.0)
    produce(cluster, ids[:1000], seconds=3.0)
    daemon.send_signal(signal.SIGKILL)  # while windows are open and in flight
    daemon.wait(10)
    restarted, _ = cluster.start_daemon("second")
    try:
        produce(cluster, ids[1000:], seconds=1.0)
        counts = read_results(cluster, set(ids))
    finally:
        stop_process(restarted, 40)
    missing = set(ids) - counts.keys()
    assert not missing, f"{len(missing)} queries lost, e.g. {sorted(missing)[:5]}"
    duplicates = sum(n - 1 for n in counts.values())
    # Only work consumed but not yet committed when the process died can come back: far less
    # than what was produced before the kill.
    assert duplicates < 1000
    print(f"kill -9: {len(ids)} queries, 0 lost, {duplicates} duplicates (in-flight re-reads)")


def test_sigterm_drains_and_restart_has_no_duplicates(cluster: Cluster) -> None:
    ids = [f"t{i:05d}" for i in range(1200)]
    daemon, _ = cluster.start_daemon("first")
    time.sleep(1.0)
    produce(cluster, ids[:800], seconds=2.0)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(40) == 0
    restarted, _ = cluster.start_daemon("second")
    try:
        produce(cluster, ids[800:], seconds=1.0)
        counts = read_results(cluster, set(ids))
    finally:
        stop_process(restarted, 40)
    assert set(ids) <= counts.keys()
    assert max(counts.values()) == 1, "a drained daemon must not leave work to redo"


def test_two_replicas_share_the_budget_and_survive_one_death(cluster: Cluster) -> None:
    first, port_a = cluster.start_daemon("a")
    second, port_b = cluster.start_daemon("b")
    try:
        deadline = time.monotonic() + 60
        shares = (0.0, 0.0)
        while time.monotonic() < deadline:
            shares = (metric(port_a, "clear_budget_share"), metric(port_b, "clear_budget_share"))
            if min(shares) > 0 and abs(sum(shares) - 1.0) < 1e-9:
                break
            time.sleep(0.5)
        assert min(shares) > 0, f"partitions not split: {shares}"
        assert sum(shares) == pytest.approx(1.0), "window budgets must add up to the total"
        ids = [f"r{i:05d}" for i in range(1200)]
        produce(cluster, ids[:600], seconds=1.5)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        produce(cluster, ids[600:], seconds=1.5)
        counts = read_results(cluster, set(ids), timeout_s=150)
        assert set(ids) <= counts.keys(), "the survivor must take over the dead replica's work"
        assert metric(port_b, "clear_budget_share") == pytest.approx(1.0)
    finally:
        stop_process(second, 40)
        stop_process(first, 10)


def test_a_rolling_restart_loses_nothing_and_gives_each_id_one_status(cluster: Cluster) -> None:
    """Two replicas on a steady stream; each is restarted in turn (SIGTERM, a fresh process)
    as a rolling update does. Arrivals outrun the paced budget, so windows wait in the queue
    and in the dispatcher at each hand-over. Running windows finish first and unstarted work
    is left to the next owner, so no id is lost, duplicated or given two statuses."""
    paced = {"CLEAR_MIN_TOKENS_PER_QUERY": "1024"}  # 40 queries/s at 40,000 tokens/s
    replicas = [cluster.start_daemon("a", **paced)[0], cluster.start_daemon("b", **paced)[0]]
    ids = [f"k{i:05d}" for i in range(900)]
    producing = threading.Thread(target=produce, args=(cluster, ids, 9.0))
    try:
        time.sleep(3.0)  # both joined
        producing.start()
        for i, name in enumerate(("a2", "b2")):
            time.sleep(3.0)
            replicas[i].send_signal(signal.SIGTERM)
            assert replicas[i].wait(40) == 0
            replicas[i] = cluster.start_daemon(name, **paced)[0]
        producing.join()
        records = read_result_records(cluster, set(ids), timeout_s=150)
    finally:
        for replica in replicas:
            stop_process(replica, 40)
    statuses: dict[str, set[str]] = {}
    for record in records:
        statuses.setdefault(record.id, set()).add(record.status.value)
    assert set(ids) <= statuses.keys(), "a rolling restart lost queries"
    assert [i for i, s in statuses.items() if len(s) > 1] == []
    copies = Counter(r.id for r in records)
    assert max(copies.values()) == 1, "the next owner re-read queries that had a result"


def test_backend_faults_retry_elsewhere_and_an_outage_is_waited_out(
    cluster: Cluster, shared_data: Path
) -> None:
    rollouts = shared_data / "rollouts.jsonl"
    port_a, port_b = free_loopback_port(), free_loopback_port()
    sim_a = start_simulator(rollouts, port_a, cluster.logs / "sim-a.log")
    sim_b = start_simulator(rollouts, port_b, cluster.logs / "sim-b.log")
    endpoints = f"http://127.0.0.1:{port_a},http://127.0.0.1:{port_b}"
    daemon, port = cluster.start_daemon("faults", endpoints)
    try:
        time.sleep(1.0)
        # One endpoint dies mid-stream: its requests go to the other; nothing fails.
        first = [f"f{i:05d}" for i in range(400)]
        sim_a.send_signal(signal.SIGKILL)
        produce(cluster, first, seconds=2.0)
        results = read_result_records(cluster, set(first))
        assert {r.id for r in results} >= set(first)
        assert not [r for r in results if r.status.value == "failed"]
        # Every endpoint down: the daemon waits (not ready, outage gauge up), fails nothing.
        sim_b.send_signal(signal.SIGKILL)
        down = [f"d{i:05d}" for i in range(100)]
        produce(cluster, down, seconds=0.5)
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "the daemon never reported the outage"
            time.sleep(0.5)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "clear_backend_outage 1.0" in metrics
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        time.sleep(8.0)  # the outage lasts a while; queued queries wait, none fail
        # What arrives meanwhile waits in Kafka, and the lag says so: the partitions are
        # paused, so the broker is asked for their end offsets.
        late = [f"l{i:05d}" for i in range(50)]
        produce(cluster, late, seconds=0.2)
        deadline = time.monotonic() + 20
        while _gauge(f"http://127.0.0.1:{port}/metrics", "clear_consumer_lag") < len(late):
            assert time.monotonic() < deadline, "the lag never counted what arrived while paused"
            time.sleep(0.5)
        # An endpoint returns: the waiting queries are served, the daemon is ready again.
        sim_a = start_simulator(rollouts, port_a, cluster.logs / "sim-a.log")
        waited = set(down) | set(late)
        results = [r for r in read_result_records(cluster, waited) if r.id in waited]
        assert {r.id for r in results} == waited
        assert not [r for r in results if r.status.value == "failed"], "an outage failed queries"
        assert any(r.status.value == "answered" for r in results), "no recovery"
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        log = (cluster.logs / "faults.log").read_text()
        assert "vllm_outage_started" in log
        assert "vllm_outage_over" in log
    finally:
        for process in (daemon, sim_a, sim_b):
            stop_process(process, 30)


def _gauge(url: str, name: str) -> float:
    """A gauge's value in the daemon's /metrics (0 when absent)."""
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_soak_mixed_input_and_backend_faults_keeps_memory_flat(
    cluster: Cluster, shared_data: Path
) -> None:
    """Bounded soak (about a minute, loopback only): 6,000 messages, one in ten malformed, while
    one of two endpoints is killed and restarted every few seconds."""
    rollouts = shared_data / "rollouts.jsonl"
    port_a, port_b = free_loopback_port(), free_loopback_port()
    sims = {port_a: start_simulator(rollouts, port_a, cluster.logs / "sim-a.log"),
            port_b: start_simulator(rollouts, port_b, cluster.logs / "sim-b.log")}  # fmt: skip
    endpoints = f"http://127.0.0.1:{port_a},http://127.0.0.1:{port_b}"
    daemon, http_port = cluster.start_daemon("soak", endpoints)
    rounds, per_round = 12, 500
    sent_ids: list[str] = []
    bad = 0
    rss: list[float] = []
    try:
        time.sleep(1.0)
        for round_ in range(rounds):
            flaky = sims[port_a]
            if round_ % 2 == 0:
                flaky.send_signal(signal.SIGKILL)
                flaky.wait(10)
            else:
                sims[port_a] = start_simulator(rollouts, port_a, cluster.logs / "sim-a.log")
            ids = [f"s{round_:02d}-{i:04d}" for i in range(per_round)]
            bad += send_mixed(cluster, ids)
            sent_ids += [qid for i, qid in enumerate(ids) if i % 10]
            rss.append(rss_mib(daemon.pid))
        results = read_result_records(cluster, set(sent_ids), timeout_s=180)
        letters = read_all_values(cluster, cluster.topics[2], bad)
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=5).status_code == 200
        assert daemon.poll() is None, "the daemon died during the soak"
    finally:
        for process in (daemon, *sims.values()):
            stop_process(process, 30)
    counts = Counter(r.id for r in results if r.status.value != "rejected")
    assert set(sent_ids) <= counts.keys(), "a query got no terminal result"
    assert max(counts.values()) == 1, "a query got two terminal results without any restart"
    assert len(letters) == bad
    # Memory: after warm-up, RSS stays within a small band (no per-query leak).
    warm = rss[2:]
    print(
        f"soak: {len(sent_ids) + bad} messages, {bad} malformed, RSS MiB {[round(x) for x in rss]}"
    )
    assert max(warm) - min(warm) < 40, f"RSS grew: {warm}"


def send_mixed(cluster: Cluster, ids: list[str]) -> int:
    """Produce `ids`, every tenth as malformed JSON; returns how many were malformed."""

    async def send() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=5)
        await producer.start()
        malformed = 0
        try:
            for i, qid in enumerate(ids):
                if i % 10 == 0:
                    value, malformed = b'{"id": "' + qid.encode() + b'", "prompt": 7', malformed + 1
                else:
                    value = json.dumps({"id": qid, "prompt": f"problem: {qid}"}).encode()
                await producer.send(cluster.topics[0], value, key=qid.encode())
                if i % 50 == 0:
                    await asyncio.sleep(0.02)  # a steady stream, not one burst
            await producer.flush()
        finally:
            await producer.stop()
        return malformed

    return asyncio.run(send())


def read_all_values(cluster: Cluster, topic: str, want: int, timeout_s: float = 60) -> list[bytes]:
    async def read() -> list[bytes]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=cluster.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            deadline = time.monotonic() + timeout_s
            while len(values) < want and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                values += [r.value for rs in batch.values() for r in rs]
        finally:
            await consumer.stop()
        return values

    return asyncio.run(read())


def start_proxy(listen: int, target: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.tcp_proxy", str(listen), str(target)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for_port("127.0.0.1", listen, 30, process)
    return process


def http_status(port: int, path: str) -> int:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code


def test_broker_outage_not_ready_then_resumes(shared_data: Path, tmp_path: Path) -> None:
    """The broker is cut off (a proxy in front of it dies): the daemon reports not-ready, keeps
    running, and once the broker is reachable again publishes everything it owed."""
    proxy_port, broker_port = free_loopback_port(), free_loopback_port()
    broker = start_embedded_broker(port=broker_port, advertised_port=proxy_port)
    proxy = start_proxy(proxy_port, broker_port)
    sim_port = free_loopback_port()
    simulator = start_simulator(shared_data / "rollouts.jsonl", sim_port, tmp_path / "sim.log")
    bootstrap = f"127.0.0.1:{proxy_port}"
    cluster = Cluster(bootstrap, f"http://127.0.0.1:{sim_port}", tmp_path,
                      ("out.queries", "out.results", "out.dlq"), "outage")  # fmt: skip

    async def create() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 2, 1) for t in cluster.topics])
        finally:
            await admin.close()

    daemon = None
    try:
        asyncio.run(create())
        daemon, port = cluster.start_daemon("outage")
        assert http_status(port, "/readyz") == 200
        before = [f"o{i:04d}" for i in range(300)]
        produce(cluster, before, seconds=1.0)
        # Cut the broker off while those queries' windows are still open or publishing.
        stop_process(proxy, 10)
        deadline = time.monotonic() + 30
        while http_status(port, "/readyz") == 200:
            assert time.monotonic() < deadline, "/readyz stayed green without a broker"
            time.sleep(0.5)
        time.sleep(3.0)  # a few retry rounds
        assert daemon.poll() is None, "the daemon crashed during the outage"
        assert http_status(port, "/healthz") == 200

        proxy = start_proxy(proxy_port, broker_port)
        deadline = time.monotonic() + 60
        while http_status(port, "/readyz") != 200:
            assert time.monotonic() < deadline, "/readyz never turned green again"
            time.sleep(0.5)
        after = [f"p{i:04d}" for i in range(300)]
        produce(cluster, after, seconds=1.0)
        counts = read_results(cluster, set(before + after))
        assert set(before + after) <= counts.keys(), "queries lost across the outage"
    finally:
        if daemon is not None:
            stop_process(daemon, 40)
        for process in (proxy, simulator):
            stop_process(process, 10)
        broker.stop()
