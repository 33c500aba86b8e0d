"""The window pipeline on the recorded-rollout simulator: statuses, token accounting, policies."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery, WindowPipeline
from clearbudget.daemon.core.policies import (
    AllocationPolicy,
    ClearPolicy,
    Decision,
    OraclePolicy,
    ProbeSelection,
    QueryView,
    UniformPolicy,
)
from clearbudget.daemon.core.ports import BackendError, Completion, CompletionBackend
from clearbudget.daemon.core.windowing import Window
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, grade, prompt_for
from clearbudget.schemas.messages import Curve, QueryRequest, ReasonCode, Status
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.rounding import equal_shares, equal_shares_within
from tests.support.backends import SlowBackend

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def record(pid: str, chains: list[tuple[int, bool]]) -> RolloutRecord:
    samples = tuple(RolloutSample(tokens=t, correct=c, answer="7" if c else "3") for t, c in chains)
    return RolloutRecord(
        model="m", benchmark="b", problem_id=pid, prompt_tokens=10, gold="7", samples=samples
    )


# Every chain of a record has the same length, so outcomes do not depend on which is drawn.
POOL = RolloutPool(
    [
        record("easy", [(100, True)] * 4),
        record("mid", [(600, True)] * 4),
        record("hard", [(5000, True)] * 4),
        record("wrong", [(300, False)] * 4),
    ]
)


def window(*pids: str, deadline: datetime | None = None) -> Window[PendingQuery]:
    items = tuple(
        PendingQuery(
            QueryRequest(
                id=f"q-{pid}-{i}", prompt=prompt_for(POOL.get(f"m/{pid}")), deadline=deadline
            ),
            arrived_at=0.0,
        )
        for i, pid in enumerate(pids)
    )
    return Window("w-1", 0.0, 2.0, items)


def pipeline(
    policy: AllocationPolicy,
    backend: CompletionBackend | None = None,
    registry: CollectorRegistry | None = None,
) -> WindowPipeline:
    return WindowPipeline(
        backend or SimulatedBackend(POOL, seed=1),
        policy,
        PipelineMetrics.create(registry or CollectorRegistry()),
        max_tokens_per_query=1 << 16,
        wall_clock=lambda: NOW,
    )


async def test_uniform_cap_answers_short_chains_and_counts_every_token() -> None:
    outcome = await pipeline(UniformPolicy(cap=700)).run(window("easy", "mid", "hard"), 1e9)
    by_id = {r.id: r for r in outcome.results}
    assert [r.status for r in outcome.results] == [
        Status.ANSWERED, Status.ANSWERED, Status.ABANDONED
    ]  # fmt: skip
    assert [r.tokens_used for r in outcome.results] == [100, 600, 700]
    assert by_id["q-easy-0"].answer == "7"
    assert grade(by_id["q-mid-1"].text or "", POOL.get("m/mid"))
    assert outcome.report.spent_tokens == 1400
    assert outcome.report.probe_tokens == 0
    assert outcome.report.counts.answered == 2


async def test_oracle_caps_per_query() -> None:
    policy = OraclePolicy({"q-easy-0": 100, "q-hard-1": 0})
    outcome = await pipeline(policy).run(window("easy", "hard"), 1e9)
    assert [r.status for r in outcome.results] == [Status.ANSWERED, Status.ABANDONED]
    assert [r.tokens_used for r in outcome.results] == [100, 0]


async def test_clear_probes_continue_the_same_chain_and_stay_within_budget() -> None:
    registry = CollectorRegistry()
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    budget = 2000.0
    outcome = await pipeline(policy, registry=registry).run(
        window("easy", "mid", "hard", "wrong"), budget
    )
    by_id = {r.id: r for r in outcome.results}
    easy, mid = by_id["q-easy-0"], by_id["q-mid-1"]
    assert easy.status is Status.ANSWERED  # finished inside its probe
    assert (easy.tokens_used, easy.tokens_probe) == (100, 100)
    assert mid.tokens_probe == 256
    if mid.status is Status.ANSWERED:  # continued from token 256, not restarted
        assert mid.tokens_used == 600
    assert by_id["q-hard-2"].tokens_used <= budget
    assert outcome.report.spent_tokens <= budget
    # Probes go only to queries the priors would fund; each costs its length or 256.
    probes = [r.tokens_probe for r in outcome.results]
    assert outcome.report.probe_tokens == sum(probes)
    assert set(probes) <= {0, 100, 256}
    assert probes[0] == 100
    assert len(outcome.results) == 4
    probe_metric = registry.get_sample_value("clear_tokens_total", {"phase": "probe"})
    assert probe_metric == outcome.report.probe_tokens


async def test_zero_budget_abandons_unprobed_with_the_price() -> None:
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    outcome = await pipeline(policy).run(window("mid", "hard"), 0.0)
    assert {r.status for r in outcome.results} == {Status.ABANDONED}
    assert all(r.shadow_price is not None for r in outcome.results)
    assert all("insolvent" in (r.reason or "") for r in outcome.results)
    assert not any("backlog" in (r.reason or "") for r in outcome.results)
    assert all(r.tokens_used == 0 for r in outcome.results)


async def test_a_query_priced_out_in_a_backlog_says_so() -> None:
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    outcome = await pipeline(policy).run(window("mid", "hard"), 0.0, waiting=5000)
    assert all("backlog: 5000 queries waiting" in (r.reason or "") for r in outcome.results)


async def test_past_deadline_expires_without_spending() -> None:
    outcome = await pipeline(UniformPolicy(cap=700)).run(
        window("easy", deadline=NOW - timedelta(seconds=1)), 1e9
    )
    (result,) = outcome.results
    assert result.status is Status.EXPIRED
    assert result.tokens_used == 0


class FailingBackend:
    """A backend whose every request fails after retries (error-path double); each failure
    reports `discarded` tokens generated by attempts whose answers were unusable."""

    def __init__(self, discarded: int = 0) -> None:
        self.discarded = discarded

    async def complete(self, prompt: object, **request: Any) -> Completion:
        raise BackendError("all endpoints down", discarded_tokens=self.discarded)

    def ready(self) -> bool:
        return True


@pytest.mark.parametrize(
    "policy", [UniformPolicy(cap=500), ClearPolicy(ProbePlan(1, 256))]
)
async def test_backend_failure_ends_in_failed_with_reason(policy: AllocationPolicy) -> None:
    registry = CollectorRegistry()
    outcome = await pipeline(policy, FailingBackend(), registry).run(window("easy", "mid"), 1e6)
    assert [r.status for r in outcome.results] == [Status.FAILED, Status.FAILED]
    assert all("all endpoints down" in (r.reason or "") for r in outcome.results)
    assert registry.get_sample_value("clear_queries_total", {"status": "failed"}) == 2


async def test_a_failed_query_is_charged_what_its_attempts_generated() -> None:
    policy = ClearPolicy(ProbePlan(1, 256))
    outcome = await pipeline(policy, FailingBackend(discarded=77)).run(window("easy"), 1e6)
    (result,) = outcome.results
    assert (result.status, result.tokens_used, result.tokens_probe) == (Status.FAILED, 77, 77)
    assert outcome.report.spent_tokens == 77


async def test_max_tokens_below_the_probe_ends_in_the_probe() -> None:
    """Found by the broker fuzz test: a query capped under the probe length must not break the
    window; its probe is cut at its own cap and nothing is left to dispatch."""
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    mid, easy = prompt_for(POOL.get("m/mid")), prompt_for(POOL.get("m/easy"))
    items = (
        PendingQuery(QueryRequest(id="tiny", prompt=mid, max_tokens=2), 0.0),
        PendingQuery(QueryRequest(id="short", prompt=easy, max_tokens=150), 0.0),
    )
    outcome = await pipeline(policy).run(Window("w-2", 0.0, 2.0, items), 1e6)
    tiny, short = outcome.results
    assert tiny.status is Status.ABANDONED
    assert tiny.tokens_used == 2
    assert "max_tokens" in (tiny.reason or "")
    assert short.status is Status.ANSWERED
    assert short.tokens_used == 100


async def test_several_probe_samples_together_stay_within_max_tokens() -> None:
    policy = ClearPolicy(ProbePlan(samples=2, tokens=256))
    mid = prompt_for(POOL.get("m/mid"))
    items = (PendingQuery(QueryRequest(id="capped", prompt=mid, max_tokens=300), 0.0),)
    outcome = await pipeline(policy).run(Window("w-3", 0.0, 2.0, items), 1e6)
    (result,) = outcome.results
    assert 0 < result.tokens_probe <= result.tokens_used <= 300


async def test_a_probe_cut_by_the_querys_own_cap_ends_the_query_in_the_probe() -> None:
    """Found by hypothesis: 2 samples within max_tokens=3 run 1 token each; the fit must not
    read them as censored 16-token probes."""
    policy = ClearPolicy(ProbePlan(samples=2, tokens=16))
    mid = prompt_for(POOL.get("m/mid"))
    items = (PendingQuery(QueryRequest(id="tiny", prompt=mid, max_tokens=3), 0.0),)
    outcome = await pipeline(policy).run(Window("w-4", 0.0, 2.0, items), 32.0)
    (result,) = outcome.results
    assert result.tokens_used <= 3
    assert result.status is Status.ABANDONED


class ContinueCensored:
    """Continue the censored probe chain with a fixed budget; fall back on the finished one."""

    name = "continue-censored"

    def __init__(self, tokens: int) -> None:
        self._tokens = tokens

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        return ProbeSelection.everyone(ProbePlan(samples=2, tokens=256), len(requests))

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        chains = tuple(next(i for i, o in enumerate(q.outcomes) if not o.finished) for q in queries)
        answers = tuple(next(o.answer for o in q.outcomes if o.finished) for q in queries)
        tokens = np.full(len(queries), self._tokens, np.int64)
        return Decision(tokens, (None,) * len(queries), chains, answers, 0.1, "test")

    def observe(self, request: QueryRequest, chain_tokens: int, *, finished: bool,
                answered: bool, answer: str | None = None) -> None:  # fmt: skip
        pass


MIXED = RolloutPool([record("mixed", [(100, True), (5000, False)])])


async def test_dispatch_continues_the_chosen_chain_and_falls_back_on_the_probes_answer() -> None:
    request = QueryRequest(id="q-mixed", prompt=prompt_for(MIXED.get("m/mixed")))
    items = (PendingQuery(request, arrived_at=0.0),)
    backend = SimulatedBackend(MIXED, seed=1)
    short = await pipeline(ContinueCensored(50), backend).run(Window("w-1", 0, 2, items), 1e6)
    (result,) = short.results
    assert result.status is Status.ANSWERED  # the continued chain did not finish: fallback
    assert result.answer == "7"
    assert grade(result.text or "", MIXED.get("m/mixed"))
    assert (result.tokens_probe, result.tokens_used) == (356, 406)  # 100 + 256, then +50
    long = await pipeline(ContinueCensored(5000), backend).run(Window("w-2", 0, 2, items), 1e6)
    (result,) = long.results
    assert result.status is Status.ANSWERED
    assert result.answer == "3"  # the continued chain finished with its own (wrong) answer
    assert result.tokens_used == 100 + 5000  # continued from 256, not restarted


@pytest.mark.parametrize("budget", [0.0, 12.0, 32.0, 255.0, 300.0, 700.0])
async def test_probes_never_cost_more_than_the_window_budget(budget: float) -> None:
    policy = ClearPolicy(ProbePlan(samples=1, tokens=256))
    outcome = await pipeline(policy).run(window("mid", "hard", "mid", "hard"), budget)
    assert outcome.report.probe_tokens <= budget
    assert outcome.report.spent_tokens <= budget


class OneBadResponse:
    """The simulator, except that one query's responses claim too many tokens or chains."""

    def __init__(self, bad_prompt_marker: str, how: str) -> None:
        self._inner = SimulatedBackend(POOL, seed=1)
        self._marker = bad_prompt_marker
        self._how = how

    async def complete(self, prompt: object, **request: Any) -> Completion:
        completion = await self._inner.complete(prompt, **request)  # type: ignore[arg-type]
        if self._marker not in str(prompt):
            return completion
        if self._how == "usage":
            too_many = 10 * request["n"] * request["max_tokens"]
            return Completion(completion.samples, completion.prompt_tokens, too_many)
        return Completion(completion.samples * 2, completion.prompt_tokens, 0)

    def ready(self) -> bool:
        return True


