"""The vLLM pool: routing, retries, circuit breakers and metrics over `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from daemon.backend import BackendError
from daemon.vllm_pool import BackendRequestError, BreakerSettings, VllmPool

A = "http://pod-a:8000"
B = "http://pod-b:8000"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Serves requests through `respond(request)` and records what was sent where."""

    def __init__(self, respond: Handler) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []

    @property
    def hosts(self) -> list[str]:
        return [f"http://{r.url.host}:{r.url.port}" for r in self.requests]

    def body(self, i: int = -1) -> dict[str, Any]:
        return json.loads(self.requests[i].content)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.respond(request)


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


async def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=completion_json(json.loads(request.content)))


def by_host(**responders: Handler) -> Handler:
    async def respond(request: httpx.Request) -> httpx.Response:
        return await responders[request.url.host.replace("-", "_")](request)

    return respond


def status(code: int, message: str = "boom") -> Handler:
    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json={"error": {"message": message, "code": code}})

    return respond


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    async def respond(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return respond


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_pool(
    recorder: Recorder,
    registry: CollectorRegistry,
    endpoints: tuple[str, ...] = (A, B),
    **options: Any,
) -> VllmPool:
    options.setdefault("clock", FakeClock())
    options.setdefault("sleep", Sleeps())
    client = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    return VllmPool(endpoints, model="m", client=client, registry=registry, **options)


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_request_body_and_parsed_completion(registry: CollectorRegistry) -> None:
    recorder = Recorder(ok)
    pool = make_pool(recorder, registry, (A,), api_key="k3y", temperature=0.3)
    completion = await pool.complete("hi", n=3, max_tokens=16, seed=5)
    assert recorder.body() == {
        "model": "m",
        "prompt": "hi",
        "n": 3,
        "max_tokens": 16,
        "seed": 5,
        "temperature": 0.3,
        "return_token_ids": True,
    }
    assert recorder.requests[0].url.path == "/v1/completions"
    assert recorder.requests[0].headers["authorization"] == "Bearer k3y"
    assert [s.finish_reason for s in completion.samples] == ["stop", "stop", "length"]
    assert [s.completion_tokens for s in completion.samples] == [1, 2, 3]
    assert completion.samples[1].token_ids == (101, 101)
    assert completion.prompt_token_ids == (7, 8, 9)
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 6)


async def test_token_id_prompt_is_sent_as_a_list(registry: CollectorRegistry) -> None:
    recorder = Recorder(ok)
    pool = make_pool(recorder, registry, (A,))
    completion = await pool.complete((5, 6, 7, 8), n=1, max_tokens=4)
    assert recorder.body()["prompt"] == [5, 6, 7, 8]
    assert "seed" not in recorder.body()
    assert completion.prompt_token_ids == (5, 6, 7, 8)


async def test_without_token_ids_per_sample_counts_are_unknown(
    registry: CollectorRegistry,
) -> None:
    async def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json=completion_json(json.loads(request.content), token_ids=False)
        )

    pool = make_pool(Recorder(plain), registry, (A,))
    completion = await pool.complete("hi", n=2, max_tokens=4)
    assert [s.completion_tokens for s in completion.samples] == [None, None]
    assert [s.token_ids for s in completion.samples] == [None, None]
    assert completion.prompt_token_ids is None
    assert completion.completion_tokens == 3


