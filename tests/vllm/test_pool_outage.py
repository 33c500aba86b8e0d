"""The vLLM pool through an outage: requests wait instead of failing, health probes end it early.

The fake transport from test_pool_transport.py stands in for the pods, and a fake clock whose
`sleep` moves time on at once stands in for time, so a 20 s outage takes milliseconds; one test
runs the same story against real loopback pods (test_pool.py's `Pods`) on the real clock.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from clearbudget.daemon.core.ports import BackendError, Completion
from clearbudget.daemon.replay.embedded import free_loopback_port
from clearbudget.daemon.vllm.breaker import BreakerSettings, CircuitBreaker
from clearbudget.daemon.vllm.pool import (
    AiohttpTransport,
    BackendRequestError,
    TransportError,
    VllmPool,
)
from tests.support.waiting import until
from tests.vllm.test_pool import Pods
from tests.vllm.test_pool import ok as pod_ok
from tests.vllm.test_pool import status as pod_status
from tests.vllm.test_pool_transport import FakeTransport, Post, ok

A = "http://pod-a:8000"
B = "http://pod-b:8000"
START = 1000.0
REFUSED = "ClientConnectorError: connection refused"


class FakeTime:
    """The pool's clock and sleep: a sleep moves the clock on by its length after one loop turn,
    so waiting out minutes costs microseconds; `sleeps` records every sleep asked for.

    Time runs that fast while a test polls too, so a test that looks at a waiting request for
    longer `freeze()`s it first: sleeps then block until `thaw()`.
    """

    def __init__(self) -> None:
        self.now = START
        self.sleeps: list[float] = []
        self._running = asyncio.Event()
        self._running.set()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await self._running.wait()
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()


class Outage:
    """Pods that refuse every connection (completions and /health) until their time comes.

    `back_at` maps an endpoint to the fake time it answers again (absent: never down). Up, a pod
    answers completions with `ok` and /health with `health_status`; `served_at` records when
    each completion was answered.
    """

    def __init__(self, transport: FakeTransport, clock: FakeTime, back_at: dict[str, float]):
        self.clock = clock
        self.back_at = back_at
        self.health_status = 200
        self.served_at: list[float] = []
        transport.respond = self.complete
        transport.health = self.health

    def down(self, endpoint: str) -> bool:
        return self.clock.now < self.back_at.get(endpoint, -math.inf)

    async def complete(self, post: Post) -> tuple[int, bytes]:
        if self.down(post.endpoint):
            raise TransportError(REFUSED)
        self.served_at.append(self.clock.now)
        return await ok(post)

    async def health(self, endpoint: str) -> tuple[int, bytes]:
        if self.down(endpoint):
            raise TransportError(REFUSED)
        return self.health_status, b"{}"


@dataclass
class Rig:
    """One test's fake pods, fake time and fresh registry; the pools it builds close after it."""

    transport: FakeTransport = field(default_factory=FakeTransport)
    time: FakeTime = field(default_factory=FakeTime)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    pools: list[VllmPool] = field(default_factory=list)

    def pool(self, endpoints: tuple[str, ...] = (A,), **options: Any) -> VllmPool:
        options.setdefault("breaker", BreakerSettings(failure_threshold=1, cooldown_s=30.0))
        options.setdefault("retry_backoff_s", 0.0)  # only the watcher's sleeps move the clock
        pool = VllmPool(
            endpoints,
            model="m",
            registry=self.registry,
            transport=self.transport,
            clock=self.time.clock,
            sleep=self.time.sleep,
            **options,
        )
        self.pools.append(pool)
        return pool

    def outage(self, back_at: dict[str, float]) -> Outage:
        return Outage(self.transport, self.time, back_at)

    def waiting(self) -> float:
        return metric(self.registry, "clear_backend_waiting_requests")

    def in_outage(self) -> float:
        return metric(self.registry, "clear_backend_outage")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = Rig()
    yield made
    made.time.thaw()
    for pool in made.pools:  # no watcher outlives its test
        await pool.aclose()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name} is not registered"
    return value