@pytest.mark.parametrize("how", ["usage", "chains"])
@pytest.mark.parametrize(
    "policy", [UniformPolicy(cap=700), ClearPolicy(ProbePlan(1, 256))]
)
async def test_one_malformed_response_fails_its_query_not_the_window(
    how: str, policy: AllocationPolicy
) -> None:
    backend = OneBadResponse("problem: m/mid", how)
    outcome = await pipeline(policy, backend).run(window("easy", "mid", "easy"), 1e6)
    statuses = {r.id: r.status for r in outcome.results}
    assert statuses == {"q-easy-0": Status.ANSWERED, "q-mid-1": Status.FAILED,
                        "q-easy-2": Status.ANSWERED}  # fmt: skip
    bad = next(r for r in outcome.results if r.id == "q-mid-1")
    assert "the backend" in (bad.reason or "")
    assert bad.tokens_used <= 700  # charged at most what the request allowed


@pytest.mark.parametrize(
    "policy", [UniformPolicy(cap=700), ClearPolicy(ProbePlan(1, 256))]
)
async def test_a_deadline_passing_mid_request_expires_the_query(policy: AllocationPolicy) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=0.2)
    backend = SlowBackend(SimulatedBackend(POOL, seed=1), delay_s=5.0)
    metrics = PipelineMetrics.create(CollectorRegistry())
    slow = WindowPipeline(backend, policy, metrics, max_tokens_per_query=1 << 16)
    started = asyncio.get_running_loop().time()
    outcome = await slow.run(window("easy", "mid", deadline=deadline), 1e6)
    assert asyncio.get_running_loop().time() - started < 2.0  # did not wait for the pod
    assert {r.status for r in outcome.results} == {Status.EXPIRED}
    assert all("during" in (r.reason or "") for r in outcome.results)


