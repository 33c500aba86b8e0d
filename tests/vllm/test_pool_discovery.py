"""The vLLM pool over a pod fleet found by DNS (`discovery="dns"`): one endpoint per address.

A fake resolver stands in for DNS (one name, the addresses a test gives it) and the in-memory
transport of test_pool_transport.py for the pods, so each test says which pod exists, when, and
how it answers. `refresh()` looks the names up at once; the pools' own discovery interval is an
hour, so nothing else changes the fleet during a test. One test sends real HTTP (the `Host`
header on the wire); tests/integration/test_vllm_discovery.py runs two simulator processes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from clearbudget.daemon.core.ports import Completion
from clearbudget.daemon.vllm.breaker import BreakerSettings
from clearbudget.daemon.vllm.pool import VllmPool, resolve_addresses
from tests.support.waiting import until
from tests.vllm.test_pool import Pods
from tests.vllm.test_pool_outage import START, FakeTime
from tests.vllm.test_pool_transport import FakeTransport, Post, held_until, no_sleep, ok, status

FLEET = "http://vllm:8000"  # a headless Service: one name, an address per ready pod
P1, P2, P3 = "10.0.0.5", "10.0.0.6", "10.0.0.7"


def url(address: str) -> str:
    return f"http://{address}:8000"


def label(address: str) -> str:
    return f"vllm:8000/{address}"


class FakeDns:
    """The resolver seam: `answers[host]` is the address list a lookup returns now, or an
    exception it raises (a failed lookup); `lookups` records each (host, port) asked."""

    def __init__(self, answers: dict[str, Sequence[str] | Exception]) -> None:
        self.answers = answers
        self.lookups: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        answer = self.answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pools() -> AsyncIterator[list[VllmPool]]:
    made: list[VllmPool] = []
    yield made
    for pool in made:  # no discovery loop outlives its test
        await pool.aclose()


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


def fleet_pool(
    pools: list[VllmPool],
    transport: FakeTransport,
    registry: CollectorRegistry,
    dns: FakeDns,
    endpoints: tuple[str, ...] = (FLEET,),
    **options: Any,
) -> VllmPool:
    options.setdefault("clock", Clock())
    options.setdefault("sleep", no_sleep)
    pool = VllmPool(
        endpoints,
        model="m",
        registry=registry,
        transport=transport,
        discovery="dns",
        discovery_interval_s=3600.0,  # only the test's refresh() changes the fleet
        resolver=dns,
        **options,
    )
    pools.append(pool)
    return pool


def hold(transport: FakeTransport, prompt: str) -> asyncio.Event:
    """Answer every request at once but those for `prompt`, which wait for the event."""
    release = asyncio.Event()

    async def held(post: Post) -> tuple[int, bytes]:
        if post.body["prompt"] == prompt:
            await release.wait()
        return await ok(post)

    transport.respond = held
    return release


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def series_of(registry: CollectorRegistry, endpoint: str) -> list[str]:
    """Every exposed sample that carries `endpoint` as its label."""
    return [
        s.name
        for family in registry.collect()
        for s in family.samples
        if s.labels.get("endpoint") == endpoint
    ]


async def test_each_address_is_an_endpoint_sent_to_by_address_with_the_service_as_host(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1, P2]})
    pool = fleet_pool(pools, transport, registry, dns, api_key="k3y")
    assert pool.breaker_states() == {}  # nothing known before the first lookup
    await pool.start()
    assert dns.lookups == [("vllm", 8000)]
    assert pool.breaker_states() == {label(P1): "closed", label(P2): "closed"}
    assert pool.endpoints == (url(P1), url(P2))
    assert sample(registry, "clear_backend_endpoints") == 2

    release = asyncio.Event()
    transport.respond = held_until(release)
    held = [asyncio.create_task(pool.complete(f"q{i}", n=1, max_tokens=10)) for i in range(2)]
    await until(lambda: len(transport.posts) == 2)
    assert sorted(transport.endpoints) == [url(P1), url(P2)]  # least outstanding: one each
    for post in transport.posts:
        assert post.headers == {
            "Content-Type": "application/json",
            "Authorization": "Bearer k3y",
            "Host": "vllm:8000",
        }
    assert sample(registry, "clear_backend_outstanding_tokens", endpoint=label(P1)) == 10
    release.set()
    await asyncio.gather(*held)
    assert sample(registry, "clear_backend_requests_total", endpoint=label(P2), outcome="ok") == 1


async def test_one_bad_pod_opens_only_its_breaker_and_the_others_serve(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    async def p1_broken(post: Post) -> tuple[int, bytes]:
        if post.endpoint == url(P1):
            return await status(500, "CUDA error")(post)
        return await ok(post)

    transport.respond = p1_broken
    breaker = BreakerSettings(failure_threshold=2, cooldown_s=300.0)
    pool = fleet_pool(pools, transport, registry, FakeDns({"vllm": [P1, P2, P3]}), breaker=breaker)
    results = [await pool.complete(f"q{i}", n=1, max_tokens=4) for i in range(12)]
    assert all(isinstance(r, Completion) for r in results)  # retried on the healthy pods
    assert pool.breaker_states() == {
        label(P1): "open",
        label(P2): "closed",
        label(P3): "closed",
    }
    assert pool.ready()
    assert sample(registry, "clear_backend_breaker_state", endpoint=label(P1)) == 2.0
    assert sample(registry, "clear_backend_breaker_state", endpoint=label(P2)) == 0.0
    sent = len(transport.posts)
    for i in range(6):
        await pool.complete(f"more{i}", n=1, max_tokens=4)
    assert url(P1) not in transport.endpoints[sent:]  # its open breaker sends nothing
    assert {url(P2), url(P3)} == set(transport.endpoints[sent:])
    assert transport.endpoints.count(url(P1)) == 2  # the two failures that opened it


async def test_a_pod_added_by_dns_gets_traffic(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1]})
    pool = fleet_pool(pools, transport, registry, dns)
    release = asyncio.Event()
    transport.respond = held_until(release)
    busy = asyncio.create_task(pool.complete("long", n=1, max_tokens=1000))
    await until(lambda: len(transport.posts) == 1)
    assert transport.endpoints == [url(P1)]

    dns.answers["vllm"] = [P1, P2]
    with capture_logs() as logs:
        await pool.refresh()
    assert {"event": "vllm_endpoint_added", "endpoint": label(P2), "log_level": "info"} in logs
    assert pool.breaker_states() == {label(P1): "closed", label(P2): "closed"}
    assert sample(registry, "clear_backend_endpoints") == 2
    new = [asyncio.create_task(pool.complete(f"s{i}", n=1, max_tokens=10)) for i in range(3)]
    await until(lambda: len(transport.posts) == 4)
    assert transport.endpoints[1:] == [url(P2)] * 3  # fewest outstanding tokens: the new pod
    release.set()
    await asyncio.gather(busy, *new)


async def test_a_removed_pod_takes_no_new_request_and_its_request_in_flight_completes(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1, P2]})
    pool = fleet_pool(pools, transport, registry, dns)
    release = hold(transport, "held")
    await pool.start()
    in_flight = asyncio.create_task(pool.complete("held", n=1, max_tokens=4))
    await until(lambda: len(transport.posts) == 1)
    (gone,) = [a for a in (P1, P2) if transport.endpoints == [url(a)]]
    (stays,) = [a for a in (P1, P2) if a != gone]

    dns.answers["vllm"] = [stays]
    await pool.refresh()
    assert pool.breaker_states() == {label(stays): "closed"}  # out of the routing at once
    assert sample(registry, "clear_backend_endpoints") == 1
    assert sample(registry, "clear_backend_in_flight_requests", endpoint=label(gone)) == 1
    for i in range(4):  # none of these may go to the drained pod
        await pool.complete(f"new{i}", n=1, max_tokens=4)
    assert transport.endpoints[1:] == [url(stays)] * 4
    assert not in_flight.done()

    with capture_logs() as logs:
        release.set()
        completion = await in_flight  # the drained pod's answer is used
    assert completion.samples[0].text == "t0"
    assert {"event": "vllm_endpoint_removed", "endpoint": label(gone), "log_level": "info"} in logs
    # Once idle, every series of the removed pod goes: labels follow the fleet, not its history.
    assert series_of(registry, label(gone)) == []
    assert series_of(registry, label(stays))


async def test_a_failed_lookup_keeps_the_pods_and_warns_once_a_minute(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1, P2]})
    clock = Clock()
    pool = fleet_pool(pools, transport, registry, dns, clock=clock)
    await pool.start()
    dns.answers["vllm"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in resolution")
    with capture_logs() as logs:
        for _ in range(3):
            await pool.refresh()
            clock.now += 10.0
        clock.now += 40.0  # a minute after the first warning
        await pool.refresh()
    warnings = [e for e in logs if e["event"] == "vllm_discovery_lookup_failed"]
    assert [(w["name"], w["failures"], w["kept"]) for w in warnings] == [
        ("vllm:8000", 1, 2),
        ("vllm:8000", 3, 2),  # the two it held back, and this one
    ]
    assert "Temporary failure" in warnings[0]["error"]
    assert pool.breaker_states() == {label(P1): "closed", label(P2): "closed"}
    await pool.complete("still served", n=1, max_tokens=4)

    dns.answers["vllm"] = [P2]
    with capture_logs() as logs:
        await pool.refresh()
    assert [e["failures"] for e in logs if e["event"] == "vllm_discovery_lookup_recovered"] == [4]
    assert pool.breaker_states() == {label(P2): "closed"}


async def test_a_lookup_that_hangs_is_a_failed_one(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr("clearbudget.daemon.vllm.pool._RESOLVE_TIMEOUT_S", 0.01)
    dns = FakeDns({"vllm": [P1]})
    pool = fleet_pool(pools, transport, registry, dns)
    await pool.start()

    async def hang(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        return []

    pool._resolver = hang
    with capture_logs() as logs:
        await pool.refresh()
    assert [e["event"] for e in logs] == ["vllm_discovery_lookup_failed"]
    assert pool.breaker_states() == {label(P1): "closed"}


async def test_no_address_is_an_outage_until_the_pods_return(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    fake = FakeTime()
    fake.freeze()  # the outage watcher's ticks wait: only DNS can end this outage
    dns = FakeDns({"vllm": [P1]})
    pool = fleet_pool(pools, transport, registry, dns, clock=fake.clock, sleep=fake.sleep)
    await pool.start()
    dns.answers["vllm"] = []  # the Service has no ready pod (NXDOMAIN)
    with capture_logs() as logs:
        await pool.refresh()
    assert [e["event"] for e in logs] == ["vllm_endpoint_draining", "vllm_endpoint_removed",
                                          "vllm_discovery_no_address"]  # fmt: skip
    assert (pool.breaker_states(), pool.ready()) == ({}, False)
    assert sample(registry, "clear_backend_outage") == 1.0

    request = asyncio.create_task(pool.complete("hi", n=1, max_tokens=4))
    await until(lambda: sample(registry, "clear_backend_waiting_requests") == 1.0)
    await pool.refresh()  # still nothing: it keeps waiting
    await asyncio.sleep(0.01)
    assert not request.done()
    assert transport.posts == []

    dns.answers["vllm"] = [P2, P3]  # new pods, new addresses
    await pool.refresh()
    completion = await request
    assert completion.samples[0].text == "t0"
    assert transport.endpoints[0] in {url(P2), url(P3)}
    assert pool.ready()
    assert sample(registry, "clear_backend_outage") == 0.0
    assert sample(registry, "clear_backend_waiting_requests") == 0.0
    assert fake.now == START  # woken by the lookup, not by a tick
    fake.thaw()


async def test_chain_affinity_holds_per_pod_and_survives_a_dns_flap(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1, P2, P3]})
    pool = fleet_pool(pools, transport, registry, dns)
    await pool.complete("probe", n=1, max_tokens=4)
    (home,) = transport.endpoints
    for _ in range(4):  # without affinity, idle ties would rotate over the three pods
        await pool.complete("probet0", n=1, max_tokens=4)
    assert transport.endpoints[1:] == [home] * 4

    home_address = home.removeprefix("http://").removesuffix(":8000")
    others = [a for a in (P1, P2, P3) if a != home_address]
    dns.answers["vllm"] = others  # the chain's pod leaves: its continuation goes elsewhere
    await pool.refresh()
    await pool.complete("probet0", n=1, max_tokens=4)
    assert transport.endpoints[-1] != home

    dns.answers["vllm"] = [P1, P2, P3]  # and comes back (a readiness flap): the chain follows
    await pool.refresh()
    await pool.complete("probet0", n=1, max_tokens=4)
    assert transport.endpoints[-1] == home


async def test_addresses_and_names_mix(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    # An IP literal is one endpoint as configured; a name is looked up; IPv6 is bracketed.
    dns = FakeDns({"vllm": ["fd00::5", "fd00:0:0::6"]})
    pool = fleet_pool(pools, transport, registry, dns, endpoints=("http://10.1.1.1:9000", FLEET))
    await pool.start()
    assert pool.endpoints == (
        "http://10.1.1.1:9000",
        "http://[fd00::5]:8000",
        "http://[fd00::6]:8000",
    )
    assert set(pool.breaker_states()) == {"http://10.1.1.1:9000", "vllm:8000/fd00::5",
                                          "vllm:8000/fd00::6"}  # fmt: skip
    assert dns.lookups == [("vllm", 8000)]


@pytest.mark.parametrize(
    ("endpoints", "options", "message"),
    [
        ((FLEET,), {"discovery": "srv"}, "discovery: must be 'none' or 'dns'"),
        ((FLEET,), {"discovery": "dns", "discovery_interval_s": 0}, "discovery_interval_s"),
        ((FLEET, "https://vllm:8000"), {"discovery": "dns"}, "share metric labels"),
    ],
)
def test_discovery_arguments_are_checked(
    endpoints: tuple[str, ...], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        VllmPool(endpoints, model="m", registry=CollectorRegistry(), **options)


async def test_the_default_resolver_reads_no_such_name_as_no_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    assert await resolve_addresses("127.0.0.1", 8000) == ["127.0.0.1"]

    async def answer(error: socket.gaierror) -> list[str]:
        async def getaddrinfo(*args: Any, **kwargs: Any) -> list[Any]:
            raise error

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        return await resolve_addresses("vllm", 8000)

    assert await answer(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == []
    with pytest.raises(socket.gaierror):  # a lookup that failed, not an answer
        await answer(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in resolution"))


async def test_the_aiohttp_transport_sends_the_service_name_as_host(
    pools: list[VllmPool], registry: CollectorRegistry
) -> None:
    # Real HTTP: the pool's own transport connects to the address and names the Service.
    pods = Pods()
    await pods.start()
    try:
        port = int(pods.a.rsplit(":", 1)[1])
        pool = VllmPool(
            (f"http://vllm-fleet:{port}",),
            model="m",
            registry=registry,
            discovery="dns",
            discovery_interval_s=3600.0,
            resolver=FakeDns({"vllm-fleet": ["127.0.0.1"]}),
        )
        pools.append(pool)
        await pool.complete("hi", n=1, max_tokens=4)
        (sent,) = pods.requests
        assert sent.pod == pods.a
        assert sent.headers["Host"] == f"vllm-fleet:{port}"
        assert pool.breaker_states() == {f"vllm-fleet:{port}/127.0.0.1": "closed"}
    finally:
        await pods.stop()


async def test_a_request_queued_for_a_pod_that_leaves_goes_to_one_that_stays(
    pools: list[VllmPool], transport: FakeTransport, registry: CollectorRegistry
) -> None:
    dns = FakeDns({"vllm": [P1]})
    # One attempt per request: the departed pod must not use it up.
    pool = fleet_pool(pools, transport, registry, dns, max_concurrency_per_endpoint=1,
                      max_attempts=1, outage_wait_s=0)  # fmt: skip
    release = hold(transport, "held")
    await pool.start()
    held = asyncio.create_task(pool.complete("held", n=1, max_tokens=4))
    await until(lambda: len(transport.posts) == 1)
    queued = asyncio.create_task(pool.complete("queued", n=1, max_tokens=4))
    await asyncio.sleep(0.01)  # waiting for P1's only slot
    dns.answers["vllm"] = [P2]
    await pool.refresh()
    release.set()
    await asyncio.gather(held, queued)
    assert transport.endpoints == [url(P1), url(P2)]  # sent where the fleet now is
    assert pool.breaker_states() == {label(P2): "closed"}