async def test_server_error_is_retried_on_another_endpoint(registry: CollectorRegistry) -> None:
    recorder = Recorder(by_host(pod_a=status(500), pod_b=ok))
    pool = make_pool(recorder, registry)
    for _ in range(2):  # whichever endpoint goes first, the answer comes from B
        completion = await pool.complete("hi", n=1, max_tokens=4)
        assert completion.samples[0].finish_reason == "length"
    assert recorder.hosts.count(A) == 1  # one failure, then least-outstanding tie → B, B
    assert recorder.hosts[-1] == B
    assert metric(registry, "clear_backend_errors_total", endpoint=A) == 1
    assert metric(registry, "clear_backend_errors_total", endpoint=B) == 0
    assert metric(registry, "clear_backend_requests_total", endpoint=A, outcome="http_5xx") == 1
    assert metric(registry, "clear_backend_requests_total", endpoint=B, outcome="ok") == 2


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (raising(httpx.ReadTimeout), "timeout"),
        (raising(httpx.ConnectError), "transport"),
        (status(429, "slow down"), "http_429"),
    ],
)
async def test_timeouts_connect_errors_and_429_fail_over(
    registry: CollectorRegistry, failure: Handler, outcome: str
) -> None:
    recorder = Recorder(by_host(pod_a=failure, pod_b=ok))
    pool = make_pool(recorder, registry)
    await pool.complete("hi", n=1, max_tokens=4)
    await pool.complete("hi", n=1, max_tokens=4)
    assert recorder.hosts.count(A) == 1
    assert metric(registry, "clear_backend_requests_total", endpoint=A, outcome=outcome) == 1


async def test_client_error_is_not_retried_and_carries_the_message(
    registry: CollectorRegistry,
) -> None:
    recorder = Recorder(status(400, "max_tokens=5000 cannot be greater than max_model_len"))
    pool = make_pool(recorder, registry)
    with pytest.raises(BackendRequestError, match="max_model_len") as info:
        await pool.complete("hi", n=1, max_tokens=5000)
    assert info.value.status_code == 400
    assert len(recorder.requests) == 1
    endpoint = recorder.hosts[0]
    assert metric(registry, "clear_backend_errors_total", endpoint=endpoint) == 1
    assert pool.breaker_states()[endpoint] == "closed"


async def test_all_endpoints_down_raises_backend_error_after_all_attempts(
    registry: CollectorRegistry,
) -> None:
    recorder = Recorder(by_host(pod_a=status(503, "draining"), pod_b=raising(httpx.ConnectError)))
    sleeps = Sleeps()
    pool = make_pool(recorder, registry, max_attempts=3, sleep=sleeps, retry_backoff_s=0.5)
    with pytest.raises(BackendError, match="after 3 attempt") as info:
        await pool.complete("hi", n=1, max_tokens=4)
    assert not isinstance(info.value, BackendRequestError)
    assert "draining" in str(info.value)
    assert "ConnectError" in str(info.value)
    assert sorted(recorder.hosts[:2]) == [A, B]  # both endpoints before any is reused
    assert sleeps.calls == [0.5]  # backoff only before reusing an endpoint
    total = sum(metric(registry, "clear_backend_errors_total", endpoint=e) for e in (A, B))
    assert total == 3


async def test_malformed_response_is_retried(registry: CollectorRegistry) -> None:
    async def aborted(request: httpx.Request) -> httpx.Response:
        body = completion_json(json.loads(request.content))
        body["choices"][0]["finish_reason"] = "abort"
        return httpx.Response(200, json=body)

    recorder = Recorder(by_host(pod_a=aborted, pod_b=ok))
    pool = make_pool(recorder, registry)
    await pool.complete("hi", n=1, max_tokens=4)
    await pool.complete("hi", n=1, max_tokens=4)
    assert metric(registry, "clear_backend_requests_total", endpoint=A, outcome="bad_response") == 1


async def test_breaker_opens_half_opens_and_closes_on_the_clock(
    registry: CollectorRegistry,
) -> None:
    healthy = False

    async def flaky(request: httpx.Request) -> httpx.Response:
        return await (ok(request) if healthy else status(502)(request))

    clock = FakeClock()
    recorder = Recorder(flaky)
    breaker = BreakerSettings(failure_threshold=2, cooldown_s=10.0)
    pool = make_pool(recorder, registry, (A,), breaker=breaker, clock=clock, max_attempts=1)
    state = lambda: metric(registry, "clear_backend_breaker_state", endpoint=A)  # noqa: E731

    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states() == {A: "closed"}
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), state(), pool.ready()) == ({A: "open"}, 2.0, False)

    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("hi", n=1, max_tokens=4)
    assert len(recorder.requests) == 2  # an open breaker sends nothing

    clock.now += 9.9
    assert not pool.ready()
    clock.now += 0.1
    assert pool.ready()
    with pytest.raises(BackendError):  # the half-open trial fails: open again, cooldown anew
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), pool.ready()) == ({A: "open"}, False)

    clock.now += 10.0
    healthy = True
    await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states(), state(), pool.ready()) == ({A: "closed"}, 0.0, True)
    assert len(recorder.requests) == 4


