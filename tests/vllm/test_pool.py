"""The vLLM pool: routing, retries, circuit breakers and metrics, against two stand-in pods.

The pods are real aiohttp servers on loopback whose answers each test scripts, so the pool's own
HTTP client, connection handling and time-outs are what is exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.ports import BackendError
from clearbudget.daemon.replay.embedded import free_loopback_port
from clearbudget.daemon.vllm.breaker import BreakerSettings
from clearbudget.daemon.vllm.pool import AiohttpTransport, BackendRequestError, VllmPool
from tests.support.waiting import until

A = "http://pod-a:8000"  # for argument checks only: nothing is sent there


@dataclass
class Sent:
    """One request as a pod received it."""

    pod: str
    path: str
    headers: CIMultiDictProxy[str]
    body: dict[str, Any]
    request: web.Request


Responder = Callable[[Sent], Awaitable[web.StreamResponse]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pods:
    """Two pods (`a`, `b`) that record every completion request and answer through `respond`;
    `GET /health` answers `health_status` (vLLM's is 200 with an empty body) and is counted."""

    def __init__(self) -> None:
        self.respond: Responder = ok
        self.health_status = 200
        self.health_checks: list[str] = []  # the pod asked, per GET /health
        self.requests: list[Sent] = []
        self._runners: list[web.AppRunner] = []
        self.a = self.b = ""

    async def start(self) -> None:
        self.a, self.b = [await self._serve() for _ in range(2)]

    async def _serve(self) -> str:
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"

        async def handle(request: web.Request) -> web.StreamResponse:
            sent = Sent(url, request.path, request.headers, await request.json(), request)
            self.requests.append(sent)
            return await self.respond(sent)

        async def health(request: web.Request) -> web.StreamResponse:
            self.health_checks.append(url)
            return web.Response(status=self.health_status)

        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._runners.append(runner)
        return url

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    @property
    def hosts(self) -> list[str]:
        return [sent.pod for sent in self.requests]

    def body(self, i: int = -1) -> dict[str, Any]:
        return self.requests[i].body


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    running = Pods()
    await running.start()
    yield running
    await running.stop()


def completion_json(body: dict[str, Any], *, token_ids: bool = True) -> dict[str, Any]:
    """A vLLM-shaped response: sample i generates i+1 tokens and stops; the last is cut."""
    n, prompt = body["n"], body["prompt"]
    prompt_ids = prompt if isinstance(prompt, list) else [7, 8, 9]
    choices = []
    for i in range(n):
        ids = [100 + i] * (i + 1)
        choice: dict[str, Any] = {
            "index": i,
            "text": f"t{i}",
            "finish_reason": "length" if i == n - 1 else "stop",
        }
        if token_ids:
            choice |= {"token_ids": ids, "prompt_token_ids": prompt_ids}
        choices.append(choice)
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n * (n + 1) // 2}
    return {"choices": choices[::-1], "usage": usage}  # order by "index", not position


async def ok(sent: Sent) -> web.StreamResponse:
    return web.json_response(completion_json(sent.body))


def by_pod(pods: Pods, *, a: Responder, b: Responder) -> Responder:
    async def respond(sent: Sent) -> web.StreamResponse:
        return await (a if sent.pod == pods.a else b)(sent)

    return respond


def held_until(release: asyncio.Event) -> Responder:
    """Answers `ok`, but only once `release` is set."""

    async def respond(sent: Sent) -> web.StreamResponse:
        await release.wait()
        return await ok(sent)

    return respond


def status(code: int, message: str = "boom") -> Responder:
    async def respond(sent: Sent) -> web.StreamResponse:
        return web.json_response({"error": {"message": message, "code": code}}, status=code)

    return respond


async def hang(sent: Sent) -> web.StreamResponse:
    """Never answers (the server cancels it at teardown): the pool's time-out must fire."""
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


async def hang_up(sent: Sent) -> web.StreamResponse:
    """Drops the connection without an answer, as a pod that crashes mid-request."""
    assert sent.request.transport is not None
    sent.request.transport.close()
    return web.Response()


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_pool(
    pods: Pods,
    registry: CollectorRegistry,
    endpoints: tuple[str, ...] | None = None,
    **options: Any,
) -> VllmPool:
    options.setdefault("clock", FakeClock())
    options.setdefault("sleep", Sleeps())
    return VllmPool(endpoints or (pods.a, pods.b), model="m", registry=registry, **options)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_request_body_and_parsed_completion(pods: Pods, registry: CollectorRegistry) -> None:
    pool = make_pool(pods, registry, (pods.a,), api_key="k3y", temperature=0.3)
    completion = await pool.complete("hi", n=3, max_tokens=16, seed=5)
    assert pods.body() == {
        "model": "m",
        "prompt": "hi",
        "n": 3,
        "max_tokens": 16,
        "seed": 5,
        "temperature": 0.3,
        "return_token_ids": True,
    }
    assert pods.requests[0].path == "/v1/completions"
    assert pods.requests[0].headers["authorization"] == "Bearer k3y"
    assert pods.requests[0].headers["content-type"] == "application/json"
    assert [s.finish_reason for s in completion.samples] == ["stop", "stop", "length"]
    assert [s.completion_tokens for s in completion.samples] == [1, 2, 3]
    assert completion.samples[1].token_ids == (101, 101)
    assert completion.prompt_token_ids == (7, 8, 9)
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 6)
    await pool.aclose()


