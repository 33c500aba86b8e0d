"""Results that explain themselves: a reason code for every way a query ends, the curve the
allocator priced it on with its expected accuracy, and token fields that add up (tokens_used =
tokens_probe + continuation), checked path by path and over random windows on the simulator."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import (
    HANDOVER_REASON,
    SHUTDOWN_REASON,
    PendingQuery,
    WindowPipeline,
    unserved_results,
)
from clearbudget.daemon.core.policies import (
    AllocationPolicy,
    ClearPolicy,
    Decision,
    OraclePolicy,
    ProbeSelection,
    QueryView,
    UniformPolicy,
)
from clearbudget.daemon.core.ports import Completion, CompletionBackend
from clearbudget.daemon.core.windowing import Window
from clearbudget.daemon.replay.rollouts import RolloutPool, RolloutRecord, RolloutSample
from clearbudget.daemon.replay.simulator import SimulatedBackend, prompt_for
from clearbudget.schemas.messages import Curve, QueryRequest, QueryResult, ReasonCode, Status
from clearbudget.solver.fit import ProbePlan
from tests.core.test_pipeline import FailingBackend, OneBadResponse

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MAX_TOKENS = 1 << 16
PLAN = ProbePlan(samples=1, tokens=256)
NO_PROBE = ProbePlan(samples=0, tokens=0)


def record(pid: str, chains: Sequence[tuple[int, bool]]) -> RolloutRecord:
    samples = tuple(RolloutSample(tokens=t, correct=c, answer="7" if c else "3") for t, c in chains)
    return RolloutRecord(
        model="m", benchmark="b", problem_id=pid, prompt_tokens=10, gold="7", samples=samples
    )


POOL = RolloutPool(
    [
        record("easy", [(100, True)] * 4),
        record("mid", [(600, True)] * 4),
        record("hard", [(5000, True)] * 4),
    ]
)
QUERY_LINE = re.compile(r"^query (\S+)$", re.MULTILINE)


def request(pid: str, qid: str, pool: RolloutPool = POOL, **fields: object) -> QueryRequest:
    rec = pool.get(f"m/{pid}")
    assert rec is not None
    # The id in the prompt lets a recording backend tell whose request it serves.
    return QueryRequest(id=qid, prompt=prompt_for(rec, f"query {qid}"), **fields)  # type: ignore[arg-type]


def window(*requests: QueryRequest) -> Window[PendingQuery]:
    return Window("w-1", 0.0, 2.0, tuple(PendingQuery(r, arrived_at=0.0) for r in requests))


async def run(
    policy: AllocationPolicy,
    requests: Sequence[QueryRequest],
    budget: float = 1e6,
    backend: CompletionBackend | None = None,
) -> dict[str, QueryResult]:
    pipeline = WindowPipeline(
        backend or SimulatedBackend(POOL, seed=1),
        policy,
        PipelineMetrics.create(CollectorRegistry()),
        max_tokens_per_query=MAX_TOKENS,
        wall_clock=lambda: NOW,
    )
    outcome = await pipeline.run(window(*requests), budget)
    return {r.id: r for r in outcome.results}


def codes(results: dict[str, QueryResult]) -> dict[str, ReasonCode | None]:
    return {qid: r.reason_code for qid, r in results.items()}


class Scripted:
    """A policy whose decision is given: probe everyone, then these tokens and curves."""

    name = "scripted"

    def __init__(self, tokens: Sequence[int], curves: Sequence[Curve | None]) -> None:
        self._tokens, self._curves = tokens, tuple(curves)

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        return ProbeSelection.everyone(PLAN, len(requests))

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        n = len(queries)
        tokens = np.array(self._tokens, np.int64)
        chains = tuple(0 if q.outcomes and not q.outcomes[0].finished else -1 for q in queries)
        return Decision(tokens, (None,) * n, chains, (None,) * n, 0.01, "test",
                        curves=self._curves)  # fmt: skip

    def observe(self, request: QueryRequest, chain_tokens: int, *, finished: bool,
                answered: bool, answer: str | None = None) -> None:  # fmt: skip
        pass


# --- one code per path -------------------------------------------------------------------


async def test_uniform_caps_finish_or_cut_at_the_allocation_with_no_curve() -> None:
    results = await run(UniformPolicy(cap=700), [request("easy", "a"), request("hard", "b")])
    assert codes(results) == {"a": ReasonCode.CHAIN_FINISHED, "b": ReasonCode.CUT_AT_ALLOCATION}
    assert results["b"].status is Status.ABANDONED
    assert (results["b"].tokens_used, results["b"].allocated_tokens) == (700, 700)
    assert all(r.curve is None and r.expected_accuracy is None for r in results.values())


async def test_oracle_zero_cap_is_insolvent_with_no_curve() -> None:
    results = await run(OraclePolicy({"a": 100}), [request("easy", "a"), request("hard", "b")])
    assert codes(results) == {"a": ReasonCode.CHAIN_FINISHED, "b": ReasonCode.INSOLVENT}
    assert results["b"].curve is None


async def test_clear_funded_queries_carry_the_curve_they_were_priced_on() -> None:
    requests = [request("easy", "e"), request("mid", "m"), request("hard", "h")]
    results = await run(ClearPolicy(PLAN), requests, budget=3000.0)
    easy = results["e"]  # finished inside its probe: answered without a solve
    assert (easy.reason_code, easy.curve, easy.expected_accuracy) == (
        ReasonCode.PROBE_ANSWERED, None, None
    )  # fmt: skip
    priced = [r for r in results.values() if r.reason_code is not ReasonCode.PROBE_ANSWERED]
    assert priced, "some query was priced by the solve"
    for result in priced:
        assert result.curve is not None, result
        assert result.expected_accuracy == result.curve.value(result.allocated_tokens)
        if result.allocated_tokens == 0:
            assert result.reason_code is ReasonCode.INSOLVENT
            assert result.expected_accuracy == 0.0
    funded = [r for r in priced if r.allocated_tokens > 0]
    assert funded
    assert all(
        r.reason_code in (ReasonCode.CHAIN_FINISHED, ReasonCode.CUT_AT_ALLOCATION) for r in funded
    )


async def test_priced_out_before_the_probe_differs_from_priced_out_after_it() -> None:
    before = await run(ClearPolicy(PLAN), [request("mid", "a")], budget=0.0)
    assert before["a"].reason_code is ReasonCode.INSOLVENT_BEFORE_PROBE
    assert (before["a"].tokens_used, before["a"].curve) == (0, None)
    assert "before a probe" in (before["a"].reason or "")
    curve = Curve(A=0.6, tau=400.0, beta=0.002)
    after = await run(Scripted([0], [curve]), [request("mid", "a")])
    result = after["a"]
    assert (result.reason_code, result.status) == (ReasonCode.INSOLVENT, Status.ABANDONED)
    assert (result.tokens_used, result.tokens_probe, result.allocated_tokens) == (256, 256, 0)
    assert (result.curve, result.expected_accuracy) == (curve, 0.0)


async def test_a_chain_cut_at_its_allocation_is_told_from_one_that_finished() -> None:
    curve = Curve(A=0.9, tau=300.0, beta=0.003)
    cut = (await run(Scripted([100], [curve]), [request("mid", "a")]))["a"]
    assert (cut.reason_code, cut.status) == (ReasonCode.CUT_AT_ALLOCATION, Status.ABANDONED)
    assert (cut.tokens_used, cut.tokens_probe, cut.allocated_tokens) == (356, 256, 100)
    assert cut.expected_accuracy == pytest.approx(0.0)  # 100 tokens do not reach τ = 300
    done = (await run(Scripted([1000], [curve]), [request("mid", "a")]))["a"]
    assert (done.reason_code, done.status) == (ReasonCode.CHAIN_FINISHED, Status.ANSWERED)
    assert (done.tokens_used, done.tokens_probe, done.allocated_tokens) == (600, 256, 1000)
    assert done.expected_accuracy == pytest.approx(0.9 * (1 - np.exp(-0.003 * 700)))


async def test_a_cut_chain_answered_by_its_probes_says_so() -> None:
    # Two probes: one finishes (100 tokens, "7"), one is censored and continued 50 tokens.
    pool = RolloutPool([record("mixed", [(100, True), (5000, False)])])

    class TwoProbes(Scripted):
        def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
            return ProbeSelection.everyone(ProbePlan(samples=2, tokens=256), len(requests))

        def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
            chain = next(i for i, o in enumerate(queries[0].outcomes) if not o.finished)
            return Decision(np.array([50]), (None,), (chain,), ("7",), 0.01, "test")

    results = await run(TwoProbes([], []), [request("mixed", "a", pool)],
                        backend=SimulatedBackend(pool, seed=1))  # fmt: skip
    result = results["a"]
    assert (result.reason_code, result.status, result.answer) == (
        ReasonCode.CUT_WITH_PROBE_ANSWER, Status.ANSWERED, "7"
    )  # fmt: skip
    assert "allocated tokens" in (result.reason or "")
    assert result.tokens_used == result.tokens_probe + 50


async def test_a_cap_spent_in_the_probe_is_its_own_code() -> None:
    requests = [request("mid", "tiny", max_tokens=2), request("easy", "short", max_tokens=150)]
    results = await run(ClearPolicy(PLAN), requests)
    assert codes(results) == {
        "tiny": ReasonCode.CAP_SPENT_IN_PROBE, "short": ReasonCode.PROBE_ANSWERED
    }  # fmt: skip
    assert (results["tiny"].tokens_used, results["tiny"].allocated_tokens) == (2, 0)


async def test_expired_and_failed_queries_name_their_cause() -> None:
    past = NOW - timedelta(seconds=1)
    expired = await run(UniformPolicy(cap=700), [request("easy", "a", deadline=past)])
    assert codes(expired) == {"a": ReasonCode.DEADLINE}
    failed = await run(UniformPolicy(cap=700), [request("easy", "a")], backend=FailingBackend())
    assert codes(failed) == {"a": ReasonCode.BACKEND_FAILED}
    bad = OneBadResponse("query b", "usage")
    broken = await run(UniformPolicy(cap=700), [request("easy", "a"), request("easy", "b")],
                       backend=bad)  # fmt: skip
    assert codes(broken) == {"a": ReasonCode.CHAIN_FINISHED, "b": ReasonCode.BACKEND_INCONSISTENT}


def test_unserved_results_take_their_code_from_the_reason() -> None:
    items = [PendingQuery(request("easy", "a"), 0.0)]

    def code(status: Status, reason: str, **kw: object) -> ReasonCode | None:
        (result,) = unserved_results(items, status, reason, shadow_price=0.0, **kw)  # type: ignore[arg-type]
        assert (result.tokens_used, result.curve) == (0, None)
        return result.reason_code

    assert code(Status.ABANDONED, SHUTDOWN_REASON) is ReasonCode.SHUTDOWN
    assert code(Status.ABANDONED, HANDOVER_REASON) is ReasonCode.HANDOVER
    assert code(Status.FAILED, "internal error in window w-1: KeyError: 'x'") is (
        ReasonCode.WINDOW_ERROR
    )
    told = code(Status.ABANDONED, "other", reason_code=ReasonCode.HANDOVER)
    assert told is ReasonCode.HANDOVER


# --- token fields add up, over random windows --------------------------------------------


@dataclass
class Recording:
    """The simulator, recording the tokens each request generated, by query id."""

    inner: SimulatedBackend
    calls: dict[str, list[int]] = field(default_factory=dict)

    async def complete(self, prompt: str | Sequence[int], **request: Any) -> Completion:
        completion = await self.inner.complete(prompt, **request)
        match = QUERY_LINE.search(str(prompt))
        assert match is not None
        self.calls.setdefault(match.group(1), []).append(completion.completion_tokens)
        return completion

    def ready(self) -> bool:
        return True


chain = st.tuples(st.one_of(st.integers(1, 300), st.integers(1, 3000)), st.booleans())
# Four records with the same number of chains each (a pool's rule).
pools = st.integers(1, 4).flatmap(
    lambda k: st.lists(st.lists(chain, min_size=k, max_size=k), min_size=4, max_size=4)
)
queries = st.lists(
    st.tuples(
        st.integers(0, 3),  # which record
        st.one_of(st.none(), st.integers(1, 4000)),  # max_tokens
        st.sampled_from([0.0, 1.0, 3.0]),  # weight
        st.sampled_from([None] * 7 + [NOW - timedelta(seconds=1)]),  # deadline, sometimes past
    ),
    min_size=1,
    max_size=8,
)
# (a policy, its probe plan): uniform with a fixed cap, an even split, or CLEAR.
policies = st.one_of(
    st.one_of(st.none(), st.integers(0, 3000)).map(lambda cap: ("uniform", cap, NO_PROBE)),
    st.builds(
        lambda k, p: ("clear", None, ProbePlan(samples=k, tokens=p)),
        st.sampled_from([0, 1, 2]),
        st.sampled_from([16, 64, 256]),
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    pools,
    queries,
    policies,
    st.floats(0, 20_000),
)
def test_every_result_adds_up_and_explains_itself(
    pool_chains: list[list[tuple[int, bool]]],
    specs: list[tuple[int, int | None, float, datetime | None]],
    choice: tuple[str, int | None, ProbePlan],
    budget: float,
) -> None:
    kind, uniform_cap, plan = choice
    policy = UniformPolicy(uniform_cap) if kind == "uniform" else ClearPolicy(plan)
    pool = RolloutPool([record(f"p{i}", c) for i, c in enumerate(pool_chains)])
    requests = [
        request(f"p{rec}", f"q{i}", pool, max_tokens=cap, weight=weight, deadline=deadline)
        for i, (rec, cap, weight, deadline) in enumerate(specs)
    ]
    backend = Recording(SimulatedBackend(pool, seed=1))
    results = asyncio.run(run(policy, requests, budget, backend))
    assert sorted(results) == sorted(r.id for r in requests)
    probes = plan.enabled
    for req in requests:
        result = results[req.id]
        calls = backend.calls.get(req.id, [])
        probe = calls[0] if probes and calls else 0
        continuation = sum(calls) - probe
        cap = min(req.max_tokens or MAX_TOKENS, MAX_TOKENS)
        code = result.reason_code
        assert code is not None
        assert code.status is result.status
        # The documented identity, and what each part is bounded by.
        assert result.tokens_probe == probe
        assert result.tokens_used == result.tokens_probe + continuation
        assert continuation <= result.allocated_tokens
        assert result.tokens_probe <= max(plan.samples, 1) * min(plan.tokens, cap)
        if result.allocated_tokens:
            assert result.tokens_probe + result.allocated_tokens <= cap
        if plan.samples <= 1:
            assert result.tokens_used <= cap
        # Each code's own promise.
        if code in (ReasonCode.INSOLVENT_BEFORE_PROBE, ReasonCode.DEADLINE):
            assert result.tokens_used == 0  # the simulator never blocks, so never mid-request
        if code in (ReasonCode.PROBE_ANSWERED, ReasonCode.INSOLVENT, ReasonCode.CAP_SPENT_IN_PROBE):
            assert continuation == 0
        if code is ReasonCode.CAP_SPENT_IN_PROBE:
            # The k samples share the cap (cap // k each): up to k - 1 tokens are left over.
            assert result.tokens_probe >= cap - (max(plan.samples, 1) - 1)
        if code in (ReasonCode.CUT_AT_ALLOCATION, ReasonCode.CUT_WITH_PROBE_ANSWER):
            assert continuation == result.allocated_tokens > 0
        if code is ReasonCode.CHAIN_FINISHED:
            assert 0 < continuation <= result.allocated_tokens
        # The curve: only from a solve, with its value at the allocation.
        if kind == "uniform" or code is ReasonCode.PROBE_ANSWERED:
            assert result.curve is None
        if result.curve is None:
            assert result.expected_accuracy is None
        else:
            assert result.expected_accuracy == result.curve.value(result.allocated_tokens)
    if uniform_cap is None:  # a fixed uniform cap ignores the budget by design
        assert sum(r.tokens_used for r in results.values()) <= budget