async def test_an_early_answer_keeps_the_text_of_a_probe_that_gave_it() -> None:
    # Two finished probes say "7.0": the fit's consensus is the normalised "7".
    sample = RolloutSample(tokens=100, correct=True, answer="7.0")
    pool = RolloutPool([RolloutRecord("m", "b", "p", 10, "7", (sample, sample))])
    request = QueryRequest(id="q", prompt=prompt_for(pool.records[0]))
    clear = ClearPolicy(ProbePlan(samples=2, tokens=256))
    outcome = await pipeline(clear, SimulatedBackend(pool, seed=1)).run(
        Window("w-1", 0.0, 2.0, (PendingQuery(request, arrived_at=0.0),)), 1e6
    )
    (result,) = outcome.results
    assert (result.status, result.answer) == (Status.ANSWERED, "7")
    assert "7.0" in (result.text or "")


async def test_a_continued_querys_other_probe_samples_teach_the_model_too() -> None:
    seen: list[tuple[int, bool]] = []

    class Watching(ClearPolicy):
        def observe(self, request: QueryRequest, chain_tokens: int, **outcome: object) -> None:
            seen.append((chain_tokens, bool(outcome["finished"])))
            super().observe(request, chain_tokens, **outcome)  # type: ignore[arg-type]

    pool = RolloutPool([record("two", [(100, True), (600, True)])])
    items = (PendingQuery(QueryRequest(id="q", prompt=prompt_for(pool.get("m/two"))), 0.0),)
    policy = Watching(ProbePlan(samples=2, tokens=256))
    backend = SimulatedBackend(pool, seed=1)
    registry = CollectorRegistry()
    outcome = await WindowPipeline(
        backend, policy, PipelineMetrics.create(registry), max_tokens_per_query=1 << 16,
        wall_clock=lambda: NOW,
    ).run(Window("w-1", 0.0, 2.0, items), 1e6)  # fmt: skip
    (result,) = outcome.results
    assert result.tokens_used == 100 + 600  # the finished sample, and the other continued
    # Both chains are learned: the finished sibling at 100, the continued one where it ended.
    assert sorted(seen) == [(100, True), (600, True)]