async def test_token_id_prompt_is_sent_as_a_list(pods: Pods, registry: CollectorRegistry) -> None:
    pool = make_pool(pods, registry, (pods.a,))
    completion = await pool.complete((5, 6, 7, 8), n=1, max_tokens=4)
    assert pods.body()["prompt"] == [5, 6, 7, 8]
    assert "seed" not in pods.body()
    assert completion.prompt_token_ids == (5, 6, 7, 8)
    await pool.aclose()


async def test_without_token_ids_per_sample_counts_are_unknown(
    pods: Pods, registry: CollectorRegistry
) -> None:
    async def plain(sent: Sent) -> web.StreamResponse:
        return web.json_response(completion_json(sent.body, token_ids=False))

    pods.respond = plain
    pool = make_pool(pods, registry, (pods.a,))
    completion = await pool.complete("hi", n=2, max_tokens=4)
    assert [s.completion_tokens for s in completion.samples] == [None, None]
    assert [s.token_ids for s in completion.samples] == [None, None]
    assert completion.prompt_token_ids is None
    assert completion.completion_tokens == 3
    await pool.aclose()


async def test_server_error_is_retried_on_another_endpoint(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pods.respond = by_pod(pods, a=status(500), b=ok)
    pool = make_pool(pods, registry)
    for _ in range(2):  # whichever endpoint goes first, the answer comes from B
        completion = await pool.complete("hi", n=1, max_tokens=4)
        assert completion.samples[0].finish_reason == "length"
    assert pods.hosts.count(pods.a) == 1  # one failure, then least-outstanding tie → B, B
    assert pods.hosts[-1] == pods.b
    assert metric(registry, "clear_backend_errors_total", endpoint=pods.a) == 1
    assert metric(registry, "clear_backend_errors_total", endpoint=pods.b) == 0
    assert (
        metric(registry, "clear_backend_requests_total", endpoint=pods.a, outcome="http_5xx") == 1
    )
    assert metric(registry, "clear_backend_requests_total", endpoint=pods.b, outcome="ok") == 2
    await pool.aclose()


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [(hang, "timeout"), (hang_up, "transport"), (status(429, "slow down"), "http_429")],
)
async def test_timeouts_dropped_connections_and_429_fail_over(
    pods: Pods, registry: CollectorRegistry, failure: Responder, outcome: str
) -> None:
    pods.respond = by_pod(pods, a=failure, b=ok)
    pool = make_pool(pods, registry, request_timeout_s=0.5)
    await pool.complete("hi", n=1, max_tokens=4)
    await pool.complete("hi", n=1, max_tokens=4)
    assert pods.hosts.count(pods.a) == 1
    assert metric(registry, "clear_backend_requests_total", endpoint=pods.a, outcome=outcome) == 1
    await pool.aclose()