async def test_requests_wait_out_an_outage_and_none_fail(rig: Rig) -> None:
    # Both pods go down; A is back after 12 s, B never. The default breaker needs 5 failures,
    # so the first requests exhaust their attempts while both breakers are still closed: with
    # nothing succeeding anywhere that is an outage starting, not the requests' fault.
    outage = rig.outage({A: START + 12.0, B: math.inf})
    pool = rig.pool((A, B), breaker=BreakerSettings())
    results = await asyncio.gather(*(pool.complete(f"q{i}", n=1, max_tokens=4) for i in range(20)))
    assert all(isinstance(r, Completion) for r in results)
    assert pool.breaker_states() == {A: "closed", B: "open"}
    assert min(outage.served_at) < START + 30.0  # found by the probe, not the 30 s cooldown
    assert (rig.waiting(), rig.in_outage()) == (0.0, 0.0)
    assert pool.ready()


async def test_the_health_probe_half_opens_before_the_cooldown(rig: Rig) -> None:
    back = asyncio.Event()

    async def complete(post: Post) -> tuple[int, bytes]:
        if not back.is_set():
            raise TransportError(REFUSED)
        return await ok(post)

    async def health(endpoint: str) -> tuple[int, bytes]:
        await back.wait()  # the first probe is held here: the clock stops while we look
        return 200, b""

    rig.transport.respond, rig.transport.health = complete, health
    pool = rig.pool(api_key="k3y")
    request = asyncio.create_task(pool.complete("hi", n=1, max_tokens=4))
    await until(lambda: len(rig.transport.gets) == 1)
    assert rig.transport.gets == [(A + "/health", {"Authorization": "Bearer k3y"}, 5.0)]
    assert (pool.breaker_states(), pool.ready()) == ({A: "open"}, False)
    assert (rig.waiting(), rig.in_outage()) == (1.0, 1.0)
    assert not request.done()

    back.set()
    completion = await request
    assert completion.samples[0].text == "t0"
    assert rig.time.sleeps[0] == 0.5  # the first probe, 0.5 s in: long before the cooldown
    assert (pool.breaker_states(), pool.ready()) == ({A: "closed"}, True)
    assert (rig.waiting(), rig.in_outage()) == (0.0, 0.0)


async def test_waiters_wake_when_the_cooldown_passes(rig: Rig) -> None:
    # A proxy hides /health (404), so only the cooldown ends this outage. The watcher's ticks
    # back off 0.5, 1, 2, 4 s, then the last one is cut short to land on the cooldown's end.
    outage = rig.outage({A: START + 1.0})
    outage.health_status = 404
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=10.0)
    pool = rig.pool(breaker=breaker)
    await pool.complete("hi", n=1, max_tokens=4)
    assert outage.served_at == [START + 10.0]
    assert rig.time.sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 2.5]
    assert len(rig.transport.gets) == 4  # one probe per tick while the breaker was shut
    assert pool.breaker_states() == {A: "closed"}


async def test_a_waiter_gives_up_after_outage_wait_s(rig: Rig) -> None:
    rig.outage({A: math.inf})
    pool = rig.pool(outage_wait_s=20.0)
    with pytest.raises(BackendError, match=r"no vLLM endpoint came back within 20 s") as info:
        await pool.complete("hi", n=1, max_tokens=4)
    assert not isinstance(info.value, BackendRequestError)
    assert REFUSED in str(info.value)
    assert START + 20.0 <= rig.time.now <= START + 20.0 + 5.0  # within one tick of the bound
    assert rig.time.sleeps[:6] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]  # doubling, capped at 5 s
    assert rig.waiting() == 0.0
    assert len(rig.transport.posts) == 1  # the open breaker sent nothing more
    assert pool._watcher is not None
    await until(pool._watcher.done)  # nobody waits: the watcher stops probing


async def test_a_4xx_after_an_outage_fails_at_once_and_frees_the_trial(rig: Rig) -> None:
    outage = rig.outage({A: START + 3.0})

    async def complete(post: Post) -> tuple[int, bytes]:
        if post.body["prompt"] == "bad" and not outage.down(post.endpoint):
            return 400, b'{"error": {"message": "prompt is too long"}}'
        return await outage.complete(post)

    rig.transport.respond = complete
    pool = rig.pool()
    bad, *good = await asyncio.gather(
        pool.complete("bad", n=1, max_tokens=4),
        pool.complete("good-1", n=1, max_tokens=4),
        pool.complete("good-2", n=1, max_tokens=4),
        return_exceptions=True,
    )
    assert isinstance(bad, BackendRequestError)
    assert bad.status_code == 400
    assert all(isinstance(g, Completion) for g in good)
    sent_bad = [p for p in rig.transport.posts if p.body["prompt"] == "bad"]
    assert len(sent_bad) == 2  # refused in the outage, then the 400: not retried
    assert pool.breaker_states() == {A: "closed"}