class RecyclingCaps(UniformPolicy):
    """Fixed caps priced at `price` on one curve for all, with the window's leftover offered to
    cut chains (as clear's decisions do) valued on a memoryless curve: a running chain ends
    within e more tokens with an answer with chance 0.9·(1 − e^(−e/1000)), however long it
    ran. Remembers what it was told of each chain and what the value was asked of."""

    def __init__(self, cap: int, price: float = 0.0, probe: ProbePlan | None = None) -> None:
        """`probe`: probe every query so, and continue its first censored sample, falling
        back on its first finished one's answer."""
        super().__init__(cap=cap)
        self.price = price
        self.probe = probe
        self.seen: list[tuple[int, bool]] = []
        self.asked: list[tuple[int | str, ...]] = []
        self.seen_when_asked: list[tuple[int, bool]] = []

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        if self.probe is None:
            return super().probe_plan(requests, budget)
        return ProbeSelection.everyone(self.probe, len(requests))

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        curves = tuple(Curve(A=0.9, tau=0.0, beta=1e-3) for _ in queries)
        decision = super().decide(queries, budget)
        if self.probe is not None:
            censored = [next(j for j, o in enumerate(q.outcomes) if not o.finished)
                        for q in queries]  # fmt: skip
            answers = [next((o.answer for o in q.outcomes if o.finished), None) for q in queries]
            decision = replace(decision, continue_from=tuple(censored),
                               fallback_answer=tuple(answers))  # fmt: skip
        return replace(decision, continuation=self.gain, curves=curves, shadow_price=self.price)

    def gain(
        self,
        request: QueryRequest,
        outcomes: Sequence[ProbeOutcome],
        continued: int,
        chain_tokens: int,
        extras: Sequence[int],
    ) -> list[float]:
        self.asked.append((request.id, continued, chain_tokens, *extras))
        self.seen_when_asked = list(self.seen)
        return [0.9 * -math.expm1(-extra / 1000) for extra in extras]

    def observe(self, request: QueryRequest, chain_tokens: int, **outcome: object) -> None:
        self.seen.append((chain_tokens, bool(outcome["finished"])))


