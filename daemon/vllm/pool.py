"""A pool of vLLM pods behind the `CompletionBackend` port (OpenAI-compatible completions API).

Routing sends each request to the usable endpoint with the fewest outstanding tokens (the sum of
`n * max_tokens` of requests sent or queued there), so long generations spread by cost, not by
request count. A continuation whose prompt is exactly an earlier sample's full sequence
(`prompt_token_ids + token_ids`, or prompt text + sample text) prefers the pod that generated it,
where vLLM's prefix cache still holds the chain. Each endpoint has a concurrency bound (a
semaphore) and a circuit breaker: it opens after `failure_threshold` consecutive failures, lets a
single trial request through after `cooldown_s` on the injected clock, and closes on its success.

Connect errors, timeouts, 429, 5xx and malformed responses are retried on another endpoint (the
same one only when every usable endpoint has been tried); other 4xx responses fail at once with
the server's message. `BackendError` is raised only when every attempt failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson
import yarl
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from daemon.core.ports import BackendError, Completion, FinishReason, Sample

__all__ = [
    "BackendRequestError",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "VllmPool",
]

BreakerState = Literal["closed", "half_open", "open"]
_BREAKER_GAUGE_VALUE: dict[BreakerState, float] = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_FINISH_REASONS: frozenset[str] = frozenset({"stop", "length"})
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_MAX_ERROR_CHARS = 500
# Idle connections are dropped before vLLM's server closes them (uvicorn keep-alive: 5 s), so a
# reused connection is never one the server has just closed.
_KEEPALIVE_S = 4.0

Verdict = Literal["success", "failure", "neutral"]


class BackendRequestError(BackendError):
    """The request itself is bad (a 4xx other than 429, or an invalid argument): not retried.

    `status_code` is the server's HTTP status (None when rejected before sending); `field` names
    the offending argument when known.
    """

    def __init__(self, message: str, *, status_code: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.field = field


class _RetryableError(Exception):
    """One attempt failed in a way another endpoint may not: count it and try elsewhere."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Circuit breaker policy, the same for every endpoint."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")


