"""The rollout simulator backend: recorded reasoning chains served like a vLLM pod.

Every prompt maps deterministically to one pool record: a continuation marker at its end names the
record and chain; else a line `problem: <record key or problem id>`; else a blake2b hash of the
prompt. Each of the `n` samples draws one of the record's recorded chains (distinct chains while
there are enough) and follows the truncation rule: a chain of T tokens under `max_tokens` m
finishes (`stop`, T tokens, `\\boxed{answer}`) iff T <= m, else it is cut (`length`, m tokens, no
answer). Generated text carries a marker `<<sim chain=KEY#i at=N>>` (N = chain tokens generated so
far), so a later request whose prompt is the original prompt plus that text continues the same
chain and is charged only for the new tokens, as with vLLM prefix caching.

With vLLM's `thinking_token_budget` t (CLEAR_BUDGET_MODE=thinking), a chain that would think past
t (counting the tokens it generated before this request, as vLLM counts an open think block in
the prompt) has its thinking ended there and answers in `FORCED_ANSWER_TOKENS` more tokens, if
`max_tokens` leaves room for them (else it is cut as above). Its forced answer is the recorded
chain's own answer, graded as recorded, with probability (tokens thought) / (the chain's recorded
length), decided by a seeded draw per chain position; otherwise it answers nothing usable. A
modelling assumption, not a measurement: the recorded pools hold no forced answers, so the rule
only makes a chain's worth grow with the share of its thinking it was allowed. The marker then
reads `<<sim chain=KEY#i at=N forced=hit|miss>>`.

`SimulatedBackend` implements the `CompletionBackend` port in-process;
`daemon.replay.sim_server` serves it as an OpenAI-compatible completions API over HTTP.

May import `daemon.core.ports`, `daemon.replay.rollouts` and numpy; no HTTP, no Kafka.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from clearbudget.daemon.core.ports import Completion, FinishReason, Sample
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord

__all__ = [
    "FORCED_ANSWER_TOKENS",
    "MAX_N",
    "ChainRef",
    "SimulatedBackend",
    "SimulationRequestError",
    "find_marker",
    "format_marker",
    "grade",
    "prompt_for",
]

MAX_N = 1024  # the most samples one request may ask for
FORCED_ANSWER_TOKENS = 32  # what answering after an ended thinking costs a chain

_MARKER = re.compile(
    r"<<sim chain=(?P<key>[^\s#<>]+)#(?P<chain>\d+) at=(?P<at>\d+)"
    r"(?: forced=(?P<forced>hit|miss))?>>"
)
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
    """Position in a recorded chain: record key, chain index, tokens generated so far; `forced`
    when its thinking was ended there: "hit" if it then gave its recorded answer, else "miss"."""

    key: str
    chain: int
    at: int
    forced: Literal["hit", "miss"] | None = None


def format_marker(ref: ChainRef) -> str:
    forced = f" forced={ref.forced}" if ref.forced else ""
    return f"<<sim chain={ref.key}#{ref.chain} at={ref.at}{forced}>>"


def find_marker(text: str) -> ChainRef | None:
    """The last simulator marker in `text`, if any."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return ChainRef(last["key"], int(last["chain"]), int(last["at"]), last["forced"])


def prompt_for(record: RolloutRecord, question: str = "") -> str:
    """A prompt that the simulator maps to `record` (for replays that build their own prompts)."""
    body = question or f"Solve {record.benchmark} problem {record.problem_id}."
    return f"problem: {record.key}\n{body}\n"


def grade(text: str, record: RolloutRecord) -> bool:
    """Whether a generated text is a correct answer to `record`.

    Uses the recorded grade of the chain named by the text's last marker; a chain that has not
    finished (cut at its cap) has no answer and is never correct; one whose thinking was ended
    is graded as recorded if it gave the recorded answer (module docstring).
    """
    ref = find_marker(text)
    if ref is None or ref.key != record.key or ref.chain >= len(record.samples):
        return False
    sample = record.samples[ref.chain]
    if ref.forced is not None:
        return ref.forced == "hit" and sample.correct
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

    def ready(self) -> bool:
        """Always: the simulator has no pods to lose (the port's readiness check)."""
        return True

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
        thinking_token_budget: int | None = None,
    ) -> Completion:
        """The `CompletionBackend` port. Text prompts only: the simulator returns no token ids,
        so callers continue chains by text (prompt + sample text)."""
        if not isinstance(prompt, str):
            raise SimulationRequestError("prompt", "token-id prompts are not supported; send text")
        return self.generate(
            prompt, n=n, max_tokens=max_tokens, seed=seed,
            thinking_token_budget=thinking_token_budget,
        )  # fmt: skip

    def generate(
        self,
        prompt: str,
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
        model: str | None = None,
        thinking_token_budget: int | None = None,
    ) -> Completion:
        """Synchronous core of `complete`; `model` may pick among a problem's records."""
        if not isinstance(prompt, str):
            raise SimulationRequestError("prompt", "must be a string")
        _check_positive("n", n, upper=MAX_N)
        _check_positive("max_tokens", max_tokens)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SimulationRequestError("seed", "must be an integer or null")
        thinking = thinking_token_budget
        if thinking is not None and (isinstance(thinking, bool) or not isinstance(thinking, int)
                                     or thinking < 0):  # fmt: skip
            raise SimulationRequestError("thinking_token_budget", "must be an integer >= 0")
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
        samples = tuple(
            self._run_chain(record, c, start, max_tokens, thinking) for c in chains
        )
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
        if match["forced"]:
            raise SimulationRequestError("prompt", "continuation of a chain that has answered")
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

    def _run_chain(
        self, record: RolloutRecord, chain: int, start: int, max_tokens: int, thinking: int | None
    ) -> Sample:
        """`_run_chain`, or the chain's thinking ended at `thinking` (module docstring)."""
        recorded = record.samples[chain]
        think_left = None if thinking is None else max(thinking - start, 0)
        answer_room = max_tokens - (think_left or 0)
        if (think_left is None or recorded.tokens - start <= think_left
                or answer_room < FORCED_ANSWER_TOKENS):  # fmt: skip
            return _run_chain(record, chain, start, max_tokens)
        at = start + think_left
        draw = int.from_bytes(_digest("forced", self.seed, record.key, chain, at)[:8], "big")
        hit = draw / 2**64 < at / recorded.tokens
        text = format_marker(ChainRef(record.key, chain, at, "hit" if hit else "miss"))
        if hit and recorded.answer is not None:
            text += f"\nFinal answer: \\boxed{{{recorded.answer}}}"
        return Sample(
            text=text, finish_reason="stop", completion_tokens=think_left + FORCED_ANSWER_TOKENS
        )

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
