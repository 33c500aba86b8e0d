"""A pool of vLLM pods behind the `CompletionBackend` port (OpenAI-compatible completions API).

Routing sends each request to the usable endpoint with the fewest outstanding tokens (the sum of
`n * max_tokens` of requests sent or queued there), so long generations spread by cost, not by
request count. A continuation whose prompt is exactly an earlier sample's full sequence
(`prompt_token_ids + token_ids`, or prompt text + sample text) prefers the pod that generated it,
where vLLM's prefix cache still holds the chain. Each endpoint has a concurrency bound (a
semaphore) and a circuit breaker (`daemon.vllm.breaker`).

Connect errors, timeouts, 429, 5xx and malformed responses are retried on another endpoint (the
same one only when every usable endpoint has been tried); other 4xx responses fail at once with
the server's message. A request whose attempts all fail while other requests succeed raises
`BackendError`: the request is the problem, not the pods.

An outage is not the request's fault, so it waits instead. When no breaker lets a request through
(before or after its attempts), `complete()` waits, up to `outage_wait_s` in all, for one that
does, then starts a fresh round of attempts; when every endpoint fails but some breaker is still
closed (an outage starting), it starts another round after `retry_backoff_s`, which drives the
breakers open. While
requests wait, one watcher task per pool probes the open endpoints' `GET /health` with capped
exponential backoff; a 200 half-opens that breaker at once (the next request is its trial)
instead of after the cooldown. Waiters wake when a breaker half-opens or closes, when a trial
slot frees, and on every watcher tick, which is also when they check their deadline on the
injected clock.

HTTP goes through an injected `Transport` (a POST and a GET in, status and body out), so the
pool's policy can be driven without sockets; `AiohttpTransport` is the default. Bodies are
encoded and decoded by `daemon.vllm.protocol`.

May import `daemon.core.ports`, `daemon.vllm.breaker`, `daemon.vllm.protocol`,
prometheus_client, structlog, and aiohttp and yarl (in `AiohttpTransport` only).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
import yarl
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon.core.ports import BackendError, Completion
from daemon.vllm.breaker import (
    BreakerListener,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Verdict,
)
from daemon.vllm.protocol import (
    CompletionRequest,
    WireFormatError,
    decode_completion,
    error_message,
    reported_generation,
)

__all__ = [
    "AiohttpTransport",
    "BackendRequestError",
    "BreakerSettings",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "VllmPool",
]

_BREAKER_GAUGE_VALUE: dict[BreakerState, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Idle connections are dropped before vLLM's server closes them (uvicorn keep-alive: 5 s), so a
# reused connection is never one the server has just closed.
_KEEPALIVE_S = 4.0
_CACHE_ENTRIES = 256  # parsed URLs and time-outs kept by the transport (one per endpoint in use)
# Health probes while every endpoint is out: first after 0.5 s, doubling to one every 5 s, so a
# pod that is back is found within seconds and a long outage costs one GET per pod per 5 s.
_PROBE_FIRST_S = 0.5
_PROBE_MAX_S = 5.0
_PROBE_MIN_S = 0.01  # the shortest tick (a cooldown about to end): never a busy loop
_HEALTH_TIMEOUT_S = 5.0  # vLLM answers /health at once; a slower answer is no answer


# --- the transport seam -------------------------------------------------------------------------


class TransportError(Exception):
    """The exchange failed before a whole answer arrived: refused, reset or lost connection."""


class TransportTimeout(TransportError):
    """The exchange (connecting included) did not finish within its time-out."""


class Transport(Protocol):
    """How the pool sends one request; the pool owns it and closes it in `aclose()`."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        """POST `body` to `url` and return the status and the whole response body, whatever
        the status. Raise `TransportTimeout` past `timeout_s`, `TransportError` on connection
        failures; never follow redirects (a redirect is not an answer)."""
        ...

    async def get(
        self, url: str, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        """GET `url` (the health check), with the same contract as `post`."""
        ...

    async def aclose(self) -> None:
        """Release connections; no request follows."""
        ...


class AiohttpTransport:
    """The default transport: one aiohttp session, HTTP/1.1 keep-alive, `max_connections` in all.

    aiohttp rather than httpx: on the daemon's hot path httpx cost 1-2 ms of CPU per request
    through its own connection pool (it polls every idle pooled socket on each request) and
    about 0.2 ms over aiohttp's pool, against about 0.1 ms for aiohttp alone
    (benchmarks/RESULTS.md, "Daemon"). The session opens on the first request, inside the
    running loop; `connect_timeout_s` bounds DNS, TCP and TLS within each request's time-out.
    """

    def __init__(self, *, max_connections: int = 100, connect_timeout_s: float = 5.0) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {max_connections!r}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {connect_timeout_s!r}")
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, yarl.URL] = {}  # parsed once, not by aiohttp on every request
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        return await self._exchange("POST", url, body, headers, timeout_s)

    async def get(
        self, url: str, headers: Mapping[str, str], timeout_s: float
    ) -> tuple[int, bytes]:
        return await self._exchange("GET", url, None, headers, timeout_s)

    async def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> tuple[int, bytes]:
        try:
            async with self._http().request(
                method,
                self._url(url),
                data=body,
                headers=headers,
                timeout=self._timeout(timeout_s),
                allow_redirects=False,
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:  # aiohttp's own time-outs are TimeoutErrors too
            raise TransportTimeout(f"timed out ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TransportError("the transport is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S
            )
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    def _url(self, url: str) -> yarl.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _CACHE_ENTRIES:
                self._urls.clear()
            parsed = self._urls[url] = yarl.URL(url)
        return parsed

    def _timeout(self, timeout_s: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            if len(self._timeouts) >= _CACHE_ENTRIES:
                self._timeouts.clear()
            connect_s = min(self._connect_timeout_s, timeout_s)
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(
                total=timeout_s, connect=connect_s, sock_connect=connect_s
            )
        return timeout


# --- errors -------------------------------------------------------------------------------------


class BackendRequestError(BackendError):
    """The request itself is bad (a 4xx other than 429, or an invalid argument): not retried.

    `status_code` is the server's HTTP status (None when rejected before sending); `field` names
    the offending argument when known.
    """

    def __init__(self, message: str, *, status_code: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.field = field


UNKNOWN_TOKENS = -1  # a garbled answer's generation count could not be read


class _RetryableError(Exception):
    """One attempt failed in a way another endpoint may not: count it and try elsewhere."""

    def __init__(self, outcome: str, message: str, *, generated_tokens: int = 0) -> None:
        super().__init__(message)
        self.outcome = outcome
        # A 200 whose body is unusable: the pod generated these tokens all the same.
        self.generated_tokens = generated_tokens


@dataclass
class _Round:
    """One round of up to `max_attempts` attempts: where they went, why each failed, and the
    pool's success count at the first failure (did other traffic get through meanwhile?)."""

    tried: list[_Endpoint] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    successes_at_first_failure: int | None = None
    discarded_tokens: int = 0  # generated by attempts whose answers were unusable


