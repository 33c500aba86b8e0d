"""The vLLM pool's policy (routing, retries, breakers, outcomes) through an in-memory transport.

No sockets: a fake `Transport` records each POST (and health GET) and answers from a script, so
each test says exactly which endpoint fails how.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.ports import BackendError, Completion, Sample
from clearbudget.daemon.settings import Scrubber
from clearbudget.daemon.vllm.breaker import BreakerSettings
from clearbudget.daemon.vllm.pool import (
    BackendRequestError,
    Transport,
    TransportError,
    TransportTimeout,
    VllmPool,
)
from clearbudget.daemon.vllm.protocol import ApiError, encode_completion
from tests.support.waiting import until

A = "http://pod-a:8000"
B = "http://pod-b:8000"


@dataclass
class Post:
    """One request as the transport was asked to send it."""

    endpoint: str
    body: dict[str, Any]
    headers: dict[str, str]
    timeout_s: float


Script = Callable[[Post], Awaitable[tuple[int, bytes]]]
HealthScript = Callable[[str], Awaitable[tuple[int, bytes]]]  # endpoint → status, body


class FakeTransport:
    """Records every POST and GET and answers through `respond` and `health`; counts
    `aclose()` calls."""

    def __init__(self) -> None:
        self.respond: Script = ok
        self.health: HealthScript = healthy
        self.posts: list[Post] = []
        self.gets: list[tuple[str, dict[str, str], float]] = []  # (url, headers, timeout_s)
        self.closed = 0

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        post = Post(
            url.removesuffix("/v1/completions"), orjson.loads(body), dict(headers), timeout_s
        )
        self.posts.append(post)
        return await self.respond(post)

    async def get(
        self, url: str, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        self.gets.append((url, dict(headers), timeout_s))
        return await self.health(url.removesuffix("/health"))

    async def aclose(self) -> None:
        self.closed += 1

    @property
    def endpoints(self) -> list[str]:
        return [post.endpoint for post in self.posts]


async def ok(post: Post) -> tuple[int, bytes]:
    n = post.body["n"]
    samples = tuple(Sample(f"t{i}", "stop", 1, (100 + i,)) for i in range(n))
    completion = Completion(samples, prompt_tokens=3, completion_tokens=n, prompt_token_ids=(1,))
    return 200, encode_completion(completion, model=post.body["model"], created=0)


async def healthy(endpoint: str) -> tuple[int, bytes]:
    return 200, b'{"status": "ok"}'


def status(code: int, message: str = "boom") -> Script:
    async def respond(post: Post) -> tuple[int, bytes]:
        return code, ApiError.for_status(code, message).encode()

    return respond


def first_then_ok(failure: Script) -> Script:
    """`failure` for the first request, `ok` for every later one."""

    async def respond(post: Post) -> tuple[int, bytes]:
        calls = len(post_log)
        post_log.append(post)
        return await (failure(post) if calls == 0 else ok(post))

    post_log: list[Post] = []
    return respond


def raising(error: Exception) -> Script:
    async def respond(post: Post) -> tuple[int, bytes]:
        raise error

    return respond


def held_until(release: asyncio.Event) -> Script:
    async def respond(post: Post) -> tuple[int, bytes]:
        await release.wait()
        return await ok(post)

    return respond


async def no_sleep(seconds: float) -> None:
    return None


@pytest.fixture
def transport() -> FakeTransport:
    return FakeTransport()


def make_pool(
    transport: Transport,
    registry: CollectorRegistry,
    endpoints: tuple[str, ...] = (A, B),
    **options: Any,
) -> VllmPool:
    options.setdefault("clock", lambda: 1000.0)
    return VllmPool(
        endpoints, model="m", registry=registry, transport=transport, sleep=no_sleep, **options
    )


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def outcomes(registry: CollectorRegistry, endpoint: str) -> dict[str, float]:
    names = ("ok", "timeout", "transport", "http_429", "http_5xx", "http_4xx", "bad_response")
    counts = {
        name: metric(registry, "clear_backend_requests_total", endpoint=endpoint, outcome=name)
        for name in names
    }
    return {name: count for name, count in counts.items() if count}


async def test_the_request_goes_out_encoded_with_headers_and_time_out(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    pool = make_pool(transport, registry, (A,), api_key="k3y", request_timeout_s=12.5)
    completion = await pool.complete((5, 6), n=2, max_tokens=4, seed=1)
    (post,) = transport.posts
    assert post.endpoint == A
    assert post.body["prompt"] == [5, 6]
    assert (post.body["n"], post.body["seed"], post.body["return_token_ids"]) == (2, 1, True)
    assert post.headers == {"Content-Type": "application/json", "Authorization": "Bearer k3y"}
    assert post.timeout_s == 12.5
    assert [s.token_ids for s in completion.samples] == [(100,), (101,)]
    await pool.aclose()
    assert transport.closed == 1


async def test_routes_by_least_outstanding_tokens(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    release = asyncio.Event()
    transport.respond = held_until(release)
    pool = make_pool(transport, registry)
    big = asyncio.create_task(pool.complete("big", n=2, max_tokens=500))
    await until(lambda: len(transport.posts) == 1)
    (busy,) = transport.endpoints
    other = B if busy == A else A
    small = [asyncio.create_task(pool.complete(f"s{i}", n=1, max_tokens=100)) for i in range(3)]
    await until(lambda: len(transport.posts) == 4)
    assert transport.endpoints[1:] == [other] * 3  # 1000 tokens outweigh 3 x 100
    assert metric(registry, "clear_backend_outstanding_tokens", endpoint=busy) == 1000
    assert metric(registry, "clear_backend_outstanding_tokens", endpoint=other) == 300
    release.set()
    await asyncio.gather(big, *small)
    assert metric(registry, "clear_backend_outstanding_tokens", endpoint=other) == 0


async def test_a_5xx_is_retried_on_the_other_endpoint(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    transport.respond = first_then_ok(status(503, "draining"))
    pool = make_pool(transport, registry)
    completion = await pool.complete("hi", n=1, max_tokens=4)
    assert completion.samples[0].text == "t0"
    failed, answered = transport.endpoints
    assert failed != answered
    assert outcomes(registry, failed) == {"http_5xx": 1}
    assert outcomes(registry, answered) == {"ok": 1}
    assert metric(registry, "clear_backend_errors_total", endpoint=failed) == 1


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (TransportTimeout("timed out (TimeoutError)"), "timeout"),
        (TransportError("ClientConnectorError: refused"), "transport"),
    ],
)
async def test_transport_failures_are_counted_by_kind_and_retried(
    transport: FakeTransport, registry: CollectorRegistry, error: Exception, outcome: str
) -> None:
    transport.respond = first_then_ok(raising(error))
    pool = make_pool(transport, registry)
    await pool.complete("hi", n=1, max_tokens=4)
    failed, answered = transport.endpoints
    assert failed != answered
    assert outcomes(registry, failed) == {outcome: 1}
    assert outcomes(registry, answered) == {"ok": 1}


async def test_every_attempt_failing_raises_with_each_reason(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    transport.respond = raising(TransportTimeout("timed out (TimeoutError)"))
    # outage_wait_s=0: every endpoint failing is an outage, which the pool now waits out
    # (test_pool_outage.py); fail-fast keeps this test about the attempts and their reasons.
    pool = make_pool(transport, registry, max_attempts=3, outage_wait_s=0)
    with pytest.raises(BackendError, match=r"after 3 attempt.*timed out") as info:
        await pool.complete("hi", n=1, max_tokens=4)
    assert not isinstance(info.value, BackendRequestError)
    assert sorted(transport.endpoints[:2]) == [A, B]  # both before one is reused


async def test_breaker_opens_after_the_threshold_and_stops_sending(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    transport.respond = status(500)
    breaker = BreakerSettings(failure_threshold=3, cooldown_s=10.0)
    # outage_wait_s=0: fail fast once the only breaker is open, so each call ends here and the
    # sends can be counted; waiting out an outage is test_pool_outage.py's subject.
    pool = make_pool(transport, registry, (A,), breaker=breaker, max_attempts=1, outage_wait_s=0)
    for _ in range(2):
        with pytest.raises(BackendError, match="HTTP 500: boom"):
            await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), pool.ready()) == ({A: "closed"}, True)
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), pool.ready()) == ({A: "open"}, False)
    assert metric(registry, "clear_backend_breaker_state", endpoint=A) == 2.0
    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert len(transport.posts) == 3  # an open breaker sends nothing


async def test_a_4xx_is_not_retried_and_leaves_the_breaker_closed(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    transport.respond = status(400, "max_tokens is too large")
    breaker = BreakerSettings(failure_threshold=1)
    pool = make_pool(transport, registry, breaker=breaker)
    with pytest.raises(BackendRequestError, match=r"HTTP 400.*max_tokens is too large") as info:
        await pool.complete("hi", n=1, max_tokens=4)
    assert info.value.status_code == 400
    (endpoint,) = transport.endpoints
    assert outcomes(registry, endpoint) == {"http_4xx": 1}
    assert pool.breaker_states() == {A: "closed", B: "closed"}


async def test_a_malformed_answer_is_retried_as_bad_response(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    async def two_choices(post: Post) -> tuple[int, bytes]:
        return await ok(Post(post.endpoint, post.body | {"n": 2}, post.headers, post.timeout_s))

    transport.respond = first_then_ok(two_choices)
    pool = make_pool(transport, registry)
    await pool.complete("hi", n=1, max_tokens=4)
    failed, _ = transport.endpoints
    assert outcomes(registry, failed) == {"bad_response": 1}


async def test_tokens_of_a_garbled_answer_are_charged_on_the_next(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    """A 200 the pool cannot use was still generated: its usage (two chains, 2 tokens here)
    rides on the answer that is used, so the query is charged for both."""

    async def two_choices(post: Post) -> tuple[int, bytes]:
        return await ok(Post(post.endpoint, post.body | {"n": 2}, post.headers, post.timeout_s))

    transport.respond = first_then_ok(two_choices)
    completion = await make_pool(transport, registry).complete("hi", n=1, max_tokens=4)
    assert (completion.completion_tokens, completion.discarded_tokens) == (1, 2)


async def test_an_unreadable_answer_is_charged_its_whole_allowance(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    async def garbled(post: Post) -> tuple[int, bytes]:
        return 200, b'{"choices": [tru'

    transport.respond = garbled
    pool = make_pool(transport, registry, max_attempts=2, outage_wait_s=0)  # fail, not wait
    with pytest.raises(BackendError) as failure:
        await pool.complete("hi", n=3, max_tokens=10)
    assert failure.value.discarded_tokens == 2 * 3 * 10  # both attempts, n x max_tokens each


async def test_errors_without_an_answer_charge_nothing(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    transport.respond = status(503)
    with pytest.raises(BackendError) as failure:
        await make_pool(transport, registry, outage_wait_s=0).complete("hi", n=1, max_tokens=4)
    assert failure.value.discarded_tokens == 0


async def test_a_closed_pool_refuses_without_sending(
    transport: FakeTransport, registry: CollectorRegistry
) -> None:
    pool = make_pool(transport, registry)
    await pool.aclose()
    with pytest.raises(BackendError, match="closed"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert transport.posts == []
    assert (transport.closed, pool.ready()) == (1, False)


@pytest.mark.parametrize("code", [400, 500])
async def test_an_echoing_backend_leaks_neither_credentials_nor_the_prompt(code: int) -> None:
    prompt = "the user's private question about their medical history"

    async def echo(post: Post) -> tuple[int, bytes]:
        echoed = orjson.dumps(post.body).decode()
        return code, f"upstream error; request was {echoed} with Bearer sk-live-123456".encode()

    transport = FakeTransport()
    transport.respond = echo
    pool = make_pool(transport, CollectorRegistry(), endpoints=(A,), outage_wait_s=0,
                     api_key="sk-live-123456")  # fmt: skip
    with pytest.raises(BackendError) as caught:
        await pool.complete(prompt, n=1, max_tokens=8)
    message = str(caught.value)
    assert f"HTTP {code}" in message
    assert "sk-live" not in message
    assert "medical history" not in message
    assert len(message) < 600


async def test_a_secret_echoed_where_the_message_is_cut_leaves_no_part_of_it() -> None:
    secret = "hunter2-secret-key-0123456789"  # no pattern would know it: only its value does

    async def echo(post: Post) -> tuple[int, bytes]:
        # The secret straddles the 120 characters the short message keeps.
        return 400, orjson.dumps({"error": {"message": "x" * 105 + f" got {secret} here"}})

    async def failure(mask: Callable[[str], str] | None) -> str:
        transport = FakeTransport()
        transport.respond = echo
        pool = make_pool(transport, CollectorRegistry(), endpoints=(A,), outage_wait_s=0,
                         mask_secrets=mask)  # fmt: skip
        with pytest.raises(BackendError) as caught:
            await pool.complete("q", n=1, max_tokens=8)
        return str(caught.value)

    masked = await failure(Scrubber([secret]).text)
    unmasked = await failure(None)
    assert "hunter2" in unmasked  # the cut leaves a prefix a later exact match cannot find
    assert "hunter2" not in masked
    assert "***" in masked