async def test_refused_connection_fails_over(pods: Pods, registry: CollectorRegistry) -> None:
    down = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    pool = make_pool(pods, registry, (down, pods.a))
    for _ in range(2):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pods.hosts == [pods.a, pods.a]
    assert metric(registry, "clear_backend_requests_total", endpoint=down, outcome="transport") == 1
    await pool.aclose()


async def test_client_error_is_not_retried_and_carries_the_message(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pods.respond = status(400, "max_tokens=5000 cannot be greater than max_model_len")
    pool = make_pool(pods, registry)
    with pytest.raises(BackendRequestError, match="max_model_len") as info:
        await pool.complete("hi", n=1, max_tokens=5000)
    assert info.value.status_code == 400
    assert len(pods.requests) == 1
    endpoint = pods.hosts[0]
    assert metric(registry, "clear_backend_errors_total", endpoint=endpoint) == 1
    assert pool.breaker_states()[endpoint] == "closed"
    await pool.aclose()


async def test_error_body_that_is_not_json_is_quoted(
    pods: Pods, registry: CollectorRegistry
) -> None:
    async def proxy_page(sent: Sent) -> web.StreamResponse:
        return web.Response(status=413, text="request entity too large")

    pods.respond = proxy_page
    pool = make_pool(pods, registry, (pods.a,))
    with pytest.raises(BackendRequestError, match=r"HTTP 413.*request entity too large"):
        await pool.complete("hi", n=1, max_tokens=4)
    await pool.aclose()


async def test_redirect_is_not_followed_and_is_retried(
    pods: Pods, registry: CollectorRegistry
) -> None:
    async def moved(sent: Sent) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(pods.b + "/v1/completions")

    pods.respond = by_pod(pods, a=moved, b=ok)
    pool = make_pool(pods, registry)
    for _ in range(2):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pods.hosts.count(pods.a) == 1  # once, and not re-sent to the Location
    assert pods.hosts.count(pods.b) == 2
    outcome = "bad_response"
    assert metric(registry, "clear_backend_requests_total", endpoint=pods.a, outcome=outcome) == 1
    await pool.aclose()


async def test_body_that_cannot_be_encoded_is_the_callers_error(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pool = make_pool(pods, registry, (pods.a,))
    with pytest.raises(BackendRequestError, match="JSON"):
        await pool.complete("hi", n=1, max_tokens=4, seed=2**70)
    assert pods.requests == []
    biased = make_pool(pods, CollectorRegistry(), (pods.a,), extra_body={"logit_bias": {50: -100}})
    await biased.complete("hi", n=1, max_tokens=4)
    assert pods.body()["logit_bias"] == {"50": -100}
    await pool.aclose()
    await biased.aclose()


async def test_all_endpoints_down_raises_backend_error_after_all_attempts(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pods.respond = by_pod(pods, a=status(503, "draining"), b=hang_up)
    sleeps = Sleeps()
    # outage_wait_s=0: with no endpoint answering, the pool would now wait the outage out
    # (test_pool_outage.py); fail-fast keeps this test about the attempts and their reasons.
    pool = make_pool(
        pods, registry, max_attempts=3, sleep=sleeps, retry_backoff_s=0.5, outage_wait_s=0
    )
    with pytest.raises(BackendError, match="after 3 attempt") as info:
        await pool.complete("hi", n=1, max_tokens=4)
    assert not isinstance(info.value, BackendRequestError)
    assert "draining" in str(info.value)
    assert "ServerDisconnectedError" in str(info.value)
    assert sorted(pods.hosts[:2]) == sorted([pods.a, pods.b])  # both before any is reused
    assert sleeps.calls == [0.5]  # backoff only before reusing an endpoint
    total = sum(
        metric(registry, "clear_backend_errors_total", endpoint=e) for e in (pods.a, pods.b)
    )
    assert total == 3
    await pool.aclose()


async def test_malformed_response_is_retried(pods: Pods, registry: CollectorRegistry) -> None:
    async def aborted(sent: Sent) -> web.StreamResponse:
        body = completion_json(sent.body)
        body["choices"][0]["finish_reason"] = "abort"
        return web.json_response(body)

    async def truncated(sent: Sent) -> web.StreamResponse:
        return web.Response(text='{"choices": [', content_type="application/json")

    for bad in (aborted, truncated):
        registry = CollectorRegistry()
        pods.respond = by_pod(pods, a=bad, b=ok)
        pool = make_pool(pods, registry)
        await pool.complete("hi", n=1, max_tokens=4)
        await pool.complete("hi", n=1, max_tokens=4)
        outcome = "bad_response"
        assert metric(registry, "clear_backend_requests_total", endpoint=pods.a, outcome=outcome)
        await pool.aclose()


async def test_breaker_opens_half_opens_and_closes_on_the_clock(
    pods: Pods, registry: CollectorRegistry
) -> None:
    healthy = False

    async def flaky(sent: Sent) -> web.StreamResponse:
        return await (ok(sent) if healthy else status(502)(sent))

    clock = FakeClock()
    pods.respond = flaky
    breaker = BreakerSettings(failure_threshold=2, cooldown_s=10.0)
    # outage_wait_s=0: this test walks the breaker through its states on the clock, so each
    # call must end rather than wait out the outage (test_pool_outage.py covers the waiting).
    pool = make_pool(
        pods, registry, (pods.a,), breaker=breaker, clock=clock, max_attempts=1, outage_wait_s=0
    )
    a = pods.a
    state = lambda: metric(registry, "clear_backend_breaker_state", endpoint=a)  # noqa: E731

    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states() == {a: "closed"}
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), state(), pool.ready()) == ({a: "open"}, 2.0, False)

    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert len(pods.requests) == 2  # an open breaker sends nothing

    clock.now += 9.9
    assert not pool.ready()
    clock.now += 0.1
    assert pool.ready()
    with pytest.raises(BackendError):  # the half-open trial fails: open again, cooldown anew
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), pool.ready()) == ({a: "open"}, False)

    clock.now += 10.0
    healthy = True
    await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), state(), pool.ready()) == ({a: "closed"}, 0.0, True)
    assert len(pods.requests) == 4
    await pool.aclose()