class CircuitBreaker:
    """Closed → open after N consecutive failures → half-open (one trial) after the cooldown."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def available(self) -> bool:
        """Whether a request may be sent now."""
        if self._state == "closed":
            return True
        if self._state == "half_open":
            return not self._trial_in_flight
        return self._clock() - self._opened_at >= self._settings.cooldown_s

    def begin(self) -> bool:
        """A request is being sent (after `available()`); True when it is the half-open trial."""
        if self._state == "closed":
            return False
        self._state = "half_open"
        self._trial_in_flight = True
        return True

    def finish(self, verdict: Verdict, *, trial: bool) -> None:
        if trial:
            self._trial_in_flight = False
        if verdict == "success":
            self._state = "closed"
            self._failures = 0
        elif verdict == "failure":
            self._failures += 1
            if self._state == "half_open" or self._failures >= self._settings.failure_threshold:
                self._open()

    def _open(self) -> None:
        if self._state != "open":
            self._opened_at = self._clock()
            self._failures = 0  # count anew: a failed half-open trial reopens on its own
        self._state = "open"


@dataclass(eq=False)
class _Endpoint:
    index: int
    base_url: str
    completions_url: yarl.URL
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
            breaker.labels(ep.label).set_function(
                lambda ep=ep: _BREAKER_GAUGE_VALUE[ep.breaker.state]
            )
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


class VllmPool:
    """`CompletionBackend` over one or more vLLM OpenAI-compatible servers.

    The pool owns an aiohttp session (HTTP/1.1 keep-alive, a connection per concurrency slot),
    opened on the first request inside the running loop and closed by `aclose()`. aiohttp rather
    than httpx: on the daemon's hot path httpx cost 1-2 ms of CPU per request through its own
    connection pool (it polls every idle pooled socket on each request) and about 0.2 ms over
    aiohttp's pool, against about 0.1 ms for aiohttp alone (benchmarks/RESULTS.md, "Daemon").
    Metrics register on `registry`, so one registry holds at most one pool.
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
        )
        breaker_settings = breaker or BreakerSettings()
        self._endpoints = [
            _Endpoint(
                index=i,
                base_url=url.rstrip("/"),
                completions_url=yarl.URL(url.rstrip("/") + "/v1/completions"),
                label=_redact(url.rstrip("/")),
                semaphore=asyncio.Semaphore(max_concurrency_per_endpoint),
                breaker=CircuitBreaker(breaker_settings, clock),
            )
            for i, url in enumerate(endpoints)
        ]
        self._model = model
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._max_concurrency = max_concurrency_per_endpoint
        connect_s = min(connect_timeout_s, request_timeout_s)  # DNS, TCP and TLS
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, connect=connect_s, sock_connect=connect_s
        )
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
        self._metrics = _PoolMetrics.create(registry, self._endpoints)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(ep.base_url for ep in self._endpoints)

    def breaker_states(self) -> dict[str, BreakerState]:
        """Breaker state per endpoint label (for health pages and logs)."""
        return {ep.label: ep.breaker.state for ep in self._endpoints}

    def ready(self) -> bool:
        """Whether a request could be sent now: the pool is open and some breaker lets it pass."""
        return not self._closed and any(ep.breaker.available() for ep in self._endpoints)

    async def aclose(self) -> None:
        """Refuse new requests and close the HTTP session."""
        self._closed = True
        if self._session is not None:
            await self._session.close()

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
    ) -> Completion:
        """Generate `n` chains of at most `max_tokens` tokens continuing `prompt` (text or ids)."""
        if self._closed:
            raise BackendError("the vLLM pool is closed")
        body = self._request_body(prompt, n=n, max_tokens=max_tokens, seed=seed)
        try:  # once, before any attempt: what cannot be encoded is the caller's error
            payload = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise BackendRequestError(f"request body cannot be sent as JSON: {exc}") from exc
        preferred = self._affinity_for(body["prompt"])
        tried: list[_Endpoint] = []
        failures: list[str] = []
        for _ in range(self._max_attempts):
            endpoint = self._pick(tried, preferred)
            if endpoint is None:
                failures.append("no usable endpoint (every circuit breaker is open)")
                break
            if endpoint in tried and self._retry_backoff_s > 0:
                await self._sleep(self._retry_backoff_s)
            tried.append(endpoint)
            try:
                completion = await self._attempt(endpoint, payload, n=n, cost=n * max_tokens)
            except _RetryableError as exc:
                failures.append(f"{endpoint.label}: {exc}")
                continue
            self._remember(body["prompt"], completion, endpoint)
            return completion
        raise BackendError(
            f"completion failed after {len(tried)} attempt(s): " + "; ".join(failures)
        )

    # --- request building -------------------------------------------------------------------

    def _request_body(
        self, prompt: str | Sequence[int], *, n: int, max_tokens: int, seed: int | None
    ) -> dict[str, Any]:
        _check_count("n", n)
        _check_count("max_tokens", max_tokens)
        if seed is not None and not _is_int(seed):
            raise BackendRequestError("seed: must be an integer or None", field="seed")
        body: dict[str, Any] = {
            **self._extra_body,
            "model": self._model,
            "prompt": _prompt_payload(prompt),
            "n": n,
            "max_tokens": max_tokens,
            "temperature": self._temperature,
            "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        return body

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

    def _affinity_for(self, prompt: str | list[int]) -> _Endpoint | None:
        key = _sequence_key(prompt)
        endpoint = self._affinity.get(key)
        if endpoint is not None:
            self._affinity.move_to_end(key)
        return endpoint

    def _remember(self, prompt: str | list[int], completion: Completion, ep: _Endpoint) -> None:
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
            return completion
        except _RetryableError:
            verdict = "failure"
            raise
        finally:
            ep.outstanding_tokens -= cost
            ep.in_flight -= 1
            ep.breaker.finish(verdict, trial=trial)

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
        try:
            async with self._http().post(
                ep.completions_url,
                data=payload,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,  # a redirect is not an answer: retried as bad_response
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:  # aiohttp's own time-outs are TimeoutErrors too
            raise _RetryableError("timeout", f"timed out ({type(exc).__name__})") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _RetryableError("transport", f"{type(exc).__name__}: {exc}") from exc

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:  # a request that was queued when the pool closed
            raise BackendError("the vLLM pool is closed")
        if self._session is None:
            slots = len(self._endpoints) * self._max_concurrency
            connector = aiohttp.TCPConnector(
                limit=slots, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S
            )
            self._session = aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    def _interpret(self, ep: _Endpoint, status: int, payload: bytes, *, n: int) -> Completion:
        if status == 429 or status >= 500:
            outcome = "http_429" if status == 429 else "http_5xx"
            raise _RetryableError(outcome, f"HTTP {status}: {_error_message(payload)}")
        if status >= 400:
            raise BackendRequestError(
                f"{ep.label} rejected the request (HTTP {status}): {_error_message(payload)}",
                status_code=status,
            )
        if status != 200:
            raise _RetryableError("bad_response", f"unexpected HTTP {status}")
        try:
            return _parse_completion(orjson.loads(payload), n=n)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _RetryableError("bad_response", f"malformed completion: {exc}") from exc

    def _count(self, ep: _Endpoint, outcome: str) -> None:
        self._metrics.requests.labels(ep.label, outcome).inc()
        if outcome != "ok":
            self._metrics.errors.labels(ep.label).inc()


# --- helpers ----------------------------------------------------------------------------------


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
) -> None:
    if isinstance(endpoints, str) or not endpoints:
        raise ValueError("endpoints: need at least one base URL (a sequence of strings)")
    for url in endpoints:
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError(f"endpoints: {url!r} is not an http(s) base URL")
        if api_key and "@" in parts.netloc:
            raise ValueError(
                f"endpoints: {_redact(url)!r} carries user:password and an api_key is set: "
                "use one or the other"
            )
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
    }
    for name, (value, bound, inclusive) in minimums.items():
        if value < bound or (value == bound and not inclusive):
            relation = ">=" if inclusive else ">"
            raise ValueError(f"{name}: must be {relation} {bound}, got {value!r}")