RECYCLED = RolloutPool([record("early", [(100, True)] * 2), record("late", [(1500, True)] * 2),
                        record("never", [(9000, True)] * 2)])  # fmt: skip


def recycled_window(*pids: str, deadline: datetime | None = None) -> Window[PendingQuery]:
    requests = [
        QueryRequest(id=pid, prompt=prompt_for(RECYCLED.get(f"m/{pid}")), deadline=deadline)
        for pid in pids
    ]
    items = tuple(PendingQuery(request, 0.0) for request in requests)
    return Window("w-1", 0.0, 2.0, items)


async def test_what_early_finishers_leave_goes_to_the_chains_cut_at_their_allocation() -> None:
    policy = RecyclingCaps(cap=1000)
    backend = SimulatedBackend(RECYCLED, seed=1)
    outcome = await pipeline(policy, backend).run(recycled_window("early", "late"), 2000.0)
    early, late = outcome.results
    assert (early.status, early.tokens_used) == (Status.ANSWERED, 100)
    # 900 left by the early one: the late chain, cut at 1,000, gets it and finishes at 1,500.
    assert (late.status, late.reason_code, late.tokens_used) == (
        Status.ANSWERED, ReasonCode.CHAIN_FINISHED, 1500
    )  # fmt: skip
    assert late.allocated_tokens == 1900
    assert outcome.report.spent_tokens == 1600 <= 2000
    assert sorted(policy.seen) == [(100, True), (1500, True)]  # the late chain learned once