async def test_half_open_breaker_lets_one_trial_through(
    pods: Pods, registry: CollectorRegistry
) -> None:
    release = asyncio.Event()
    clock = FakeClock()
    pods.respond = status(500)
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=5.0)
    # outage_wait_s=0: the failing call, and "y" behind the trial, must end at once (fail
    # fast); test_pool_outage.py has "y" wait for the trial's verdict instead.
    pool = make_pool(
        pods, registry, (pods.a,), breaker=breaker, clock=clock, max_attempts=1, outage_wait_s=0
    )
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states()[pods.a] == "open"

    clock.now += 5.0
    pods.respond = held_until(release)
    trial = asyncio.create_task(pool.complete("x", n=1, max_tokens=1))
    await until(lambda: len(pods.requests) == 2)
    assert pool.breaker_states()[pods.a] == "half_open"
    assert metric(registry, "clear_backend_breaker_state", endpoint=pods.a) == 1.0
    assert not pool.ready()
    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("y", n=1, max_tokens=1)
    assert len(pods.requests) == 2  # the failure and the trial, no second trial
    release.set()
    await trial
    assert pool.breaker_states()[pods.a] == "closed"
    await pool.aclose()


async def test_a_trial_without_verdict_frees_the_half_open_slot(
    pods: Pods, registry: CollectorRegistry
) -> None:
    clock = FakeClock()
    pods.respond = status(500)
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=5.0)
    # outage_wait_s=0: the failing call must end with the breaker open, not wait for it.
    pool = make_pool(
        pods, registry, (pods.a,), breaker=breaker, clock=clock, max_attempts=1, outage_wait_s=0
    )
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    clock.now += 5.0
    pods.respond = status(400, "bad prompt")  # says nothing about the pod's health
    with pytest.raises(BackendRequestError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states()[pods.a], pool.ready()) == ("half_open", True)
    pods.respond = ok
    await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states()[pods.a] == "closed"
    await pool.aclose()


