"""CLEAR_BUDGET_MODE=thinking in the window pipeline: a continuation carries vLLM's
thinking_token_budget (its chain's thinking so far plus its allocation less the answer
allowance), a chain whose thinking was ended answers, and the curves learn it as cut there."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery, WindowPipeline
from clearbudget.daemon.core.policies import AllocationPolicy, ClearPolicy, UniformPolicy
from clearbudget.daemon.core.ports import Completion
from clearbudget.daemon.core.windowing import Window
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import (
    FORCED_ANSWER_TOKENS,
    SimulatedBackend,
    find_marker,
    grade,
    prompt_for,
)
from clearbudget.schemas.messages import QueryRequest, ReasonCode, Status
from clearbudget.solver.fit import ProbePlan

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ANSWER_TOKENS = 100


def record(pid: str, tokens: int) -> RolloutRecord:
    return RolloutRecord(
        model="m", benchmark="b", problem_id=pid, prompt_tokens=10, gold="7",
        samples=(RolloutSample(tokens=tokens, correct=True, answer="7"),) * 4,
    )  # fmt: skip


POOL = RolloutPool([record("easy", 100), record("mid", 600), record("hard", 5000)])


@dataclass
class Recording:
    """The simulator, remembering each request's max_tokens and thinking_token_budget."""

    inner: SimulatedBackend
    requests: list[tuple[str, int, int | None]] = field(default_factory=list)

    async def complete(self, prompt: str | Sequence[int], **request: Any) -> Completion:
        self.requests.append(
            (str(prompt), request["max_tokens"], request.get("thinking_token_budget"))
        )
        return await self.inner.complete(prompt, **request)

    def ready(self) -> bool:
        return True


class Remembering(UniformPolicy):
    """The uniform policy, remembering what it was told about each chain."""

    def __init__(self, cap: int) -> None:
        super().__init__(cap=cap)
        self.seen: list[tuple[int, bool]] = []

    def observe(self, request: QueryRequest, tokens: int, **outcome: object) -> None:
        self.seen.append((tokens, bool(outcome["finished"])))
        super().observe(request, tokens, **outcome)  # type: ignore[arg-type]


def window(*pids: str) -> Window[PendingQuery]:
    items = tuple(
        PendingQuery(QueryRequest(id=f"q-{pid}", prompt=prompt_for(POOL.get(f"m/{pid}"))), 0.0)
        for pid in pids
    )
    return Window("w-1", 0.0, 2.0, items)


def pipeline(policy: AllocationPolicy, backend: Recording, *, thinking: bool) -> WindowPipeline:
    return WindowPipeline(
        backend, policy, PipelineMetrics.create(CollectorRegistry()),
        max_tokens_per_query=1 << 16, wall_clock=lambda: NOW,
        thinking_answer_tokens=ANSWER_TOKENS if thinking else None,
    )  # fmt: skip


async def test_a_chain_past_its_thinking_budget_answers_within_its_allocation() -> None:
    backend = Recording(SimulatedBackend(POOL, seed=1))
    policy = Remembering(cap=700)
    outcome = await pipeline(policy, backend, thinking=True).run(
        window("easy", "mid", "hard"), 1e9
    )
    by_id = {r.id: r for r in outcome.results}
    assert {(max_tokens, thinking) for _, max_tokens, thinking in backend.requests} == {
        (700, 700 - ANSWER_TOKENS)
    }
    easy, mid, hard = by_id["q-easy"], by_id["q-mid"], by_id["q-hard"]
    # Chains that end within their thinking budget finish as in max_tokens mode.
    assert (easy.reason_code, easy.tokens_used) == (ReasonCode.CHAIN_FINISHED, 100)
    assert (mid.reason_code, mid.tokens_used) == (ReasonCode.CHAIN_FINISHED, 600)
    # The long one is ended at 600 thinking tokens and answers: answered, never over its cap.
    assert hard.status is Status.ANSWERED
    assert hard.reason_code is ReasonCode.THINKING_ENDED
    assert hard.tokens_used == 600 + FORCED_ANSWER_TOKENS <= hard.allocated_tokens == 700
    assert "ran past its thinking budget of 600 tokens" in (hard.reason or "")
    assert grade(hard.text or "", POOL.get("m/hard")) == (hard.answer == "7")
    # What the curves learn: finished chains as finished; the ended one as cut at 600.
    assert sorted(policy.seen) == [(100, True), (600, False), (600, True)]


async def test_max_tokens_mode_sends_no_thinking_budget() -> None:
    backend = Recording(SimulatedBackend(POOL, seed=1))
    outcome = await pipeline(UniformPolicy(cap=700), backend, thinking=False).run(
        window("hard"), 1e9
    )
    assert [thinking for *_, thinking in backend.requests] == [None]
    (hard,) = outcome.results
    assert (hard.status, hard.reason_code) == (Status.ABANDONED, ReasonCode.CUT_AT_ALLOCATION)


async def test_a_continued_probe_counts_its_thinking_so_far() -> None:
    backend = Recording(SimulatedBackend(POOL, seed=1))
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    outcome = await pipeline(policy, backend, thinking=True).run(window("mid", "hard"), 4000.0)
    continuations = [(p, m, t) for p, m, t in backend.requests if find_marker(p) is not None]
    assert continuations, "no probe was continued"
    for prompt, max_tokens, thinking in continuations:
        marker = find_marker(prompt)
        assert marker is not None
        assert thinking == marker.at + max(max_tokens - ANSWER_TOKENS, 0)
    probes = [t for p, _, t in backend.requests if find_marker(p) is None]
    assert probes == [None, None], "probes run plain: they measure where chains end"
    assert outcome.report.spent_tokens <= 4000