async def test_a_request_failing_while_others_succeed_still_fails(rig: Rig) -> None:
    others_done = asyncio.Event()
    poison: list[Post] = []

    async def complete(post: Post) -> tuple[int, bytes]:
        if post.body["prompt"] != "poison":
            return await ok(post)
        poison.append(post)
        if len(poison) > 1:  # its retries answer once the other traffic has gone through
            await others_done.wait()
        return 500, b'{"error": {"message": "engine error"}}'

    rig.transport.respond = complete
    pool = rig.pool(breaker=BreakerSettings())
    failing = asyncio.create_task(pool.complete("poison", n=1, max_tokens=4))
    await until(lambda: len(poison) == 2)
    await asyncio.gather(*(pool.complete(f"q{i}", n=1, max_tokens=4) for i in range(3)))
    others_done.set()
    with pytest.raises(BackendError, match=r"after 3 attempt\(s\).*engine error"):
        await failing
    assert rig.transport.gets == []  # no outage: nothing waited, nothing probed
    assert pool.breaker_states() == {A: "closed"}


async def test_a_request_behind_a_half_open_trial_waits_for_its_verdict(rig: Rig) -> None:
    release = asyncio.Event()
    outage = rig.outage({A: START + 1.0})

    async def complete(post: Post) -> tuple[int, bytes]:
        if post.body["prompt"] == "trial" and not outage.down(post.endpoint):
            await release.wait()
        return await outage.complete(post)

    rig.transport.respond = complete
    pool = rig.pool()
    trial = asyncio.create_task(pool.complete("trial", n=1, max_tokens=4))
    await until(lambda: len(rig.transport.posts) == 2)  # refused, then sent as the trial and held
    rig.time.freeze()  # no watcher tick from here: only the trial's verdict can wake `behind`
    assert (pool.breaker_states(), pool.ready()) == ({A: "half_open"}, False)
    behind = asyncio.create_task(pool.complete("behind", n=1, max_tokens=4))
    await until(lambda: rig.waiting() == 1.0)
    assert len(rig.transport.posts) == 2  # no second trial
    release.set()
    await asyncio.gather(trial, behind)
    assert [p.body["prompt"] for p in rig.transport.posts] == ["trial", "trial", "behind"]


async def test_closing_the_pool_fails_the_waiters_and_stops_the_watcher(rig: Rig) -> None:
    held = asyncio.Event()

    async def health(endpoint: str) -> tuple[int, bytes]:
        await held.wait()  # never set: the probe is in flight when the pool closes
        return 200, b""

    rig.outage({A: math.inf})
    rig.transport.health = health
    pool = rig.pool()
    request = asyncio.create_task(pool.complete("hi", n=1, max_tokens=4))
    await until(lambda: len(rig.transport.gets) == 1)
    await pool.aclose()
    with pytest.raises(BackendError, match="closed"):
        await request
    assert pool._watcher is not None
    assert pool._watcher.cancelled()
    assert rig.transport.closed == 1


async def test_breaker_changes_are_logged_at_warning(rig: Rig) -> None:
    rig.outage({A: START + 0.5})
    with capture_logs() as logs:
        pool = rig.pool()
        await pool.complete("hi", n=1, max_tokens=4)
    events = [(e["event"], e["log_level"], e.get("endpoint")) for e in logs]
    assert events == [
        ("vllm_breaker_opened", "warning", A),
        ("vllm_outage_started", "warning", None),
        ("vllm_breaker_half_open", "warning", A),
        ("vllm_breaker_closed", "warning", A),
        ("vllm_outage_over", "warning", None),
    ]
    assert logs[-1]["duration_s"] == pytest.approx(0.5)  # the first probe found it back


async def test_the_log_label_has_no_credentials(rig: Rig) -> None:
    rig.outage({"http://u:secret@pod-a:8000": START + 1.0})
    with capture_logs() as logs:
        pool = rig.pool(("http://u:secret@pod-a:8000",))
        await pool.complete("hi", n=1, max_tokens=4)
    assert {e["endpoint"] for e in logs if "endpoint" in e} == {A}
    assert "secret" not in repr(logs)


async def test_outage_wait_s_zero_keeps_failing_fast(rig: Rig) -> None:
    rig.outage({A: math.inf})
    pool = rig.pool(outage_wait_s=0)
    with pytest.raises(BackendError, match="after 1 attempt"):
        await pool.complete("hi", n=1, max_tokens=4)
    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (rig.time.sleeps, rig.transport.gets) == ([], [])