async def test_retry_goes_to_an_untried_endpoint_even_if_busier(
    pods: Pods, registry: CollectorRegistry
) -> None:
    release = asyncio.Event()

    pods.respond = by_pod(pods, a=status(500), b=held_until(release))
    pool = make_pool(pods, registry, max_attempts=2)
    big = asyncio.create_task(pool.complete("big", n=1, max_tokens=1000))
    await until(lambda: pods.b in pods.hosts)  # big ends up held on B (directly or after A)
    sent = len(pods.requests)
    small = asyncio.create_task(pool.complete("small", n=1, max_tokens=10))
    await until(lambda: len(pods.requests) == sent + 2)
    assert pods.hosts[sent:] == [pods.a, pods.b]  # least outstanding first, then untried pod
    release.set()
    await asyncio.gather(big, small)
    await pool.aclose()


async def test_least_outstanding_tokens_routing(pods: Pods, registry: CollectorRegistry) -> None:
    release = asyncio.Event()

    pods.respond = held_until(release)
    pool = make_pool(pods, registry)
    big = asyncio.create_task(pool.complete("big", n=2, max_tokens=500))
    await until(lambda: len(pods.requests) == 1)
    big_host = pods.hosts[0]
    small = [asyncio.create_task(pool.complete(f"s{i}", n=1, max_tokens=100)) for i in range(3)]
    await until(lambda: len(pods.requests) == 4)
    other = pods.b if big_host == pods.a else pods.a
    # 1000 outstanding tokens on one pod outweigh three 100-token requests on the other.
    assert pods.hosts[1:] == [other] * 3
    outstanding = "clear_backend_outstanding_tokens"
    assert metric(registry, outstanding, endpoint=big_host) == 1000
    assert metric(registry, outstanding, endpoint=other) == 300
    assert metric(registry, "clear_backend_in_flight_requests", endpoint=other) == 3
    release.set()
    await asyncio.gather(big, *small)
    assert metric(registry, outstanding, endpoint=big_host) == 0
    assert metric(registry, outstanding, endpoint=other) == 0
    await pool.aclose()


async def test_concurrency_per_endpoint_is_bounded(pods: Pods, registry: CollectorRegistry) -> None:
    release = asyncio.Event()

    pods.respond = held_until(release)
    pool = make_pool(pods, registry, (pods.a,), max_concurrency_per_endpoint=2)
    calls = [asyncio.create_task(pool.complete("hi", n=1, max_tokens=4)) for _ in range(6)]
    await until(lambda: len(pods.requests) == 2)
    await asyncio.sleep(0.05)
    assert len(pods.requests) == 2  # the other four wait for a slot
    release.set()
    await asyncio.gather(*calls)
    assert len(pods.requests) == 6
    await pool.aclose()