# --- endpoints and metrics ----------------------------------------------------------------------


@dataclass(eq=False)
class _Endpoint:
    index: int
    base_url: str
    completions_url: str
    health_url: str
    label: str
    semaphore: asyncio.Semaphore
    breaker: CircuitBreaker
    outstanding_tokens: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class _PoolMetrics:
    errors: Counter
    requests: Counter
    latency: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry, endpoints: Sequence[_Endpoint]) -> _PoolMetrics:
        _endpoint_gauges(registry, endpoints)
        return cls(
            errors=Counter(
                "clear_backend_errors",
                "Failed backend requests (every attempt, retried or not) per endpoint.",
                ["endpoint"],
                registry=registry,
            ),
            requests=Counter(
                "clear_backend_requests",
                "Backend request attempts per endpoint by outcome "
                "(ok, timeout, transport, http_429, http_5xx, http_4xx, bad_response).",
                ["endpoint", "outcome"],
                registry=registry,
            ),
            latency=Histogram(
                "clear_backend_request_seconds",
                "Time per backend request attempt, queueing for the endpoint excluded.",
                ["endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
        )


def _outage_gauges(
    registry: CollectorRegistry, waiting: Callable[[], float], outage: Callable[[], float]
) -> None:
    """Pool-wide gauges, read at scrape time like the per-endpoint ones."""
    Gauge(
        "clear_backend_waiting_requests",
        "Requests waiting for an endpoint because no circuit breaker lets one through.",
        registry=registry,
    ).set_function(waiting)
    Gauge(
        "clear_backend_outage",
        "1 while no endpoint can take a request (every breaker open or its trial in flight).",
        registry=registry,
    ).set_function(outage)


def _endpoint_gauges(registry: CollectorRegistry, endpoints: Sequence[_Endpoint]) -> None:
    """Gauges read from the endpoints at scrape time: nothing to update on the hot path."""
    outstanding = Gauge(
        "clear_backend_outstanding_tokens",
        "Tokens (n * max_tokens) of requests sent or queued per endpoint.",
        ["endpoint"],
        registry=registry,
    )
    in_flight = Gauge(
        "clear_backend_in_flight_requests",
        "Requests sent or queued per endpoint.",
        ["endpoint"],
        registry=registry,
    )
    breaker = Gauge(
        "clear_backend_breaker_state",
        "Circuit breaker per endpoint: 0 closed, 1 half-open, 2 open.",
        ["endpoint"],
        registry=registry,
    )
    for ep in endpoints:
        outstanding.labels(ep.label).set_function(lambda ep=ep: ep.outstanding_tokens)
        in_flight.labels(ep.label).set_function(lambda ep=ep: ep.in_flight)
        breaker.labels(ep.label).set_function(lambda ep=ep: _BREAKER_GAUGE_VALUE[ep.breaker.state])


# --- the pool -----------------------------------------------------------------------------------


class VllmPool:
    """`CompletionBackend` over one or more vLLM OpenAI-compatible servers.

    HTTP goes through `transport` (default: an `AiohttpTransport` with a connection per
    concurrency slot and `connect_timeout_s`), which the pool closes in `aclose()`.
    Metrics register on `registry`, so one registry holds at most one pool. `outage_wait_s`
    bounds how long a request waits for an endpoint while none can take it (0: fail at once).
    Breaker changes are logged at warning on `logger`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        model: str,
        registry: CollectorRegistry,
        api_key: str | None = None,
        max_concurrency_per_endpoint: int = 32,
        request_timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_attempts: int = 3,
        breaker: BreakerSettings | None = None,
        temperature: float = 0.6,
        extra_body: Mapping[str, Any] | None = None,
        retry_backoff_s: float = 0.25,
        affinity_entries: int = 65536,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: Transport | None = None,
        outage_wait_s: float = 600.0,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        _check_pool_arguments(
            endpoints,
            model,
            api_key,
            max_concurrency_per_endpoint,
            request_timeout_s,
            connect_timeout_s,
            max_attempts,
            retry_backoff_s,
            affinity_entries,
            outage_wait_s,
        )
        self._log = logger or structlog.get_logger("clearbudget.vllm")
        breaker_settings = breaker or BreakerSettings()

        def new_breaker(label: str) -> CircuitBreaker:
            return CircuitBreaker(breaker_settings, clock, self._breaker_listener(label))

        self._endpoints = [
            _endpoint(i, url, max_concurrency_per_endpoint, new_breaker)
            for i, url in enumerate(endpoints)
        ]
        if transport is None:
            transport = AiohttpTransport(
                max_connections=len(self._endpoints) * max_concurrency_per_endpoint,
                connect_timeout_s=connect_timeout_s,
            )
        self._transport = transport
        self._model = model
        self._headers = {"Content-Type": "application/json"}
        self._health_headers: dict[str, str] = {}
        if api_key:  # vLLM leaves /health open, but a proxy in front may not
            self._headers["Authorization"] = self._health_headers["Authorization"] = (
                f"Bearer {api_key}"
            )
        self._max_concurrency = max_concurrency_per_endpoint
        self._request_timeout_s = request_timeout_s
        self._max_attempts = max_attempts
        self._temperature = temperature
        self._extra_body = dict(extra_body or {})
        self._retry_backoff_s = retry_backoff_s
        self._affinity: OrderedDict[bytes, _Endpoint] = OrderedDict()
        self._affinity_entries = affinity_entries
        self._clock = clock
        self._sleep = sleep
        self._turn = 0
        self._closed = False
        self._outage_wait_s = outage_wait_s
        self._successes = 0  # attempts that succeeded, pool-wide: "does other traffic succeed?"
        self._waiting = 0  # requests inside `_wait_for_endpoint`
        self._wake = asyncio.Event()  # set (and replaced) to wake every waiter at once
        self._watcher: asyncio.Task[None] | None = None
        self._outage_since: float | None = None  # for the log: when the last breaker opened
        self._metrics = _PoolMetrics.create(registry, self._endpoints)
        _outage_gauges(registry, lambda: self._waiting, lambda: 0.0 if self._usable() else 1.0)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(ep.base_url for ep in self._endpoints)

    def breaker_states(self) -> dict[str, BreakerState]:
        """Breaker state per endpoint label (for health pages and logs)."""
        return {ep.label: ep.breaker.state for ep in self._endpoints}

    def ready(self) -> bool:
        """Whether a request could be sent now: the pool is open and some breaker lets it pass."""
        return not self._closed and self._usable()

    async def aclose(self) -> None:
        """Refuse new requests, fail the waiting ones, stop the watcher, close the transport."""
        self._closed = True
        self._wake_all()
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            # wait(), not `await task`: that would raise the watcher's CancelledError, which
            # must not be confused with (or swallow) a cancellation of aclose() itself.
            await asyncio.wait({self._watcher})
        await self._transport.aclose()

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
    ) -> Completion:
        """Generate `n` chains of at most `max_tokens` tokens continuing `prompt` (text or ids),
        waiting out an outage (up to `outage_wait_s`) rather than failing in it."""
        if self._closed:
            raise BackendError("the vLLM pool is closed")
        request, payload = self._encode(prompt, n=n, max_tokens=max_tokens, seed=seed)
        deadline: float | None = None  # of this request's outage waits, all together
        discarded = 0
        while True:
            attempts = _Round()
            completion = await self._attempts(request, payload, attempts)
            discarded += attempts.discarded_tokens
            if completion is not None:
                return replace(completion, discarded_tokens=discarded)
            reasons = "; ".join(attempts.failures)
            if self._outage_wait_s == 0 or self._failed_alone(attempts):
                raise BackendError(
                    f"completion failed after {len(attempts.tried)} attempt(s): {reasons}",
                    discarded_tokens=discarded,
                )
            if deadline is None:
                deadline = self._clock() + self._outage_wait_s
            if not await self._between_rounds(deadline):
                raise BackendError(
                    f"no vLLM endpoint came back within {self._outage_wait_s:g} s (each one "
                    f"failing or its circuit breaker open); last round: {reasons}",
                    discarded_tokens=discarded,
                )

    async def _attempts(
        self, request: CompletionRequest, payload: bytes, attempts: _Round
    ) -> Completion | None:
        """One round of up to `max_attempts` attempts; None (reasons in `attempts`) if all fail."""
        preferred = self._affinity_for(request.prompt)
        cost = request.n * request.max_tokens
        for _ in range(self._max_attempts):
            endpoint = self._pick(attempts.tried, preferred)
            if endpoint is None:
                attempts.failures.append("no usable endpoint (every circuit breaker is open)")
                break
            if endpoint in attempts.tried and self._retry_backoff_s > 0:
                await self._sleep(self._retry_backoff_s)
            attempts.tried.append(endpoint)
            try:
                completion = await self._attempt(endpoint, payload, n=request.n, cost=cost)
            except _RetryableError as exc:
                attempts.failures.append(f"{endpoint.label}: {exc}")
                generated = cost if exc.generated_tokens == UNKNOWN_TOKENS else exc.generated_tokens
                attempts.discarded_tokens += min(generated, cost)
                if attempts.successes_at_first_failure is None:
                    attempts.successes_at_first_failure = self._successes
                continue
            self._remember(request.prompt, completion, endpoint)
            return completion
        return None

    # --- outages: waiting, probing, waking ----------------------------------------------------

    def _usable(self) -> bool:
        return any(ep.breaker.available() for ep in self._endpoints)

    def _failed_alone(self, attempts: _Round) -> bool:
        """Other requests succeeded while this one failed, and some endpoint still takes work:
        the request is the problem, not the pods (when none takes work, it is an outage)."""
        mark = attempts.successes_at_first_failure
        return mark is not None and self._successes > mark and self._usable()

    async def _between_rounds(self, deadline: float) -> bool:
        """Pause after a round that failed in an outage; False once `deadline` has passed."""
        if not self._usable():
            return await self._wait_for_endpoint(deadline)
        # Every endpoint failing but some breaker still closed: an outage starting. Another
        # round either opens the breakers (the next pause waits) or meets traffic that shows
        # the request is the problem.
        if self._retry_backoff_s > 0:
            await self._sleep(self._retry_backoff_s)
        return self._clock() < deadline

    async def _wait_for_endpoint(self, deadline: float) -> bool:
        """Wait until some breaker lets a request through: True then, False once `deadline`
        (injected clock) has passed; the pool closing fails the request."""
        self._waiting += 1
        try:
            while True:
                if self._closed:
                    raise BackendError("the vLLM pool is closed")
                if self._usable():
                    return True
                if self._clock() >= deadline:
                    return False
                self._ensure_watcher()  # each turn: restarts one that ended or died
                await self._wake.wait()
        finally:
            self._waiting -= 1

    def _wake_all(self) -> None:
        """Wake every current waiter; later ones wait on a fresh event."""
        self._wake.set()
        self._wake = asyncio.Event()

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="vllm-pool-outage-watcher"
            )
            self._watcher.add_done_callback(self._watcher_ended)

    def _watcher_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._log.error("vllm_outage_watcher_failed", error=repr(task.exception()))
        self._wake_all()  # the waiters' next turn starts a new one

    async def _watch(self) -> None:
        """While requests wait: tick with capped backoff, probe the open endpoints, wake the
        waiters (to take a freed endpoint or see their deadline pass)."""
        backoff = _PROBE_FIRST_S
        while True:
            await self._sleep(self._tick_s(backoff))
            await asyncio.sleep(0)  # an injected `sleep` that returns at once must not hog the loop
            if self._closed or not self._waiting:
                return
            if not self._usable():
                await self._probe_open_endpoints()
            self._wake_all()
            backoff = min(backoff * 2, _PROBE_MAX_S)

    def _tick_s(self, backoff: float) -> float:
        """`backoff`, cut short where an open breaker's cooldown ends sooner."""
        left = [ep.breaker.cooldown_left() for ep in self._endpoints if ep.breaker.state == "open"]
        return max(_PROBE_MIN_S, min([backoff, *(s for s in left if s > 0)]))

    async def _probe_open_endpoints(self) -> None:
        # Half-open ones are skipped: their trial is in flight and will say more than /health.
        targets = [ep for ep in self._endpoints if ep.breaker.state == "open"]
        await asyncio.gather(*(self._probe(ep) for ep in targets))

    async def _probe(self, ep: _Endpoint) -> None:
        """`GET /health`; a 200 half-opens the breaker, so the next request is its trial."""
        try:
            status, _ = await self._transport.get(
                ep.health_url, self._health_headers, _HEALTH_TIMEOUT_S
            )
        except TransportError:
            return  # still down: the next tick tries again
        except Exception as exc:  # a broken transport must not kill the watcher waiters rely on
            self._log.warning("vllm_health_probe_error", endpoint=ep.label, error=repr(exc))
            return
        if status == 200 and ep.breaker.allow_trial():
            self._wake_all()

    def _breaker_listener(self, label: str) -> BreakerListener:
        def on_change(old: BreakerState, new: BreakerState) -> None:
            if new == "open":
                self._log.warning("vllm_breaker_opened", endpoint=label, previous=old)
                if self._outage_since is None and not self._usable():
                    self._outage_since = self._clock()
                    self._log.warning("vllm_outage_started", endpoints=len(self._endpoints))
            elif new == "half_open":
                self._log.warning("vllm_breaker_half_open", endpoint=label)
            else:
                self._log.warning("vllm_breaker_closed", endpoint=label, previous=old)
                if self._outage_since is not None:
                    lasted = self._clock() - self._outage_since
                    self._outage_since = None
                    self._log.warning("vllm_outage_over", duration_s=lasted, waiting=self._waiting)

        return on_change

    # --- request building -------------------------------------------------------------------

    def _encode(
        self, prompt: str | Sequence[int], *, n: int, max_tokens: int, seed: int | None
    ) -> tuple[CompletionRequest, bytes]:
        """The request and its body, once before any attempt: a bad one is the caller's error."""
        try:
            request = CompletionRequest(
                model=self._model,
                prompt=prompt,
                n=n,
                max_tokens=max_tokens,
                temperature=self._temperature,
                seed=seed,
                return_token_ids=True,
                extra=self._extra_body,
            )
            return request, request.encode()
        except WireFormatError as exc:
            raise BackendRequestError(str(exc), field=exc.field) from exc

    # --- routing ------------------------------------------------------------------------------

    def _pick(self, tried: list[_Endpoint], preferred: _Endpoint | None) -> _Endpoint | None:
        usable = [ep for ep in self._endpoints if ep.breaker.available()]
        fresh = [ep for ep in usable if ep not in tried] or usable
        if len(fresh) <= 1:
            return fresh[0] if fresh else None
        if preferred in fresh and preferred.in_flight < self._max_concurrency:
            return preferred
        self._turn += 1  # rotate ties so an idle pool still spreads its requests
        size, turn = len(self._endpoints), self._turn
        return min(
            fresh, key=lambda ep: (ep.outstanding_tokens, ep.in_flight, (ep.index - turn) % size)
        )

    def _affinity_for(self, prompt: str | Sequence[int]) -> _Endpoint | None:
        key = _sequence_key(prompt)
        endpoint = self._affinity.get(key)
        if endpoint is not None:
            self._affinity.move_to_end(key)
        return endpoint

    def _remember(self, prompt: str | Sequence[int], completion: Completion, ep: _Endpoint) -> None:
        """Map each sample's full sequence to `ep`, whose prefix cache now holds it."""
        if self._affinity_entries == 0:
            return
        for sample in completion.samples:
            if isinstance(prompt, str):
                self._affinity[_sequence_key(prompt + sample.text)] = ep
            ids = completion.prompt_token_ids
            if ids is None and not isinstance(prompt, str):
                ids = tuple(prompt)
            if ids is not None and sample.token_ids is not None:
                self._affinity[_sequence_key([*ids, *sample.token_ids])] = ep
        while len(self._affinity) > self._affinity_entries:
            self._affinity.popitem(last=False)

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, ep: _Endpoint, payload: bytes, *, n: int, cost: int) -> Completion:
        trial = ep.breaker.begin()
        ep.outstanding_tokens += cost
        ep.in_flight += 1
        verdict: Verdict = "neutral"
        try:
            async with ep.semaphore:
                completion = await self._send(ep, payload, n=n)
            verdict = "success"
            self._successes += 1
            return completion
        except _RetryableError:
            verdict = "failure"
            raise
        finally:
            ep.outstanding_tokens -= cost
            ep.in_flight -= 1
            ep.breaker.finish(verdict, trial=trial)
            if self._waiting and ep.breaker.available():  # closed, or its trial slot is free
                self._wake_all()

    async def _send(self, ep: _Endpoint, payload: bytes, *, n: int) -> Completion:
        started = self._clock()
        try:
            status, answer = await self._post(ep, payload)
            completion = self._interpret(ep, status, answer, n=n)
        except _RetryableError as exc:
            self._count(ep, exc.outcome)
            raise
        except BackendRequestError:
            self._count(ep, "http_4xx")
            raise
        finally:
            self._metrics.latency.labels(ep.label).observe(max(0.0, self._clock() - started))
        self._count(ep, "ok")
        return completion

    async def _post(self, ep: _Endpoint, payload: bytes) -> tuple[int, bytes]:
        """Status and body of one POST; time-outs and lost connections are retryable."""
        if self._closed:  # a request that was queued when the pool closed
            raise BackendError("the vLLM pool is closed")
        try:
            return await self._transport.post(
                ep.completions_url, payload, self._headers, self._request_timeout_s
            )
        except TransportTimeout as exc:
            raise _RetryableError("timeout", str(exc)) from exc
        except TransportError as exc:
            raise _RetryableError("transport", str(exc)) from exc

    def _interpret(self, ep: _Endpoint, status: int, payload: bytes, *, n: int) -> Completion:
        if status == 429 or status >= 500:
            outcome = "http_429" if status == 429 else "http_5xx"
            raise _RetryableError(outcome, f"HTTP {status}: {self._short_error(ep, payload)}")
        if status >= 400:
            raise BackendRequestError(
                f"{ep.label} rejected the request (HTTP {status}): "
                f"{self._short_error(ep, payload)}",
                status_code=status,
            )
        if status != 200:  # redirects included: not followed, so not an answer
            raise _RetryableError("bad_response", f"unexpected HTTP {status}")
        try:
            return decode_completion(payload, n=n)
        except WireFormatError as exc:
            # The pod generated this answer: charge what it says it generated (or, if even
            # that is unreadable, everything the request allowed).
            generated = reported_generation(payload)
            raise _RetryableError(
                "bad_response", f"malformed completion: {exc}",
                generated_tokens=UNKNOWN_TOKENS if generated is None else generated,
            ) from exc  # fmt: skip

    def _short_error(self, ep: _Endpoint, payload: bytes) -> str:
        """What of an error body may travel with the error (into results others read): a short
        message with credentials and prompts cut out. The longer form goes to the DEBUG log."""
        self._log.debug("vllm_error_body", endpoint=ep.label, body=redact(error_message(payload)))
        return redact(error_message(payload, limit=SHORT_ERROR_CHARS))

    def _count(self, ep: _Endpoint, outcome: str) -> None:
        self._metrics.requests.labels(ep.label, outcome).inc()
        if outcome != "ok":
            self._metrics.errors.labels(ep.label).inc()


# An echoing gateway may answer with the request (prompt, auth header) in its error body.
SHORT_ERROR_CHARS = 120
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r'("prompt"\s*:\s*)("(?:[^"\\]|\\.)*"?|\[[^\]]*\]?)'), r'\1"<prompt>"'),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"sk-[A-Za-z0-9_-]{4,}"), "sk-***"),
    (
        re.compile(r"(?i)\b(api[_-]?key|authorization|password|secret|token)"
                   r"([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"),
        r"\1\2***",
    ),
)  # fmt: skip