async def test_a_chain_that_still_does_not_finish_is_cut_within_the_window_budget() -> None:
    policy = RecyclingCaps(cap=1000)
    backend = SimulatedBackend(RECYCLED, seed=1)
    outcome = await pipeline(policy, backend).run(recycled_window("early", "never"), 2000.0)
    _, never = outcome.results
    assert (never.status, never.reason_code) == (Status.ABANDONED, ReasonCode.CUT_AT_ALLOCATION)
    assert never.tokens_used == 1900  # its 1,000 and the 900 left
    assert outcome.report.spent_tokens == 2000  # the whole window budget, never more
    assert sorted(policy.seen) == [(100, True), (1900, False)]
    plain = await pipeline(UniformPolicy(cap=1000), backend).run(
        recycled_window("early", "never"), 2000.0
    )
    assert [r.tokens_used for r in plain.results] == [100, 1000]  # the baselines keep caps


async def test_leftover_goes_only_where_it_returns_the_windows_price() -> None:
    # 900 more tokens for a running chain return 0.9·(1 − e^(−0.9)) / 900, about 6e-4 per
    # token: worth it at a price of 1e-4, not at 1e-3 (then they carry over).
    backend = SimulatedBackend(RECYCLED, seed=1)
    policy = RecyclingCaps(1000, price=1e-4)
    cheap = await pipeline(policy, backend).run(recycled_window("early", "late"), 2000.0)
    assert policy.asked == [("late", -1, 1000, 0, 900)]  # valued as the chain stands
    dear = await pipeline(RecyclingCaps(1000, price=1e-3), backend).run(
        recycled_window("early", "late"), 2000.0
    )
    assert [r.tokens_used for r in cheap.results] == [100, 1500]
    assert [r.tokens_used for r in dear.results] == [100, 1000]


class SlowAfter:
    """The simulator, answering its first `fast` requests at once and the rest after 5 s."""

    def __init__(self, inner: SimulatedBackend, fast: int) -> None:
        self._inner, self._fast = inner, fast

    async def complete(self, prompt: object, **request: Any) -> Completion:
        self._fast -= 1
        if self._fast < 0:
            await asyncio.sleep(5.0)
        return await self._inner.complete(prompt, **request)  # type: ignore[arg-type]

    def ready(self) -> bool:
        return True


async def test_a_deadline_passing_during_a_cut_chains_extra_request_expires_it() -> None:
    policy = RecyclingCaps(cap=1000)
    backend = SlowAfter(SimulatedBackend(RECYCLED, seed=1), fast=2)  # the two dispatches
    deadline = datetime.now(UTC) + timedelta(seconds=0.3)
    pipe = WindowPipeline(backend, policy, PipelineMetrics.create(CollectorRegistry()),
                          max_tokens_per_query=1 << 16)  # fmt: skip
    outcome = await pipe.run(recycled_window("early", "late", deadline=deadline), 2000.0)
    early, late = outcome.results
    assert (early.status, early.tokens_used) == (Status.ANSWERED, 100)
    assert (late.status, late.reason_code) == (Status.EXPIRED, ReasonCode.DEADLINE)
    assert "deadline passed during dispatch" in (late.reason or "")
    assert sorted(policy.seen) == [(100, True), (1000, False)]  # learned as far as it is known


async def test_a_cut_chain_whose_deadline_passes_keeps_the_answer_its_probes_gave() -> None:
    policy = RecyclingCaps(cap=1000, probe=ProbePlan(2, 64))
    backend = SlowAfter(SimulatedBackend(PROBED, seed=1), fast=4)  # two probes, two dispatches
    deadline = datetime.now(UTC) + timedelta(seconds=0.3)
    pipe = WindowPipeline(backend, policy, PipelineMetrics.create(CollectorRegistry()),
                          max_tokens_per_query=1 << 16)  # fmt: skip
    _, mixed = (await pipe.run(probed_window(deadline), 4000.0)).results
    assert (mixed.status, mixed.reason_code, mixed.answer) == (
        Status.ANSWERED, ReasonCode.CUT_WITH_PROBE_ANSWER, "7"
    )  # fmt: skip