async def test_continuation_prefers_the_pod_that_holds_the_chain(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pool = make_pool(pods, registry)
    probe = await pool.complete("question", n=1, max_tokens=4)
    first = pods.hosts[0]
    (sample,) = probe.samples
    assert probe.prompt_token_ids is not None
    assert sample.token_ids is not None
    await pool.complete([*probe.prompt_token_ids, *sample.token_ids], n=1, max_tokens=8)
    await pool.complete("question" + sample.text, n=1, max_tokens=8)
    await pool.complete("unrelated", n=1, max_tokens=8)
    # Ties rotate, so without affinity the second request would go to the other pod.
    assert pods.hosts == [first, first, first, pods.b if first == pods.a else pods.a]
    await pool.aclose()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "", "n": 1, "max_tokens": 4}, "prompt"),
        ({"prompt": [], "n": 1, "max_tokens": 4}, "prompt"),
        ({"prompt": [1, -2], "n": 1, "max_tokens": 4}, "prompt"),
        ({"prompt": "hi", "n": 0, "max_tokens": 4}, "n"),
        ({"prompt": "hi", "n": 1, "max_tokens": True}, "max_tokens"),
        ({"prompt": "hi", "n": 1, "max_tokens": 4, "seed": 1.5}, "seed"),
    ],
)
async def test_invalid_arguments_are_rejected_before_sending(
    pods: Pods, registry: CollectorRegistry, kwargs: dict[str, Any], field: str
) -> None:
    pool = make_pool(pods, registry)
    with pytest.raises(BackendRequestError, match=field) as info:
        await pool.complete(**kwargs)
    assert info.value.field == field
    assert pods.requests == []
    await pool.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoints": ()}, "endpoints"),
        ({"endpoints": "http://a"}, "endpoints"),
        ({"endpoints": ("pod-a:8000",)}, "endpoints"),
        ({"endpoints": (A, A + "/")}, "duplicate"),
        ({"model": ""}, "model"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"max_concurrency_per_endpoint": 0}, "max_concurrency_per_endpoint"),
        ({"endpoints": ("http://u:p@pod-a:8000",), "api_key": "k"}, "one or the other"),
    ],
)
def test_invalid_pool_settings_name_the_parameter(
    registry: CollectorRegistry, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"endpoints": (A,), "model": "m"} | kwargs
    with pytest.raises(ValueError, match=message):
        VllmPool(registry=registry, **arguments)


def test_breaker_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        BreakerSettings(cooldown_s=-1)


async def test_latency_histogram_and_credentials_kept_out_of_labels(
    pods: Pods, registry: CollectorRegistry
) -> None:
    clock = FakeClock()

    async def takes_two_seconds(sent: Sent) -> web.StreamResponse:
        clock.now += 2.0
        return await ok(sent)

    pods.respond = takes_two_seconds
    with_credentials = pods.a.replace("http://", "http://user:pw@") + "/"
    pool = make_pool(pods, registry, (with_credentials,), clock=clock)
    await pool.complete("hi", n=1, max_tokens=4)
    assert pods.requests[0].headers["authorization"].startswith("Basic ")
    labels = {"endpoint": pods.a}
    assert registry.get_sample_value("clear_backend_request_seconds_count", labels) == 1
    assert registry.get_sample_value("clear_backend_request_seconds_sum", labels) == 2.0
    assert (
        registry.get_sample_value("clear_backend_request_seconds_bucket", labels | {"le": "1.0"})
        == 0
    )
    assert pool.endpoints == (with_credentials.rstrip("/"),)
    await pool.aclose()


async def test_closed_pool_refuses_and_closes_its_session(
    pods: Pods, registry: CollectorRegistry
) -> None:
    pool = make_pool(pods, registry, (pods.a,))
    await pool.complete("hi", n=1, max_tokens=4)
    assert pool.ready()
    await pool.aclose()
    assert not pool.ready()
    transport = pool._transport
    assert isinstance(transport, AiohttpTransport)
    assert transport._session is not None
    assert transport._session.closed
    with pytest.raises(BackendError, match="closed"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert len(pods.requests) == 1