def redact(text: str) -> str:
    """`text` without credentials and without the value of any "prompt" field."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


# --- helpers ----------------------------------------------------------------------------------


def _endpoint(
    index: int, url: str, concurrency: int, breaker: Callable[[str], CircuitBreaker]
) -> _Endpoint:
    base_url = url.rstrip("/")
    label = _redact(base_url)
    return _Endpoint(
        index=index,
        base_url=base_url,
        completions_url=base_url + "/v1/completions",
        health_url=base_url + "/health",
        label=label,
        semaphore=asyncio.Semaphore(concurrency),
        breaker=breaker(label),
    )


def _check_pool_arguments(
    endpoints: Sequence[str],
    model: str,
    api_key: str | None,
    max_concurrency_per_endpoint: int,
    request_timeout_s: float,
    connect_timeout_s: float,
    max_attempts: int,
    retry_backoff_s: float,
    affinity_entries: int,
    outage_wait_s: float,
) -> None:
    if isinstance(endpoints, str) or not endpoints:
        raise ValueError("endpoints: need at least one base URL (a sequence of strings)")
    for url in endpoints:
        _check_endpoint(url, api_key)
    if len({url.rstrip("/") for url in endpoints}) != len(endpoints):
        raise ValueError(f"endpoints: duplicate base URL in {list(endpoints)}")
    if not model:
        raise ValueError("model: must not be empty")
    minimums: dict[str, tuple[float, float, bool]] = {  # name: (value, bound, bound allowed)
        "max_concurrency_per_endpoint": (max_concurrency_per_endpoint, 1, True),
        "request_timeout_s": (request_timeout_s, 0, False),
        "connect_timeout_s": (connect_timeout_s, 0, False),
        "max_attempts": (max_attempts, 1, True),
        "retry_backoff_s": (retry_backoff_s, 0, True),
        "affinity_entries": (affinity_entries, 0, True),
        "outage_wait_s": (outage_wait_s, 0, True),
    }
    for name, (value, bound, inclusive) in minimums.items():
        if value < bound or (value == bound and not inclusive):
            relation = ">=" if inclusive else ">"
            raise ValueError(f"{name}: must be {relation} {bound}, got {value!r}")


def _check_endpoint(url: str, api_key: str | None) -> None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"endpoints: {url!r} is not an http(s) base URL")
    if api_key and "@" in parts.netloc:
        raise ValueError(
            f"endpoints: {_redact(url)!r} carries user:password and an api_key is set: "
            "use one or the other"
        )


def _redact(url: str) -> str:
    """The URL without user:password, fit for a metric label."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _sequence_key(sequence: str | Sequence[int]) -> bytes:
    if isinstance(sequence, str):
        data = b"t" + sequence.encode("utf-8", "surrogatepass")
    else:
        data = b"i" + array("q", sequence).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()
