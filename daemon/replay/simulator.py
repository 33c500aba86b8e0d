"""The rollout simulator backend: recorded reasoning chains served like a vLLM pod.

Every prompt maps deterministically to one pool record: a continuation marker at its end names the
record and chain; else a line `problem: <record key or problem id>`; else a blake2b hash of the
prompt. Each of the `n` samples draws one of the record's recorded chains (distinct chains while
there are enough) and follows the truncation rule: a chain of T tokens under `max_tokens` m
finishes (`stop`, T tokens, `\\boxed{answer}`) iff T <= m, else it is cut (`length`, m tokens, no
answer). Generated text carries a marker `<<sim chain=KEY#i at=N>>` (N = chain tokens generated so
far), so a later request whose prompt is the original prompt plus that text continues the same
chain and is charged only for the new tokens, as with vLLM prefix caching.

`SimulatedBackend` implements the `CompletionBackend` port in-process; `create_app` /
`start_simulator` serve it as an OpenAI-compatible completions API over aiohttp.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from daemon.core.ports import Completion, FinishReason, Sample
from daemon.replay.rollouts import RolloutPool, RolloutRecord

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ChainRef",
    "RunningSimulator",
    "SimulatedBackend",
    "SimulationRequestError",
    "create_app",
    "find_marker",
    "format_marker",
    "grade",
    "prompt_for",
    "start_simulator",
]

DEFAULT_MODEL_NAME = "clearbudget-sim"
DEFAULT_MAX_TOKENS = 16  # the OpenAI / vLLM default for /v1/completions
MAX_N = 1024

_MARKER = re.compile(r"<<sim chain=(?P<key>[^\s#<>]+)#(?P<chain>\d+) at=(?P<at>\d+)>>")
_MARKER_AT_END = re.compile(_MARKER.pattern + r"\s*\Z")
_PROBLEM_LINE = re.compile(
    r"^[ \t]*(?:problem|problem_id|record)[ \t]*[:=][ \t]*(\S+)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)


class SimulationRequestError(ValueError):
    """A request the simulator cannot serve; `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class ChainRef:
    """Position in a recorded chain: record key, chain index, tokens generated so far."""

    key: str
    chain: int
    at: int


def format_marker(ref: ChainRef) -> str:
    return f"<<sim chain={ref.key}#{ref.chain} at={ref.at}>>"


def find_marker(text: str) -> ChainRef | None:
    """The last simulator marker in `text`, if any."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return ChainRef(last["key"], int(last["chain"]), int(last["at"]))


def prompt_for(record: RolloutRecord, question: str = "") -> str:
    """A prompt that the simulator maps to `record` (for replays that build their own prompts)."""
    body = question or f"Solve {record.benchmark} problem {record.problem_id}."
    return f"problem: {record.key}\n{body}\n"


def grade(text: str, record: RolloutRecord) -> bool:
    """Whether a generated text is a correct answer to `record`.

    Uses the recorded grade of the chain named by the text's last marker; a chain that has not
    finished (cut at its cap) has no answer and is never correct.
    """
    ref = find_marker(text)
    if ref is None or ref.key != record.key or ref.chain >= len(record.samples):
        return False
    sample = record.samples[ref.chain]
    return ref.at >= sample.tokens and sample.correct


def _digest(*parts: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(str(part).encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
    return h.digest()


class SimulatedBackend:
    """An in-process `CompletionBackend` that replays recorded chains of a rollout pool.

    Reproducible: with a request `seed`, the same prompt and seed always draw the same chains;
    without one, draws depend on the backend `seed` and how many times this exact prompt was
    requested before (so identical repeated prompts get fresh, yet replayable, draws).
    """

    def __init__(self, pool: RolloutPool, *, seed: int = 0, model: str | None = None) -> None:
        self.pool = pool
        self.seed = seed
        self.model = model
        self._prompt_calls: dict[bytes, int] = {}

    async def complete(
        self, prompt: str | Sequence[int], *, n: int, max_tokens: int, seed: int | None = None
    ) -> Completion:
        """The `CompletionBackend` port. Text prompts only: the simulator returns no token ids,
        so callers continue chains by text (prompt + sample text)."""
        if not isinstance(prompt, str):
            raise SimulationRequestError("prompt", "token-id prompts are not supported; send text")
        return self.generate(prompt, n=n, max_tokens=max_tokens, seed=seed)

    def generate(
        self,
        prompt: str,
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
        model: str | None = None,
    ) -> Completion:
        """Synchronous core of `complete`; `model` may pick among a problem's records."""
        if not isinstance(prompt, str):
            raise SimulationRequestError("prompt", "must be a string")
        _check_positive("n", n, upper=MAX_N)
        _check_positive("max_tokens", max_tokens)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SimulationRequestError("seed", "must be an integer or null")
        continued = self._continuation(prompt)
        if continued is not None:
            record = self.pool.get(continued.key)
            assert record is not None  # checked by _continuation
            chains = [continued.chain] * n
            start = continued.at
        else:
            record = self.pool[self.record_index(prompt, model=model)]
            chains = self._draw_chains(prompt, seed, n, len(record.samples))
            start = 0
        samples = tuple(_run_chain(record, c, start, max_tokens) for c in chains)
        used = sum(s.completion_tokens or 0 for s in samples)
        return Completion(
            samples=samples, prompt_tokens=record.prompt_tokens + start, completion_tokens=used
        )

    def record_index(self, prompt: str, *, model: str | None = None) -> int:
        """The pool record a fresh (non-continuation) prompt maps to."""
        match = _PROBLEM_LINE.search(prompt)
        if match is not None:
            ref = match.group(1)
            if self.pool.get(ref) is not None:
                return self.pool.index_of(ref)
            candidates = self.pool.indices_for_problem(ref)
            if candidates:
                return self._pick_model(candidates, prompt, model or self.model)
        return int.from_bytes(_digest("record", prompt)[:8], "big") % len(self.pool)

    def _pick_model(self, candidates: tuple[int, ...], prompt: str, model: str | None) -> int:
        for i in candidates:
            if self.pool[i].model == model:
                return i
        return candidates[int.from_bytes(_digest("model", prompt)[:8], "big") % len(candidates)]

    def _continuation(self, prompt: str) -> ChainRef | None:
        match = _MARKER_AT_END.search(prompt)
        if match is None:
            return None
        ref = ChainRef(match["key"], int(match["chain"]), int(match["at"]))
        record = self.pool.get(ref.key)
        if record is None:
            raise SimulationRequestError("prompt", f"continuation of unknown record {ref.key!r}")
        if ref.chain >= len(record.samples) or ref.at > record.samples[ref.chain].tokens:
            raise SimulationRequestError("prompt", f"continuation marker out of range: {ref}")
        return ref

    def _draw_chains(self, prompt: str, seed: int | None, n: int, width: int) -> list[int]:
        if seed is None:
            prompt_id = _digest("prompt", prompt)
            call = self._prompt_calls.get(prompt_id, 0)
            self._prompt_calls[prompt_id] = call + 1
            material = _digest("auto", self.seed, call, prompt)
        else:
            material = _digest("seeded", self.seed, seed, prompt)
        rng = np.random.default_rng(int.from_bytes(material, "big"))
        blocks = -(-n // width)  # distinct chains first, then fresh permutations
        order = np.concatenate([rng.permutation(width) for _ in range(blocks)])
        return [int(c) for c in order[:n]]

    def grade(self, text: str) -> bool:
        """`grade` against whichever record the text's marker names."""
        ref = find_marker(text)
        record = None if ref is None else self.pool.get(ref.key)
        return record is not None and grade(text, record)


def _check_positive(field: str, value: object, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SimulationRequestError(field, "must be an integer >= 1")
    if upper is not None and value > upper:
        raise SimulationRequestError(field, f"must be at most {upper}")


def _run_chain(record: RolloutRecord, chain: int, start: int, max_tokens: int) -> Sample:
    """Generate up to `max_tokens` more tokens of a chain that already produced `start`."""
    recorded = record.samples[chain]
    remaining = recorded.tokens - start
    if remaining > max_tokens:
        text = format_marker(ChainRef(record.key, chain, start + max_tokens))
        return Sample(text=text, finish_reason="length", completion_tokens=max_tokens)
    text = format_marker(ChainRef(record.key, chain, recorded.tokens))
    if recorded.answer is not None:
        text += f"\nFinal answer: \\boxed{{{recorded.answer}}}"
    finish: FinishReason = "stop"
    return Sample(text=text, finish_reason=finish, completion_tokens=remaining)


# --------------------------------------------------------------------------- HTTP server


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


@dataclass(frozen=True, slots=True)
class _Request:
    prompt: str
    n: int
    max_tokens: int
    seed: int | None
    model: str


def _error(status: int, message: str, param: str | None) -> web.Response:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param,
            "code": None,
        }
    }
    return web.json_response(body, status=status)


def _parse_request(body: Any, default_model: str) -> _Request:
    if not isinstance(body, dict):
        raise SimulationRequestError("body", "must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise SimulationRequestError("prompt", "required: a string (or a list of one string)")
    if body.get("stream"):
        raise SimulationRequestError("stream", "streaming is not supported by the simulator")
    n = body.get("n", 1)
    n = 1 if n is None else n
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    _check_positive("n", n, upper=MAX_N)
    _check_positive("max_tokens", max_tokens)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SimulationRequestError("seed", "must be an integer or null")
    model = body.get("model", default_model)
    if not isinstance(model, str):
        raise SimulationRequestError("model", "must be a string")
    return _Request(prompt=prompt, n=n, max_tokens=max_tokens, seed=seed, model=model)


def _completion_body(completion: Completion, model: str, created: int) -> dict[str, Any]:
    choices = [
        {"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": None}
        for i, s in enumerate(completion.samples)
    ]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        },
    }


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

    async def completions(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"request body is not valid JSON: {exc}", "body")
        try:
            req = _parse_request(body, model_name)
            completion = backend.generate(
                req.prompt, n=req.n, max_tokens=req.max_tokens, seed=req.seed, model=req.model
            )
        except SimulationRequestError as exc:
            return _error(400, str(exc), exc.field)
        if slots is not None:
            await slots.generate(completion)
        return web.json_response(_completion_body(completion, req.model, int(clock())))

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