@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=20),
    st.floats(0, 200_000, allow_nan=False),
)
def test_equal_shares_never_give_out_more_than_there_is(rooms: list[int], total: float) -> None:
    room = np.array(rooms, np.float64)
    shares = equal_shares(room, total)
    assert (shares >= 0).all()
    assert (shares <= room).all()
    assert shares.sum() <= total
    if shares.sum() < int(total):  # short only because every room is full
        assert (shares == room).all()
    # As equal as the rooms allow: a share below another's is at its room.
    low = shares < shares.max(initial=0) - 1
    assert (shares[low] == room[low]).all()


async def test_leftover_the_carry_cannot_keep_goes_to_cut_chains_whatever_the_price() -> None:
    backend = SimulatedBackend(RECYCLED, seed=1)
    full_carry = await pipeline(RecyclingCaps(1000, price=1e-3), backend).run(
        recycled_window("early", "late"), 2000.0, carry_room=lambda: 0.0
    )
    assert [r.tokens_used for r in full_carry.results] == [100, 1500]  # lost otherwise
    some_room = await pipeline(RecyclingCaps(1000, price=1e-3), backend).run(
        recycled_window("early", "never"), 2000.0, carry_room=lambda: 500.0
    )
    # 900 left, 500 of them the carry keeps: the 400 it cannot go to the cut chain.
    assert [r.tokens_used for r in some_room.results] == [100, 1400]


async def test_a_share_on_top_of_what_the_carry_cannot_keep_is_valued_on_top_of_it() -> None:
    # 400 go to the cut chain whatever they return; the other 500 only if they add the price
    # to the chance of its request (900 tokens) over the chance of its first 400: at 1e-4
    # 0.9·(e^(−0.4) − e^(−0.9)) / 500, about 5.9e-4 per token, is worth it, at 1e-3 it is not.
    backend = SimulatedBackend(RECYCLED, seed=1)
    for price, used in ((1e-4, 1900), (1e-3, 1400)):
        policy = RecyclingCaps(1000, price=price)
        outcome = await pipeline(policy, backend).run(
            recycled_window("early", "never"), 2000.0, carry_room=lambda: 500.0
        )
        assert [r.tokens_used for r in outcome.results] == [100, used]
        assert [asked[2:] for asked in policy.asked] == [(1000, 400, 900)]


async def test_what_a_tag_row_has_left_goes_only_to_its_own_cut_chains() -> None:
    # Rows: a 2,000 (its early finisher leaves 900 of them), b 1,000 (all dispatched).
    class Tagged(RecyclingCaps):
        def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
            groups = tuple(q.request.id.split("-")[0] for q in queries)
            return replace(super().decide(queries, budget), groups=groups,
                           tag_budgets={"a": 2000.0, "b": 1000.0})  # fmt: skip

    pids = {"a-early": "early", "a-late": "late", "b-late": "late"}
    requests = [QueryRequest(id=qid, prompt=prompt_for(RECYCLED.get(f"m/{pid}")))
                for qid, pid in pids.items()]  # fmt: skip
    window = Window("w-1", 0.0, 2.0, tuple(PendingQuery(r, 0.0) for r in requests))
    outcome = await pipeline(Tagged(cap=1000), SimulatedBackend(RECYCLED, seed=1)).run(
        window, 3000.0
    )
    early, a_late, b_late = outcome.results
    assert (early.tokens_used, a_late.tokens_used, b_late.tokens_used) == (100, 1500, 1000)
    assert a_late.reason_code == ReasonCode.CHAIN_FINISHED  # a's 900, not split with b


PROBED = RolloutPool([record("early", [(100, True)] * 2),
                     record("mixed", [(40, True), (1500, True)])])  # fmt: skip


