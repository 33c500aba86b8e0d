"""A pod fleet behind one name, with real processes: two `clearbudget simulate-backend` pods.

The pods listen on the same port at 127.0.0.1 and 127.0.0.2 (all of 127/8 is loopback on Linux,
no root needed), as two pods of a headless Service listen on one port at their own addresses.
The name `vllm-fleet` resolves to them through the pool's resolver seam: changing /etc/hosts
or running a DNS server would need root, and the seam is where the pool meets DNS anyway (the
default resolver, getaddrinfo, is tested on its own in tests/vllm/test_pool_discovery.py).
Everything else is real: the pool's aiohttp transport, its discovery loop on a short interval,
the simulators' HTTP servers, a pod killed and brought back.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

import clearbudget.daemon.vllm.pool
from clearbudget.daemon.app import run_daemon
from clearbudget.daemon.kafka.service import Daemon
from clearbudget.daemon.replay.embedded import (
    EmbeddedBroker,
    free_loopback_port,
    stop_process,
    wait_for_port,
)
from clearbudget.daemon.settings import load_settings
from clearbudget.daemon.vllm.pool import BreakerSettings, VllmPool
from clearbudget.schemas.messages import QueryRequest, QueryResult
from tests.integration.conftest import TopicFactory
from tests.support.waiting import until
from tests.vllm.test_pool_discovery import FakeDns

pytestmark = pytest.mark.slow

POD_A, POD_B = "127.0.0.1", "127.0.0.2"


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Fleet:
    """Simulator processes, one per address, all on `port`; stopped after the test."""

    def __init__(self, rollouts: Path, logs: Path, port: int) -> None:
        self.rollouts, self.logs, self.port = rollouts, logs, port
        self.pods: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, host: str) -> None:
        with open(self.logs / f"sim-{host}.log", "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "clearbudget.daemon.cli", "simulate-backend", "--rollouts",
                 str(self.rollouts), "--host", host, "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pods[host] = process
        wait_for_port(host, self.port, 60, process)

    def stop(self, host: str) -> None:
        stop_process(self.pods.pop(host), 10)


@pytest.fixture
def fleet(shared_data: Path, tmp_path: Path) -> Iterator[Fleet]:
    port = free_loopback_port()
    if not _bindable(POD_B, port):
        pytest.skip(f"{POD_B} is not a loopback address here (Linux has all of 127/8)")
    running = Fleet(shared_data / "rollouts.jsonl", tmp_path, port)
    try:
        running.start(POD_A)
        running.start(POD_B)
        yield running
    finally:
        for host in list(running.pods):
            running.stop(host)


def served(registry: CollectorRegistry, label: str) -> float:
    return registry.get_sample_value(
        "clear_backend_requests_total", {"endpoint": label, "outcome": "ok"}
    ) or 0.0  # fmt: skip


async def test_a_fleet_behind_one_name_spreads_loses_a_pod_and_gets_it_back(
    fleet: Fleet, registry: CollectorRegistry
) -> None:
    name = f"vllm-fleet:{fleet.port}"
    a, b = f"{name}/{POD_A}", f"{name}/{POD_B}"
    dns = FakeDns({"vllm-fleet": [POD_A, POD_B]})
    pool = VllmPool(
        (f"http://{name}",),
        model="clearbudget-sim",
        registry=registry,
        breaker=BreakerSettings(failure_threshold=1, cooldown_s=300.0),
        discovery="dns",
        discovery_interval_s=0.2,
        resolver=dns,
        request_timeout_s=30.0,
        outage_wait_s=30.0,
    )
    try:
        await pool.start()
        assert pool.breaker_states() == {a: "closed", b: "closed"}
        for i in range(12):
            await pool.complete(f"problem: q{i}", n=1, max_tokens=64, seed=i)
        assert served(registry, a) == served(registry, b) == 6  # idle ties rotate over both

        fleet.stop(POD_B)  # pod B dies; DNS still lists it for a while, as kube-dns would
        for i in range(6):
            await pool.complete(f"problem: r{i}", n=1, max_tokens=64, seed=i)
        assert pool.breaker_states() == {a: "closed", b: "open"}  # only B's breaker
        assert pool.ready()

        dns.answers["vllm-fleet"] = [POD_A]  # B is no longer ready: it leaves the Service
        await until(lambda: set(pool.breaker_states()) == {a}, within_s=10)
        assert registry.get_sample_value("clear_backend_breaker_state", {"endpoint": b}) is None

        fleet.start(POD_B)  # a new pod B, ready again
        dns.answers["vllm-fleet"] = [POD_A, POD_B]
        await until(lambda: pool.breaker_states() == {a: "closed", b: "closed"}, within_s=10)
        before = served(registry, b)
        for i in range(8):
            await pool.complete(f"problem: s{i}", n=1, max_tokens=64, seed=i)
        assert served(registry, b) > before  # the returned pod gets traffic at once
        assert len(dns.lookups) >= 3  # the loop, not the test, looked the name up
    finally:
        await pool.aclose()


@pytest.mark.kafka
async def test_the_daemon_configured_for_dns_discovery_serves_from_every_pod(
    fleet: Fleet,
    kafka_broker: EmbeddedBroker,
    kafka_topic: TopicFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The whole daemon path: CLEAR_VLLM_DISCOVERY=dns -> build_backend -> start() -> the pods.
    dns = FakeDns({"vllm-fleet": [POD_A, POD_B]})
    monkeypatch.setattr(
        clearbudget.daemon.vllm.pool, "resolve_addresses", dns
    )  # the default resolver
    topics = [await kafka_topic(name) for name in ("queries", "results", "dlq")]
    settings = load_settings(
        {
            "CLEAR_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
            "CLEAR_INPUT_TOPIC": topics[0],
            "CLEAR_RESULT_TOPIC": topics[1],
            "CLEAR_DLQ_TOPIC": topics[2],
            "CLEAR_WINDOW_TOPIC": "",
            "CLEAR_CONSUMER_GROUP": topics[0],
            "CLEAR_VLLM_ENDPOINTS": f"http://vllm-fleet:{fleet.port}",
            "CLEAR_VLLM_DISCOVERY": "dns",
            "CLEAR_MODEL": "clearbudget-sim",
            "CLEAR_KAFKA_IDEMPOTENT_PRODUCER": "false",
            "CLEAR_TOKENS_PER_SECOND": "40000",
            "CLEAR_WINDOW_SECONDS": "0.5",
            "CLEAR_MIN_TOKENS_PER_QUERY": "0",
            "CLEAR_HTTP_PORT": str(free_loopback_port()),
            "CLEAR_HTTP_HOST": "127.0.0.1",
        },
        env_file=None,
    )
    registry = CollectorRegistry()
    stop = asyncio.Event()
    started: list[Daemon] = []
    task = asyncio.create_task(run_daemon(settings, stop, registry=registry,
                                          on_start=started.append))  # fmt: skip
    ids = [f"d{i}" for i in range(16)]
    results: dict[str, QueryResult] = {}
    try:
        await until(lambda: bool(started), 30)
        assert dns.lookups[0] == ("vllm-fleet", fleet.port)  # looked up before consuming
        producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
        await producer.start()
        try:
            for qid in ids:
                query = QueryRequest(id=qid, prompt=f"problem: {qid}")
                await producer.send_and_wait(topics[0], query.model_dump_json().encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topics[1], bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while set(results) != set(ids) and asyncio.get_running_loop().time() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        result = QueryResult.model_validate_json(record.value)
                        results[result.id] = result
        finally:
            await consumer.stop()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    assert set(results) == set(ids)
    assert all(r.status != "failed" for r in results.values()), results
    name = f"vllm-fleet:{fleet.port}"
    assert served(registry, f"{name}/{POD_A}") > 0
    assert served(registry, f"{name}/{POD_B}") > 0
