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

A base URL may name a fleet rather than a pod: with `discovery="dns"` the pool resolves each
host name in `endpoints` (through an injected `Resolver`; IP literals are taken as they are)
when it starts and every `discovery_interval_s` after, and keeps one endpoint per address, each
with its own breaker, semaphore, outstanding-token count and metric label (`vllm:8000/10.0.0.5`).
Its requests go to the address and carry the name in their `Host` header (https: the certificate
is checked for the name). An address that joins gets traffic at once; one that vanishes drains:
no new request goes there, those already sent or queued there finish, then it is removed with
its metric series, so label cardinality follows the fleet, not its history. A failed resolution
keeps the last known addresses (one warning a minute per name); a name that resolves to nothing
(NXDOMAIN: a headless Service without ready pods) drains them all, an outage like any other.

HTTP goes through an injected `Transport` (a POST and a GET in, status and body out), so the
pool's policy can be driven without sockets; `AiohttpTransport` is the default. Bodies are
encoded and decoded by `daemon.vllm.protocol`.

May import `daemon.core.ports`, `daemon.vllm.breaker`, `daemon.vllm.protocol`,
prometheus_client, structlog, and aiohttp and yarl (in `AiohttpTransport` only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
import socket
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
import yarl
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clearbudget.daemon.core.ports import BackendError, Completion
from clearbudget.daemon.vllm.breaker import (
    BreakerListener,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Verdict,
)
from clearbudget.daemon.vllm.protocol import (
    MAX_ERROR_CHARS,
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
    "Discovery",
    "Resolver",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "VllmPool",
    "resolve_addresses",
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
# DNS discovery: a lookup slower than this has failed (the last known addresses stay), and a
# name that keeps failing is reported at most once per interval below.
_RESOLVE_TIMEOUT_S = 5.0
_DISCOVERY_WARN_EVERY_S = 60.0


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
        failures; never follow redirects (a redirect is not an answer). A `Host` entry in
        `headers` (a request to a pod's address on behalf of its Service name) is sent as
        given, and over https the server's certificate is checked for that name."""
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
    """The default transport: one aiohttp session, HTTP/1.1 keep-alive, `max_connections` in all
    (None: no limit of its own, the pool's per-endpoint semaphores bound the connections).

    aiohttp rather than httpx: on the daemon's hot path httpx cost 1-2 ms of CPU per request
    through its own connection pool (it polls every idle pooled socket on each request) and
    about 0.2 ms over aiohttp's pool, against about 0.1 ms for aiohttp alone
    (benchmarks/RESULTS.md, "Daemon"). The session opens on the first request, inside the
    running loop; `connect_timeout_s` bounds DNS, TCP and TLS within each request's time-out.
    """

    def __init__(
        self, *, max_connections: int | None = 100, connect_timeout_s: float = 5.0
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections: must be >= 1, got {max_connections!r}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s: must be > 0, got {connect_timeout_s!r}")
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._urls: dict[str, yarl.URL] = {}  # parsed once, not by aiohttp on every request
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._tls_names: dict[str, str | None] = {}  # Host header -> the name a cert must carry

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
        parsed = self._url(url)
        host = headers.get("Host")
        # A pod addressed by IP on behalf of a name: TLS (SNI, certificate) is for the name.
        tls_name = self._tls_name(host) if host is not None and parsed.scheme == "https" else None
        try:
            async with self._http().request(
                method,
                parsed,
                data=body,
                headers=headers,
                timeout=self._timeout(timeout_s),
                allow_redirects=False,
                server_hostname=tls_name,
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
                limit=self._max_connections or 0,  # 0: aiohttp's "no limit"
                limit_per_host=0,
                keepalive_timeout=_KEEPALIVE_S,
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

    def _tls_name(self, host: str) -> str | None:
        if host not in self._tls_names:
            if len(self._tls_names) >= _CACHE_ENTRIES:
                self._tls_names.clear()
            self._tls_names[host] = urlsplit("//" + host).hostname
        return self._tls_names[host]

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


# --- the resolver seam (DNS discovery) ----------------------------------------------------------

# "none": each base URL is one endpoint. "dns": each host name is resolved, one endpoint per
# address (a Kubernetes headless Service: one name, an address per ready pod).
Discovery = Literal["none", "dns"]
# (host, port) -> the addresses the name has now; [] when it has none. Raises (OSError, ...)
# when the lookup itself failed, so the pool keeps what it knew.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# getaddrinfo's "no such name" and "no address": an answer (no pods), not a failed lookup.
_NO_ADDRESS_ERRNOS = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The default `Resolver`: the event loop's `getaddrinfo` (the system's resolver, search
    domains included), each address once in the order given. A name that does not exist or has
    no address (a headless Service without ready pods answers NXDOMAIN) resolves to []."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS_ERRNOS:
            return []
        raise
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


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
class _Source:
    """One base URL of `endpoints` that names a fleet (`discovery="dns"`): its host is resolved
    and each address becomes an endpoint."""

    base_url: str  # as configured (credentials included)
    host: str
    port: int
    host_header: str  # host[:port] as configured: what each pod's requests carry as Host
    label_prefix: str  # host[:port][/path]; a pod's label is this + "/" + its address
    resolved: bool = False  # answered at least once (a lookup that failed does not count)
    empty: bool = False  # its last answer had no address
    failures: int = 0  # lookups failed since the last that succeeded
    unreported: int = 0  # of those, failures not yet in a warning
    warned_at: float | None = None


@dataclass(eq=False)
class _Endpoint:
    index: int  # position in the pool's list of live endpoints (rotates routing ties)
    base_url: str
    completions_url: str
    health_url: str
    label: str
    semaphore: asyncio.Semaphore
    breaker: CircuitBreaker
    headers: Mapping[str, str]  # of completions requests
    health_headers: Mapping[str, str]
    source: _Source | None = None  # the name it was discovered under; None: configured as is
    address: str | None = None
    draining: bool = False  # vanished from DNS: takes no new request, removed once idle
    outstanding_tokens: int = 0
    in_flight: int = 0


# One sample per outcome of clear_backend_requests_total (the label values it can take).
_OUTCOMES = ("ok", "timeout", "transport", "http_429", "http_5xx", "http_4xx", "bad_response")


@dataclass(frozen=True)
class _PoolMetrics:
    errors: Counter
    requests: Counter
    latency: Histogram
    outstanding: Gauge
    in_flight: Gauge
    breaker: Gauge

    def add(self, ep: _Endpoint) -> None:
        """The endpoint's gauges, read from it at scrape time: nothing on the hot path."""
        self.outstanding.labels(ep.label).set_function(lambda: ep.outstanding_tokens)
        self.in_flight.labels(ep.label).set_function(lambda: ep.in_flight)
        self.breaker.labels(ep.label).set_function(lambda: _BREAKER_GAUGE_VALUE[ep.breaker.state])

    def remove(self, ep: _Endpoint) -> None:
        """Every series of a removed endpoint, so labels do not pile up as pods come and go."""
        for metric in (self.outstanding, self.in_flight, self.breaker, self.errors, self.latency):
            metric.remove(ep.label)
        for outcome in _OUTCOMES:
            self.requests.remove(ep.label, outcome)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _PoolMetrics:
        outstanding, in_flight, breaker = _endpoint_gauges(registry)
        return cls(
            outstanding=outstanding,
            in_flight=in_flight,
            breaker=breaker,
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
    registry: CollectorRegistry,
    waiting: Callable[[], float],
    outage: Callable[[], float],
    endpoints: Callable[[], float],
) -> None:
    """Pool-wide gauges, read at scrape time like the per-endpoint ones."""
    Gauge(
        "clear_backend_endpoints",
        "Endpoints requests are routed to: the configured ones, or the addresses DNS discovery "
        "found (draining ones excluded).",
        registry=registry,
    ).set_function(endpoints)
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


def _endpoint_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge, Gauge]:
    """Gauges read from the endpoints at scrape time (`_PoolMetrics.add`)."""
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
    return outstanding, in_flight, breaker


# --- the pool -----------------------------------------------------------------------------------


class VllmPool:
    """`CompletionBackend` over one or more vLLM OpenAI-compatible servers.

    HTTP goes through `transport` (default: an `AiohttpTransport` with a connection per
    concurrency slot and `connect_timeout_s`), which the pool closes in `aclose()`.
    Metrics register on `registry`, so one registry holds at most one pool. `outage_wait_s`
    bounds how long a request waits for an endpoint while none can take it (0: fail at once).
    Breaker changes are logged at warning on `logger`.

    `discovery="dns"` resolves each host name of `endpoints` through `resolver` (default:
    `resolve_addresses`) once before the first request (`start()`, or the first `complete()`)
    and then every `discovery_interval_s` seconds, one endpoint per address (module docstring).
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
        discovery: Discovery = "none",
        discovery_interval_s: float = 10.0,
        resolver: Resolver | None = None,
        mask_secrets: Callable[[str], str] | None = None,
    ) -> None:
        """`mask_secrets` masks the configured secrets' exact values in a text (the daemon's
        `Scrubber.text`); error bodies pass through it before they are shortened, so a cut can
        never leave part of a secret that the later masking would no longer recognise."""
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
        _check_discovery(endpoints, discovery, discovery_interval_s)
        self._log = logger or structlog.get_logger("clearbudget.vllm")
        self._mask_secrets = mask_secrets or (lambda text: text)
        breaker_settings = breaker or BreakerSettings()

        def new_breaker(label: str) -> CircuitBreaker:
            return CircuitBreaker(breaker_settings, clock, self._breaker_listener(label))

        self._new_breaker = new_breaker
        self._headers = {"Content-Type": "application/json"}
        self._health_headers: dict[str, str] = {}
        if api_key:  # vLLM leaves /health open, but a proxy in front may not
            self._headers["Authorization"] = self._health_headers["Authorization"] = (
                f"Bearer {api_key}"
            )
        self._max_concurrency = max_concurrency_per_endpoint
        self._metrics = _PoolMetrics.create(registry)
        # The endpoints requests may be routed to, and those that vanished from DNS with
        # requests still in flight there (no new ones; removed once idle).
        self._endpoints: list[_Endpoint] = []
        self._by_label: dict[str, _Endpoint] = {}
        self._draining: list[_Endpoint] = []
        self._sources: list[_Source] = []
        for url in endpoints:
            source = _source(url) if discovery == "dns" else None
            if source is None:
                self._add(self._endpoint(url, None, None))
                self._metrics.add(self._endpoints[-1])
            else:
                self._sources.append(source)
        self._resolver = resolver or resolve_addresses
        self._discovery_interval_s = discovery_interval_s
        self._discovery: asyncio.Task[None] | None = None
        self._discovered = asyncio.Event()  # every source has been looked up once
        self._discovery_lock = asyncio.Lock()
        if not self._sources:
            self._discovered.set()
        if transport is None:
            transport = AiohttpTransport(
                # With discovery the pod count is not known: the semaphores bound connections.
                max_connections=None
                if self._sources
                else len(self._endpoints) * max_concurrency_per_endpoint,
                connect_timeout_s=connect_timeout_s,
            )
        self._transport = transport
        self._model = model
        self._request_timeout_s = request_timeout_s
        self._max_attempts = max_attempts
        self._temperature = temperature
        self._extra_body = dict(extra_body or {})
        self._retry_backoff_s = retry_backoff_s
        # Sequence key -> the label of the endpoint that generated it (a label, not the
        # endpoint: a pod that drops out of DNS and returns keeps its chains).
        self._affinity: OrderedDict[bytes, str] = OrderedDict()
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
        _outage_gauges(
            registry,
            lambda: self._waiting,
            lambda: 0.0 if self._usable() else 1.0,
            lambda: len(self._endpoints),
        )

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The base URLs requests may go to now (discovered pods by address)."""
        return tuple(ep.base_url for ep in self._endpoints)

    def breaker_states(self) -> dict[str, BreakerState]:
        """Breaker state per endpoint label (for health pages and logs)."""
        return {ep.label: ep.breaker.state for ep in self._endpoints}

    def ready(self) -> bool:
        """Whether a request could be sent now: the pool is open and some breaker lets it pass."""
        if self._sources and not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to start yet
                self._ensure_discovery()
        return not self._closed and self._usable()

    async def start(self) -> None:
        """Look the discovered names up once (the first requests then have their pods) and keep
        looking them up every `discovery_interval_s`; nothing to do without discovery.
        `complete()` does the same on its first call."""
        if self._sources and not self._closed:
            self._ensure_discovery()
            await self._discovered.wait()

    async def refresh(self) -> None:
        """Look every discovered name up now and update the endpoints: new addresses join,
        vanished ones drain; a failed lookup keeps what the name had."""
        async with self._discovery_lock:
            answers = await asyncio.gather(*(self._lookup(src) for src in self._sources))
            if self._closed:
                return
            for source, addresses in zip(self._sources, answers, strict=True):
                if addresses is not None:
                    self._reconcile(source, addresses)
            self._discovered.set()

    async def aclose(self) -> None:
        """Refuse new requests, fail the waiting ones, stop the watcher and the discovery,
        close the transport."""
        self._closed = True
        self._wake_all()
        self._discovered.set()  # a request waiting for the first lookup fails as closed
        tasks = {t for t in (self._watcher, self._discovery) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            # wait(), not `await task`: that would raise the task's CancelledError, which
            # must not be confused with (or swallow) a cancellation of aclose() itself.
            await asyncio.wait(tasks)
        await self._transport.aclose()

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
        thinking_token_budget: int | None = None,
    ) -> Completion:
        """Generate `n` chains of at most `max_tokens` tokens continuing `prompt` (text or ids),
        waiting out an outage (up to `outage_wait_s`) rather than failing in it."""
        if self._closed:
            raise BackendError("the vLLM pool is closed")
        request, payload = self._encode(
            prompt, n=n, max_tokens=max_tokens, seed=seed, thinking=thinking_token_budget
        )
        if self._sources:
            await self.start()  # at once after the first lookup; restarts a discovery that died
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
        made = 0
        while made < self._max_attempts:
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
                if exc.outcome == "drained":  # never sent: no attempt, and it is not picked again
                    continue
                made += 1
                attempts.failures.append(f"{endpoint.label}: {exc}")
                generated = cost if exc.generated_tokens == UNKNOWN_TOKENS else exc.generated_tokens
                attempts.discarded_tokens += min(generated, cost)
                if attempts.successes_at_first_failure is None:
                    attempts.successes_at_first_failure = self._successes
                continue
            self._remember(request.prompt, completion, endpoint)
            return completion
        return None

    # --- membership: configured endpoints, DNS discovery, draining -----------------------------

    def _endpoint(self, base_url: str, source: _Source | None, address: str | None) -> _Endpoint:
        base_url = base_url.rstrip("/")
        headers, health_headers = self._headers, self._health_headers
        if source is None or address is None:
            label = _redact(base_url)
        else:
            label = f"{source.label_prefix}/{address}"
            base_url = _with_address(base_url, address)
            headers = {**headers, "Host": source.host_header}
            health_headers = {**health_headers, "Host": source.host_header}
        return _Endpoint(
            index=len(self._endpoints),
            base_url=base_url,
            completions_url=base_url + "/v1/completions",
            health_url=base_url + "/health",
            label=label,
            semaphore=asyncio.Semaphore(self._max_concurrency),
            breaker=self._new_breaker(label),
            headers=headers,
            health_headers=health_headers,
            source=source,
            address=address,
        )

    def _add(self, ep: _Endpoint) -> None:
        ep.draining = False
        ep.index = len(self._endpoints)
        self._endpoints.append(ep)
        self._by_label[ep.label] = ep

    def _drain(self, ep: _Endpoint) -> None:
        """No new request goes to `ep`; those sent there finish, those waiting for one of its
        slots go elsewhere (`_attempt`), then it is removed."""
        self._endpoints.remove(ep)
        for i, live in enumerate(self._endpoints):
            live.index = i
        del self._by_label[ep.label]
        ep.draining = True
        self._draining.append(ep)
        self._retire_if_idle(ep)

    def _retire_if_idle(self, ep: _Endpoint) -> None:
        if ep.draining and ep.in_flight == 0 and ep in self._draining:
            self._draining.remove(ep)
            self._metrics.remove(ep)
            self._log.info("vllm_endpoint_removed", endpoint=ep.label)

    def _ensure_discovery(self) -> None:
        """Start the discovery loop (or restart one that died); needs a running loop."""
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.get_running_loop().create_task(
                self._discover(), name="vllm-pool-discovery"
            )
            self._discovery.add_done_callback(self._discovery_ended)

    def _discovery_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._log.error("vllm_discovery_failed", error=repr(task.exception()))
        self._discovered.set()  # nobody waits on a loop that is gone; the next call restarts it

    async def _discover(self) -> None:
        while not self._closed:
            await self.refresh()
            await asyncio.sleep(self._discovery_interval_s)

    async def _lookup(self, source: _Source) -> list[str] | None:
        """The addresses `source` has now, or None (logged, rate-limited) if the lookup failed."""
        try:
            found = await asyncio.wait_for(
                self._resolver(source.host, source.port), _RESOLVE_TIMEOUT_S
            )
            addresses = list(dict.fromkeys(_canonical_address(str(a)) for a in found))
        except Exception as exc:  # any failure of the lookup: keep what the name had
            source.failures += 1
            source.unreported += 1
            now = self._clock()
            if source.warned_at is None or now - source.warned_at >= _DISCOVERY_WARN_EVERY_S:
                self._log.warning(
                    "vllm_discovery_lookup_failed",
                    name=source.host_header,
                    error=repr(exc),
                    failures=source.unreported,
                    kept=sum(ep.source is source for ep in self._endpoints),
                )
                source.warned_at, source.unreported = now, 0
            return None
        if source.failures:
            self._log.warning(
                "vllm_discovery_lookup_recovered", name=source.host_header, failures=source.failures
            )
            source.failures = source.unreported = 0
            source.warned_at = None
        return addresses

    def _reconcile(self, source: _Source, addresses: list[str]) -> None:
        """Make `source`'s endpoints the pods at `addresses`: new ones join (a draining one that
        reappears is taken back, breaker and all), vanished ones drain."""
        live = {ep.address: ep for ep in self._endpoints if ep.source is source}
        draining = {ep.address: ep for ep in self._draining if ep.source is source}
        joined = 0
        for address in addresses:
            if address in live:
                continue
            back = draining.get(address)
            if back is not None:
                self._draining.remove(back)
                self._add(back)
            else:
                self._add(self._endpoint(source.base_url, source, address))
                self._metrics.add(self._endpoints[-1])
            joined += 1
            self._log.info("vllm_endpoint_added", endpoint=self._endpoints[-1].label)
        for address, ep in live.items():
            if address not in addresses:
                self._log.info("vllm_endpoint_draining", endpoint=ep.label, in_flight=ep.in_flight)
                self._drain(ep)
        if not addresses and (not source.empty or not source.resolved):
            self._log.warning("vllm_discovery_no_address", name=source.host_header)
        source.resolved, source.empty = True, not addresses
        if joined:
            if self._outage_since is not None and self._usable():  # new pods, fresh breakers
                lasted = self._clock() - self._outage_since
                self._outage_since = None
                self._log.warning("vllm_outage_over", duration_s=lasted, waiting=self._waiting)
            self._wake_all()  # requests waiting out an outage may take the new pods

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
                ep.health_url, ep.health_headers, _HEALTH_TIMEOUT_S
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
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None,
        thinking: int | None,
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
                thinking_token_budget=thinking,
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
        label = self._affinity.get(key)
        if label is None:
            return None
        self._affinity.move_to_end(key)
        return self._by_label.get(label)  # None while that pod is out of the pool

    def _remember(self, prompt: str | Sequence[int], completion: Completion, ep: _Endpoint) -> None:
        """Map each sample's full sequence to `ep`, whose prefix cache now holds it."""
        if self._affinity_entries == 0:
            return
        for sample in completion.samples:
            if isinstance(prompt, str):
                self._affinity[_sequence_key(prompt + sample.text)] = ep.label
            ids = completion.prompt_token_ids
            if ids is None and not isinstance(prompt, str):
                ids = tuple(prompt)
            if ids is not None and sample.token_ids is not None:
                self._affinity[_sequence_key([*ids, *sample.token_ids])] = ep.label
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
                if ep.draining:  # it left the fleet while this request waited for a slot
                    raise _RetryableError("drained", f"{ep.label} left the fleet")
                completion = await self._send(ep, payload, n=n)
            verdict = "success"
            self._successes += 1
            return completion
        except _RetryableError as exc:
            verdict = "neutral" if exc.outcome == "drained" else "failure"
            raise
        finally:
            ep.outstanding_tokens -= cost
            ep.in_flight -= 1
            ep.breaker.finish(verdict, trial=trial)
            if ep.draining:
                self._retire_if_idle(ep)
            elif self._waiting and ep.breaker.available():  # closed, or its trial slot is free
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
                ep.completions_url, payload, ep.headers, self._request_timeout_s
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
        whole = redact(self._mask_secrets(error_message(payload, limit=len(payload) + 1)))
        self._log.debug("vllm_error_body", endpoint=ep.label, body=whole[:MAX_ERROR_CHARS])
        return whole[:SHORT_ERROR_CHARS]

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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _source(url: str) -> _Source | None:
    """`url` as a name to discover, or None when its host is an IP literal (taken as is)."""
    parts = urlsplit(url.rstrip("/"))
    host = parts.hostname or ""
    if _is_ip(host):
        return None
    hostport = parts.netloc.rpartition("@")[2]
    return _Source(
        base_url=url.rstrip("/"),
        host=host,
        port=parts.port or (443 if parts.scheme == "https" else 80),
        host_header=hostport,
        label_prefix=hostport + parts.path,
    )


def _canonical_address(address: str) -> str:
    """An address as a URL and a label write it: IPv6 compressed, no zone index."""
    return str(ipaddress.ip_address(address.partition("%")[0]))


def _with_address(base_url: str, address: str) -> str:
    """`base_url` with its host replaced by `address` (credentials, port and path kept)."""
    parts = urlsplit(base_url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit((parts.scheme, f"{userinfo}{at}{host}{port}", parts.path, "", ""))


def _check_discovery(endpoints: Sequence[str], discovery: str, discovery_interval_s: float) -> None:
    if discovery not in ("none", "dns"):
        raise ValueError(f"discovery: must be 'none' or 'dns', got {discovery!r}")
    if not discovery_interval_s > 0:
        raise ValueError(f"discovery_interval_s: must be > 0, got {discovery_interval_s!r}")
    if discovery == "dns":
        prefixes = [src.label_prefix for url in endpoints if (src := _source(url)) is not None]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(
                f"endpoints: with DNS discovery two base URLs differ only in their scheme or "
                f"credentials ({sorted(prefixes)}): their pods would share metric labels"
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