def _redact(url: str) -> str:
    """The URL without user:password, fit for a metric label."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendRequestError(f"{field}: must be an integer >= 1, got {value!r}", field=field)


def _prompt_payload(prompt: str | Sequence[int]) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise BackendRequestError("prompt: must not be empty", field="prompt")
        return prompt
    ids = list(prompt)
    if not ids or not all(_is_int(t) and t >= 0 for t in ids):
        raise BackendRequestError(
            "prompt: a token-id prompt must be a non-empty list of integers >= 0", field="prompt"
        )
    return ids


def _sequence_key(sequence: str | Sequence[int]) -> bytes:
    if isinstance(sequence, str):
        data = b"t" + sequence.encode("utf-8", "surrogatepass")
    else:
        data = b"i" + array("q", sequence).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def _error_message(payload: bytes) -> str:
    """The server's own error message (vLLM: {"error": {"message": ...}}), else the body."""
    try:
        data = orjson.loads(payload)
    except ValueError:
        data = None
    message: object = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message or data.get("message") or data.get("detail")
    text = str(message) if message else payload.decode("utf-8", "replace")
    return text[:_MAX_ERROR_CHARS] or "(empty body)"


def _parse_completion(data: Any, *, n: int) -> Completion:
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"expected {n} choices, got {len(choices)}")
    usage = data["usage"]
    prompt_tokens = usage["prompt_tokens"]
    completion_tokens = usage["completion_tokens"]
    if not (_is_int(prompt_tokens) and _is_int(completion_tokens)):
        raise ValueError(f"usage counts are not integers: {usage!r}")
    prompt_ids = choices[0].get("prompt_token_ids") if choices else None
    if prompt_ids is None:
        prompt_ids = data.get("prompt_token_ids")
    return Completion(
        samples=tuple(_parse_sample(choice) for choice in choices),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        prompt_token_ids=_token_ids(prompt_ids, "prompt_token_ids"),
    )


def _parse_sample(choice: Mapping[str, Any]) -> Sample:
    text = choice["text"]
    if not isinstance(text, str):
        raise ValueError("choice text is not a string")
    reason = choice.get("finish_reason")
    if reason not in _FINISH_REASONS:
        raise ValueError(f"finish_reason {reason!r} is neither 'stop' nor 'length'")
    token_ids = _token_ids(choice.get("token_ids"), "token_ids")
    finish_reason: FinishReason = "stop" if reason == "stop" else "length"
    return Sample(
        text=text,
        finish_reason=finish_reason,
        completion_tokens=None if token_ids is None else len(token_ids),
        token_ids=token_ids,
    )


def _token_ids(value: object, field: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise ValueError(f"{field} is not a list of integers")
    return tuple(value)