def probed_window(deadline: datetime | None = None) -> Window[PendingQuery]:
    requests = [
        QueryRequest(id=pid, prompt=prompt_for(PROBED.get(f"m/{pid}")), deadline=deadline)
        for pid in ("early", "mixed")
    ]
    return Window("w-1", 0.0, 2.0, tuple(PendingQuery(r, 0.0) for r in requests))


async def test_a_cut_chain_is_valued_with_its_probe_samples_and_at_its_whole_length() -> None:
    policy = RecyclingCaps(cap=1000, probe=ProbePlan(2, 64))
    outcome = await pipeline(policy, SimulatedBackend(PROBED, seed=1)).run(probed_window(), 4000.0)
    _, mixed = outcome.results
    (asked,) = policy.asked
    assert asked[0] == "mixed"
    assert asked[2] == 64 + 1000  # the probe's tokens and its allocation
    assert mixed.reason_code == ReasonCode.CHAIN_FINISHED
    # Every chain is learned once: the chains continued where they ended, the other probe
    # samples (the finished 40 and the early one's censored 64) after the chains they were
    # valued beside.
    assert sorted(policy.seen) == [(40, True), (64, False), (100, True), (1500, True)]
    assert (40, True) not in policy.seen_when_asked


class Retrying:
    """The simulator behind a pod whose every answer came after a garbled attempt of 40."""

    def __init__(self, inner: SimulatedBackend) -> None:
        self._inner = inner

    async def complete(self, prompt: object, **request: Any) -> Completion:
        completion = await self._inner.complete(prompt, **request)  # type: ignore[arg-type]
        return replace(completion, discarded_tokens=40)

    def ready(self) -> bool:
        return True


async def test_tokens_of_retried_attempts_are_charged_but_never_learned_as_chain_length() -> None:
    policy = RecyclingCaps(cap=1000)
    backend = Retrying(SimulatedBackend(RECYCLED, seed=1))
    outcome = await pipeline(policy, backend).run(recycled_window("early", "late"), 2000.0)
    early, late = outcome.results
    assert early.tokens_used == 100 + 40
    assert late.tokens_used == 1500 + 2 * 40  # two requests, each after a garbled attempt
    assert sorted(policy.seen) == [(100, True), (1500, True)]  # the chains' own lengths


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.sampled_from("abc")), min_size=1, max_size=12),
    st.floats(0, 40_000, allow_nan=False),
    st.dictionaries(st.sampled_from("ab"), st.floats(-100, 20_000, allow_nan=False)),
)
def test_shares_within_rows_keep_every_row_and_the_total(
    rooms: list[tuple[int, str]], total: float, limits: dict[str, float]
) -> None:
    room = np.array([r for r, _ in rooms], np.float64)
    groups = [g for _, g in rooms]
    shares = equal_shares_within(room, total, groups, limits)
    assert (shares >= 0).all()
    assert (shares <= room).all()
    assert shares.sum() <= total
    for group, limit in limits.items():
        mine = np.array([g == group for g in groups])
        assert shares[mine].sum() <= max(limit, 0.0)


async def test_a_solver_fallback_is_logged_with_its_reason_and_counted() -> None:
    from structlog.testing import capture_logs

    class FellBack(UniformPolicy):
        def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
            return replace(super().decide(queries, budget), fallbacks=1,
                           fallback_reason="CLARABEL: optimal_inaccurate")  # fmt: skip

    registry = CollectorRegistry()
    pipe = WindowPipeline(SimulatedBackend(POOL, seed=1), FellBack(cap=500),
                          PipelineMetrics.create(registry), max_tokens_per_query=1 << 16,
                          wall_clock=lambda: NOW)  # fmt: skip
    with capture_logs() as logs:
        await pipe.run(window("easy"), 1e6)
    (warning,) = [e for e in logs if e["event"] == "solver_fallback"]
    assert (warning["window_id"], warning["reason"]) == ("w-1", "CLARABEL: optimal_inaccurate")
    assert registry.get_sample_value("clear_solver_fallbacks_total") == 1