async def test_half_open_breaker_lets_one_trial_through(registry: CollectorRegistry) -> None:
    release = asyncio.Event()
    clock = FakeClock()
    recorder = Recorder(status(500))
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=5.0)
    pool = make_pool(recorder, registry, (A,), breaker=breaker, clock=clock, max_attempts=1)
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states()[A] == "open"

    async def slow_ok(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return await ok(request)

    clock.now += 5.0
    recorder.respond = slow_ok
    trial = asyncio.create_task(pool.complete("x", n=1, max_tokens=1))
    await asyncio.sleep(0.01)
    assert pool.breaker_states()[A] == "half_open"
    assert metric(registry, "clear_backend_breaker_state", endpoint=A) == 1.0
    assert not pool.ready()
    with pytest.raises(BackendError, match="no usable endpoint"):
        await pool.complete("y", n=1, max_tokens=1)
    assert len(recorder.requests) == 2  # the failure and the trial, no second trial
    release.set()
    await trial
    assert pool.breaker_states()[A] == "closed"


async def test_a_trial_without_verdict_frees_the_half_open_slot(
    registry: CollectorRegistry,
) -> None:
    clock = FakeClock()
    recorder = Recorder(status(500))
    breaker = BreakerSettings(failure_threshold=1, cooldown_s=5.0)
    pool = make_pool(recorder, registry, (A,), breaker=breaker, clock=clock, max_attempts=1)
    with pytest.raises(BackendError):
        await pool.complete("hi", n=1, max_tokens=4)
    clock.now += 5.0
    recorder.respond = status(400, "bad prompt")  # says nothing about the pod's health
    with pytest.raises(BackendRequestError):
        await pool.complete("hi", n=1, max_tokens=4)
    assert (pool.breaker_states()[A], pool.ready()) == ("half_open", True)
    recorder.respond = ok
    await pool.complete("hi", n=1, max_tokens=4)
    assert pool.breaker_states()[A] == "closed"


async def test_retry_goes_to_an_untried_endpoint_even_if_busier(
    registry: CollectorRegistry,
) -> None:
    release = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return await ok(request)

    recorder = Recorder(by_host(pod_a=status(500), pod_b=held))
    pool = make_pool(recorder, registry, max_attempts=2)
    big = asyncio.create_task(pool.complete("big", n=1, max_tokens=1000))
    await asyncio.sleep(0.01)
    sent = len(recorder.requests)
    small = asyncio.create_task(pool.complete("small", n=1, max_tokens=10))
    await asyncio.sleep(0.01)
    assert recorder.hosts[sent:] == [A, B]  # least outstanding first, then the untried pod
    release.set()
    await asyncio.gather(big, small)


async def test_least_outstanding_tokens_routing(registry: CollectorRegistry) -> None:
    release = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return await ok(request)

    recorder = Recorder(held)
    pool = make_pool(recorder, registry)
    big = asyncio.create_task(pool.complete("big", n=2, max_tokens=500))
    await asyncio.sleep(0.01)
    big_host = recorder.hosts[0]
    small = [asyncio.create_task(pool.complete(f"s{i}", n=1, max_tokens=100)) for i in range(3)]
    await asyncio.sleep(0.01)
    other = B if big_host == A else A
    # 1000 outstanding tokens on one pod outweigh three 100-token requests on the other.
    assert recorder.hosts[1:] == [other] * 3
    outstanding = "clear_backend_outstanding_tokens"
    assert metric(registry, outstanding, endpoint=big_host) == 1000
    assert metric(registry, outstanding, endpoint=other) == 300
    assert metric(registry, "clear_backend_in_flight_requests", endpoint=other) == 3
    release.set()
    await asyncio.gather(big, *small)
    assert metric(registry, outstanding, endpoint=big_host) == 0
    assert metric(registry, outstanding, endpoint=other) == 0


async def test_concurrency_per_endpoint_is_bounded(registry: CollectorRegistry) -> None:
    active = peak = 0

    async def counting(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.005)
        active -= 1
        return await ok(request)

    pool = make_pool(Recorder(counting), registry, (A,), max_concurrency_per_endpoint=2)
    await asyncio.gather(*(pool.complete("hi", n=1, max_tokens=4) for _ in range(6)))
    assert peak == 2


async def test_continuation_prefers_the_pod_that_holds_the_chain(
    registry: CollectorRegistry,
) -> None:
    recorder = Recorder(ok)
    pool = make_pool(recorder, registry)
    probe = await pool.complete("question", n=1, max_tokens=4)
    first = recorder.hosts[0]
    (sample,) = probe.samples
    assert probe.prompt_token_ids is not None
    assert sample.token_ids is not None
    await pool.complete([*probe.prompt_token_ids, *sample.token_ids], n=1, max_tokens=8)
    await pool.complete("question" + sample.text, n=1, max_tokens=8)
    await pool.complete("unrelated", n=1, max_tokens=8)
    # Ties rotate, so without affinity the second request would go to the other pod.
    assert recorder.hosts == [first, first, first, B if first == A else A]


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
    registry: CollectorRegistry, kwargs: dict[str, Any], field: str
) -> None:
    recorder = Recorder(ok)
    pool = make_pool(recorder, registry)
    with pytest.raises(BackendRequestError, match=field) as info:
        await pool.complete(**kwargs)
    assert info.value.field == field
    assert recorder.requests == []


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
    ],
)
def test_invalid_pool_settings_name_the_parameter(
    registry: CollectorRegistry, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"endpoints": (A,), "model": "m"} | kwargs
    client = httpx.AsyncClient(transport=httpx.MockTransport(Recorder(ok)))
    with pytest.raises(ValueError, match=message):
        VllmPool(client=client, registry=registry, **arguments)