def test_outage_wait_s_must_not_be_negative(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="outage_wait_s"):
        VllmPool((A,), model="m", registry=registry, outage_wait_s=-1)


def test_allow_trial_half_opens_only_an_open_breaker() -> None:
    changes: list[tuple[str, str]] = []
    now = [0.0]
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=1, cooldown_s=30.0),
        lambda: now[0],
        lambda old, new: changes.append((old, new)),
    )
    assert not breaker.allow_trial()  # closed: nothing to do
    breaker.finish("failure", trial=breaker.begin())
    assert (breaker.state, breaker.available(), breaker.cooldown_left()) == ("open", False, 30.0)
    now[0] = 12.0
    assert breaker.cooldown_left() == 18.0
    assert breaker.allow_trial()
    assert (breaker.state, breaker.available(), breaker.cooldown_left()) == ("half_open", True, 0)
    assert breaker.begin()  # the trial
    assert not breaker.available()
    assert not breaker.allow_trial()  # half-open already: no second trial beside it
    breaker.finish("success", trial=True)
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_the_aiohttp_transport_get_raises_transport_error_when_refused() -> None:
    transport = AiohttpTransport()
    with pytest.raises(TransportError):
        await transport.get(f"http://127.0.0.1:{free_loopback_port()}/health", {}, 1.0)
    await transport.aclose()


async def test_the_fault_injection_run_fails_no_query(registry: CollectorRegistry) -> None:
    """The reported run, shrunk onto the real clock: 400 queries, both pods out mid-stream (after
    100 answers, for 0.3 s), default breakers (5 failures, 30 s cooldown). It used to fail most
    queries, later ones included; now every one waits and succeeds, well before the cooldown."""
    transport = FakeTransport()
    loop = asyncio.get_running_loop()
    served = 0
    down_until = math.inf

    async def complete(post: Post) -> tuple[int, bytes]:
        nonlocal served, down_until
        await asyncio.sleep(0.001)  # a little latency, so queries overlap
        if served >= 100 and down_until == math.inf:
            down_until = loop.time() + 0.3
        if served >= 100 and loop.time() < down_until:
            raise TransportError(REFUSED)
        served += 1
        return await ok(post)

    async def health(endpoint: str) -> tuple[int, bytes]:
        if loop.time() < down_until:
            raise TransportError(REFUSED)
        return 200, b""

    transport.respond, transport.health = complete, health
    pool = VllmPool((A, B), model="m", registry=registry, transport=transport)
    try:
        with capture_logs() as logs:
            queries = (pool.complete(f"q{i}", n=1, max_tokens=4) for i in range(400))
            results = await asyncio.wait_for(asyncio.gather(*queries), timeout=10.0)
    finally:
        await pool.aclose()
    assert all(isinstance(r, Completion) for r in results)
    assert served == 400
    assert transport.gets  # the probe ended the outage
    events = {e["event"] for e in logs}
    assert {"vllm_breaker_opened", "vllm_outage_started", "vllm_outage_over"} <= events


async def test_real_pods_outage_then_recovery(registry: CollectorRegistry) -> None:
    """Loopback pods on the real clock: both refuse work and fail /health, then come back; the
    waiting requests all succeed, found by the probe well before the 30 s cooldown."""
    pods = Pods()
    await pods.start()
    pods.respond, pods.health_status = pod_status(503, "engine restarting"), 503
    pool = VllmPool(
        (pods.a, pods.b),
        model="m",
        registry=registry,
        breaker=BreakerSettings(failure_threshold=1, cooldown_s=30.0),
        retry_backoff_s=0.0,
        outage_wait_s=20.0,
    )
    try:
        requests = [
            asyncio.create_task(pool.complete(f"q{i}", n=1, max_tokens=4)) for i in range(8)
        ]
        await until(lambda: metric(registry, "clear_backend_waiting_requests") == 8.0)
        assert not pool.ready()
        assert metric(registry, "clear_backend_outage") == 1.0

        pods.respond, pods.health_status = pod_ok, 200
        # Within 10 s, so the probe found them: the breakers' 30 s cooldown cannot have passed.
        results = await asyncio.wait_for(asyncio.gather(*requests), timeout=10.0)
        assert all(isinstance(r, Completion) for r in results)
        assert pods.health_checks  # the probe went out over HTTP
        assert pool.ready()
        assert "closed" in pool.breaker_states().values()
        assert metric(registry, "clear_backend_waiting_requests") == 0.0
    finally:
        await pool.aclose()
        await pods.stop()
