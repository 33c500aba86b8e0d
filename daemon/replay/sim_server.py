"""The rollout simulator served like a vLLM pod: an OpenAI-compatible completions API over aiohttp.

`POST /v1/completions` parses, answers and reports errors in the wire format of
`daemon.vllm.protocol` (the same code the vLLM pool uses on the other end), so the pool, the
daemon and load tests can run against recorded rollouts. `PodTiming` optionally makes each
answer take the time a GPU pod would need to decode it.

May import `daemon.core.ports`, `daemon.replay.simulator`, `daemon.vllm.protocol` and aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from clearbudget.daemon.core.ports import Completion
from clearbudget.daemon.replay.simulator import SimulatedBackend, SimulationRequestError
from clearbudget.daemon.vllm.protocol import (
    ApiError,
    CompletionRequest,
    WireFormatError,
    encode_completion,
    parse_request,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "PodTiming",
    "RunningSimulator",
    "create_app",
    "start_simulator",
]

DEFAULT_MODEL_NAME = "clearbudget-sim"
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class PodTiming:
    """Emulated generation time of one GPU pod, for load tests that need a slow backend.

    The pod decodes at most `max_num_seqs` sequences at once, each at `decode_tokens_per_second`;
    a request holds one sequence slot per sample for as long as its longest sample takes, and
    waits (first come, first served) while the slots are taken.
    """

    decode_tokens_per_second: float
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if not self.decode_tokens_per_second > 0:
            raise ValueError(
                f"decode_tokens_per_second must be > 0, got {self.decode_tokens_per_second}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


class _DecodeSlots:
    """The sequence slots of an emulated pod (see `PodTiming`)."""

    def __init__(
        self,
        timing: PodTiming,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._timing = timing
        self._slots = asyncio.Semaphore(timing.max_num_seqs)
        self._admission = asyncio.Lock()  # one request gathers its slots at a time: no deadlock
        self._sleep = sleep

    async def generate(self, completion: Completion) -> None:
        """Hold slots for the time `completion` takes to decode."""
        sequences = min(len(completion.samples), self._timing.max_num_seqs)
        longest = max((s.completion_tokens or 0 for s in completion.samples), default=0)
        held = 0
        try:
            async with self._admission:
                while held < sequences:
                    await self._slots.acquire()
                    held += 1
            await self._sleep(longest / self._timing.decode_tokens_per_second)
        finally:  # also when cancelled half-way through gathering slots
            for _ in range(held):
                self._slots.release()


def _error(status: int, message: str, param: str | None) -> web.Response:
    body = ApiError.for_status(status, message, param).encode()
    return web.Response(body=body, status=status, content_type=_JSON)


def _generate(backend: SimulatedBackend, request: CompletionRequest) -> Completion:
    if not isinstance(request.prompt, str):  # no tokenizer here: chains continue by text
        raise SimulationRequestError("prompt", "token-id prompts are not supported; send text")
    return backend.generate(
        request.prompt,
        n=request.n,
        max_tokens=request.max_tokens,
        seed=request.seed,
        model=request.model,
        thinking_token_budget=request.thinking_token_budget,
    )


def create_app(
    backend: SimulatedBackend,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    clock: Callable[[], float] = time.time,
    timing: PodTiming | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> web.Application:
    """An aiohttp app serving `backend` as `POST /v1/completions`, `GET /v1/models`, `/health`;
    with `timing`, each completion takes the time an emulated pod would need to decode it."""
    slots = _DecodeSlots(timing, sleep) if timing is not None else None

    async def completions(http: web.Request) -> web.Response:
        try:
            request = parse_request(await http.read(), default_model=model_name)
            completion = _generate(backend, request)
        except (WireFormatError, SimulationRequestError) as exc:
            return _error(400, str(exc), exc.field)
        if slots is not None:
            await slots.generate(completion)
        body = encode_completion(completion, model=request.model, created=int(clock()))
        return web.Response(body=body, content_type=_JSON)

    async def models(_: web.Request) -> web.Response:
        names = dict.fromkeys([model_name, *backend.pool.models])
        data = [
            {"id": name, "object": "model", "created": int(clock()), "owned_by": "clearbudget"}
            for name in names
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "records": len(backend.pool)})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


@dataclass(slots=True)
class RunningSimulator:
    """A simulator server listening on `host:port`; `close()` stops it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL as vLLM endpoints are configured (`CLEAR_VLLM_ENDPOINTS`)."""
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_simulator(
    backend: SimulatedBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str = DEFAULT_MODEL_NAME,
    timing: PodTiming | None = None,
) -> RunningSimulator:
    """Serve `backend` on `host:port` (port 0: a free port, reported on the result)."""
    app = create_app(backend, model_name=model_name, timing=timing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(runner, sock)
        await site.start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    return RunningSimulator(runner=runner, host=host, port=sock.getsockname()[1])