def test_breaker_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        BreakerSettings(cooldown_s=-1)


async def test_latency_histogram_and_credentials_kept_out_of_labels(
    registry: CollectorRegistry,
) -> None:
    clock = FakeClock()

    async def takes_two_seconds(request: httpx.Request) -> httpx.Response:
        clock.now += 2.0
        return await ok(request)

    pool = make_pool(
        Recorder(takes_two_seconds), registry, ("http://user:pw@pod-a:8000/",), clock=clock
    )
    await pool.complete("hi", n=1, max_tokens=4)
    labels = {"endpoint": A}
    assert registry.get_sample_value("clear_backend_request_seconds_count", labels) == 1
    assert registry.get_sample_value("clear_backend_request_seconds_sum", labels) == 2.0
    assert (
        registry.get_sample_value("clear_backend_request_seconds_bucket", labels | {"le": "1.0"})
        == 0
    )
    assert pool.endpoints == ("http://user:pw@pod-a:8000",)


async def test_closed_pool_refuses_and_owned_client_is_closed(
    registry: CollectorRegistry,
) -> None:
    injected = httpx.AsyncClient(transport=httpx.MockTransport(Recorder(ok)))
    pool = VllmPool((A,), model="m", client=injected, registry=registry)
    await pool.aclose()
    assert not pool.ready()
    assert not injected.is_closed  # the caller owns an injected client
    with pytest.raises(BackendError, match="closed"):
        await pool.complete("hi", n=1, max_tokens=4)

    owned = VllmPool.create((A,), model="m", registry=CollectorRegistry())
    assert owned.ready()
    await owned.aclose()
    assert owned._client.is_closed
