"""One window's work: expire → probe → decide (policy) → dispatch → results and report.

Backend-agnostic (a vLLM pool or the rollout simulator) and clock-agnostic, so the Kafka daemon
and trace replay run exactly this code and are charged for exactly the tokens generated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import structlog

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.policies import (
    AllocationPolicy,
    ContinuationGain,
    Decision,
    QueryView,
)
from clearbudget.daemon.core.ports import BackendError, Completion, CompletionBackend, Sample
from clearbudget.daemon.core.windowing import Window
from clearbudget.schemas.messages import (
    Curve,
    QueryRequest,
    QueryResult,
    ReasonCode,
    Status,
    StatusCounts,
    WindowReport,
)
from clearbudget.solver.answers import answers_agree, extract_answer
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.rounding import equal_shares_within

# What a window with tokens to spare has left goes to its cut chains (`WindowPipeline._recycle`)
# in shares of at least this many tokens.
RECYCLE_MIN_TOKENS = 32

SHUTDOWN_REASON = "daemon shut down before the query could finish"
# The Kafka service's reason for queries cut off by a revoke (it imports this one).
HANDOVER_REASON = "its partition was handed to another replica before the query could finish"
# Reason codes of the unserved results whose reason is one of these texts (`unserved_results`).
UNSERVED_REASON_CODES = {
    SHUTDOWN_REASON: ReasonCode.SHUTDOWN,
    HANDOVER_REASON: ReasonCode.HANDOVER,
}


@dataclass(frozen=True, slots=True)
class PendingQuery:
    """An admitted query waiting for (or inside) its window."""

    request: QueryRequest
    arrived_at: float
    # Where the source read it, opaque to the core (the Kafka service: its TopicPartition).
    partition: Hashable | None = None
    offset: int = -1


@dataclass(frozen=True)
class WindowOutcome:
    """Results aligned with the window's items, and the window's report."""

    results: list[QueryResult]
    report: WindowReport


@dataclass(slots=True)
class _Cut:
    """A dispatched chain that ran out at its allocation, as it stands."""

    prompt: str | list[int] | None  # what continues it (None: it cannot be continued)
    tokens: int  # chain tokens so far (its probe's included)
    text: str  # the chain's text so far
    fallback: str | None  # what the finished probes agreed on, if anything


@dataclass
class _Query:
    """One query's way through the window."""

    request: QueryRequest
    probe: Completion | None = None
    outcomes: tuple[ProbeOutcome, ...] = ()  # of the probe's samples, parsed once
    probe_tokens: int = 0
    probe_cut: bool = False  # its own max_tokens cut the probe short: nothing left to decide
    probe_length: int = 0  # what its probe's samples were cut at
    dispatch_tokens: int = 0
    allocated: int = 0
    curve: Curve | None = None  # the curve the allocation priced it on, if any
    continued: int = -1  # the probe sample its continuation extends (−1: none or fresh)
    samples_pending: bool = False  # its probe samples but `continued` are still to be learned
    group: str = ""  # with tag budgets: its tag row
    cut: _Cut | None = None  # its chain ran out at its allocation: may get more (`_recycle`)
    result: QueryResult | None = None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class WindowPipeline:
    def __init__(
        self,
        backend: CompletionBackend,
        policy: AllocationPolicy,
        metrics: PipelineMetrics,
        *,
        max_tokens_per_query: int,
        thinking_answer_tokens: int | None = None,
        seed: int | None = None,
        wall_clock: Callable[[], datetime] = _utc_now,
        logger: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._backend = backend
        self._policy = policy
        self._metrics = metrics
        self._max_tokens = max_tokens_per_query
        # Thinking mode (None: off): a continuation's last `thinking_answer_tokens` of its
        # allocation are kept for the answer; vLLM ends the thinking before them.
        self._answer_tokens = thinking_answer_tokens
        self._seed = seed
        self._wall_clock = wall_clock
        self._log = logger or structlog.get_logger("clearbudget.pipeline")

    async def run(
        self,
        window: Window[PendingQuery],
        budget: float,
        *,
        waiting: int = 0,
        carry_room: Callable[[], float] | None = None,
    ) -> WindowOutcome:
        """Serve `window` on `budget` tokens; `waiting`: queries queued behind it (a backlog),
        named in the reason of those priced out; `carry_room`: how many unspent tokens the
        budget's carry-over can still take (the rest of what a window leaves is lost; None:
        all of it)."""
        started = self._wall_clock()
        queries = [_Query(item.request) for item in window.items]
        self._expire(queries, window.window_id)
        live = [q for q in queries if q.result is None]
        selection = self._policy.probe_plan([q.request for q in live], budget)
        skipped = [q for q, chosen in zip(live, selection.selected, strict=True) if not chosen]
        live = [q for q, chosen in zip(live, selection.selected, strict=True) if chosen]
        lengths = [selection.tokens_of(i) for i, chosen in enumerate(selection.selected) if chosen]
        if selection.plan.enabled and live:
            await self._probe(live, selection.plan, lengths, window.window_id)
        views = [(q, self._view(q)) for q in live if q.result is None]
        # A query whose own max_tokens the probe used up has nothing left to decide.
        spent_out = [q for q, view in views if view.cap_left == 0]
        views = [(q, view) for q, view in views if view.cap_left > 0]
        live = [q for q, _ in views]
        probe_spent = sum(q.probe_tokens for q in queries)
        decision = self._policy.decide([view for _, view in views], max(budget - probe_spent, 0))
        self._metrics.solve_seconds.observe(decision.solve_ms / 1e3)
        self._metrics.solver_fallbacks.inc(decision.fallbacks)
        if decision.fallbacks:
            self._log.warning("solver_fallback", window_id=window.window_id,
                              solver=decision.solver, reason=decision.fallback_reason)  # fmt: skip
        try:
            await self._dispatch(live, decision, window.window_id, waiting)
            if decision.continuation is not None:  # clear: early finishers' leftover, to cut chains
                left = max(budget - probe_spent, 0) - sum(q.dispatch_tokens for q in live)
                free = max(left - carry_room(), 0.0) if carry_room is not None else 0.0
                await self._recycle(live, left, free, window.window_id, decision)
            for query in live:
                if query.cut is not None:
                    self._end_cut(query, window.window_id, decision.shadow_price)
        finally:  # even when the window fails: they ran, and nothing else will learn them
            for query in live:
                if query.samples_pending:  # its other probe samples, now its chain is over
                    query.samples_pending = False
                    self._observe_probe_only(query, except_sample=query.continued)
        self._metrics.tokens.labels(phase="dispatch").inc(sum(q.dispatch_tokens for q in live))
        for query in skipped:
            query.result = _insolvent(
                query, window.window_id, decision.shadow_price, waiting, before_probe=True
            )
        for query in spent_out:
            query.result = self._probe_only_result(query, window.window_id, decision.shadow_price)
        return self._report(queries, window, budget, decision, started)

    def _probe_only_result(self, query: _Query, window_id: str, price: float) -> QueryResult:
        self._observe_probe_only(query)
        finished = next((s for s in _probe_samples(query.probe) if s.finish_reason == "stop"), None)
        if finished is not None:
            return _result(
                query, ReasonCode.PROBE_ANSWERED, window_id, price,
                answer=extract_answer(finished.text), text=finished.text,
            )  # fmt: skip
        return _result(
            query, ReasonCode.CAP_SPENT_IN_PROBE, window_id, price,
            reason=f"its max_tokens ({self._cap(query.request)}) ran out during the probe",
        )  # fmt: skip

    def _cap(self, request: QueryRequest) -> int:
        return min(request.max_tokens or self._max_tokens, self._max_tokens)

    def _view(self, query: _Query) -> QueryView:
        return QueryView(
            request=query.request,
            outcomes=query.outcomes,
            probe_tokens=query.probe_tokens,
            cap_left=0
            if query.probe_cut
            else max(self._cap(query.request) - query.probe_tokens, 0),
            probe_length=query.probe_length,
        )

    # --- steps ----------------------------------------------------------------------------
    def _expire(self, queries: list[_Query], window_id: str) -> None:
        now = self._wall_clock()
        for query in queries:
            deadline = query.request.deadline
            if deadline is not None and deadline <= now:
                query.result = _result(
                    query,
                    ReasonCode.DEADLINE,
                    window_id,
                    None,
                    reason="deadline passed before the window ran",
                )

    async def _probe(
        self, live: list[_Query], plan: ProbePlan, lengths: list[int], window_id: str
    ) -> None:
        async def probe_one(query: _Query, length: int) -> None:
            # All k samples together stay within the query's own max_tokens.
            max_tokens = max(min(length, self._cap(query.request) // plan.samples), 1)
            query.probe_cut = max_tokens < length
            query.probe_length = length
            probe = await self._request(
                query, "probe", query.request.prompt, plan.samples, max_tokens, window_id, None
            )
            if probe is not None:
                query.probe = probe
                query.outcomes = _outcomes(probe)

        await asyncio.gather(*(probe_one(q, n) for q, n in zip(live, lengths, strict=True)))
        self._metrics.tokens.labels(phase="probe").inc(sum(q.probe_tokens for q in live))

    async def _dispatch(
        self, live: list[_Query], decision: Decision, window_id: str, waiting: int
    ) -> None:
        price = decision.shadow_price

        async def dispatch_one(query: _Query, i: int) -> None:
            tokens, answer_now = int(decision.tokens[i]), decision.answer_now[i]
            query.allocated = tokens
            query.curve = decision.curves[i] if decision.curves else None
            query.group = decision.groups[i] if decision.groups else ""
            if answer_now is not None or tokens <= 0:
                self._observe_probe_only(query)
            if answer_now is not None:
                query.result = _result(
                    query, ReasonCode.PROBE_ANSWERED, window_id, price, answer=answer_now,
                    text=_finished_with(query.probe, answer_now).text,
                )  # fmt: skip
            elif tokens <= 0:
                query.result = _insolvent(query, window_id, price, waiting)
            else:
                # Its other probe samples are learned once its chain is over (`run`): until
                # then the policy values the chain with them as its siblings, as it did here.
                query.continued, query.samples_pending = decision.continue_from[i], True
                chain = _probe_sample(query.probe, query.continued)
                fallback = decision.fallback_answer[i]
                await self._continue(query, tokens, chain, fallback, window_id, price)

        assert len(decision.tokens) == len(live), "one decision per live query"
        assert len(decision.curves) in (0, len(live)), "a curve (or None) per live query"
        await asyncio.gather(*(dispatch_one(q, i) for i, q in enumerate(live)))

    async def _continue(
        self,
        query: _Query,
        tokens: int,
        chain: Sample | None,
        fallback: str | None,
        window_id: str,
        price: float,
    ) -> None:
        """Continue `chain` (None: a fresh chain) within `tokens`; if it does not finish, answer
        with `fallback` (what the finished probes agreed on) when there is one. In thinking
        mode the chain's thinking is ended in time for it to answer within `tokens`."""
        prompt = _continuation_prompt(query.request.prompt, query.probe, chain)
        before = _sample_tokens(chain, query.probe) if chain and query.probe else 0
        thinking = self._thinking_budget(before, tokens)
        completion = await self._request(
            query, "dispatch", prompt, 1, tokens, window_id, price, thinking=thinking
        )
        if completion is None:  # failed or expired: the chain is known to run `before` unfinished
            if chain is not None:
                self._observe(query, before, finished=False, answer=None)
            return
        sample = completion.samples[0]
        # The chain's own length: a retried attempt's tokens are charged, not part of it.
        chain_tokens = before + _sample_tokens(sample, completion)
        text = (chain.text if chain else "") + sample.text
        if thinking is not None and sample.finish_reason == "stop" and chain_tokens > thinking:
            # It ran past its thinking budget, where vLLM ends the thinking, and then answered.
            # (vLLM does not say whether it ended it, or the chain had just stopped thinking.)
            # The chain is known to run past `thinking`, so the curves learn it as cut there.
            answer = extract_answer(text)
            self._observe(query, thinking, finished=False, answer=None)
            query.result = _result(
                query, ReasonCode.THINKING_ENDED, window_id, price, answer=answer, text=text,
                reason=f"the chain ran past its thinking budget of {thinking} tokens, where "
                f"vLLM ends the thinking, and answered within its {tokens} allocated tokens",
            )  # fmt: skip
            return
        if sample.finish_reason != "stop":  # ended (result and observation) after `_recycle`
            query.cut = _Cut(_extended(prompt, completion, sample), chain_tokens, text, fallback)
            return
        answer = extract_answer(text)
        self._observe(query, chain_tokens, finished=True, answer=answer)
        query.result = _result(
            query, ReasonCode.CHAIN_FINISHED, window_id, price, answer=answer, text=text
        )

    async def _recycle(
        self, live: list[_Query], left: float, free: float, window_id: str, decision: Decision
    ) -> None:
        """What a window has left after its continuations (chains that finished early return
        the rest of their allocations) goes to the chains cut at theirs, in equal shares up to
        each query's cap, one more request each, within the window's budget: first the `free`
        tokens the carry-over could not keep anyway, then shares of the rest where they return
        the window's price (`_worth_more`; with tag budgets, the group's price, and no group
        past its row). Not in thinking mode, where such a chain answers."""
        gain, price = decision.continuation, decision.shadow_price
        assert gain is not None
        cut = [q for q in live if q.cut is not None and q.cut.prompt is not None]
        if not cut or left < RECYCLE_MIN_TOKENS or self._answer_tokens is not None:
            return
        room = [self._cap(q.request) - q.probe_tokens - q.dispatch_tokens for q in cut]
        room_left = np.maximum(np.array(room, np.float64), 0.0)
        groups = [q.group for q in cut]
        limits = _rows_left(live, decision.tag_budgets)
        lost_anyway = equal_shares_within(room_left, min(free, left), groups, limits)
        for group, share in zip(groups, lost_anyway, strict=True):
            if group in limits:
                limits[group] -= float(share)
        rest = equal_shares_within(room_left - lost_anyway, left - float(lost_anyway.sum()),
                                   groups, limits)  # fmt: skip
        prices = [decision.tag_prices.get(g, price) for g in groups]
        extra = [
            int(f) + (int(r) if _worth_more(q, int(r), p, gain, after=int(f)) else 0)
            for q, f, r, p in zip(cut, lost_anyway, rest, prices, strict=True)
        ]
        await asyncio.gather(*(
            self._continue_cut(q, e, window_id, price)
            for q, e in zip(cut, extra, strict=True) if e >= RECYCLE_MIN_TOKENS
        ))  # fmt: skip

    async def _continue_cut(self, query: _Query, extra: int, window_id: str, price: float) -> None:
        """`extra` more tokens for a cut chain; on a backend failure it stays cut as it was
        (what the attempt generated is charged all the same); if its deadline passes
        meanwhile it expires, unless its finished probes gave an answer to end with."""
        cut = query.cut
        assert cut is not None
        assert cut.prompt is not None
        try:
            completion = await self._complete(
                query.request, cut.prompt, n=1, max_tokens=extra, thinking=None
            )
        except BackendError as exc:
            query.dispatch_tokens += max(exc.discarded_tokens, 0)
            return
        except _DeadlinePassed:
            if cut.fallback is None:  # it ran `cut.tokens` unfinished: that much is known
                self._observe(query, cut.tokens, finished=False, answer=None)
                query.cut = None
                query.result = _expired(query, window_id, price, "dispatch")
            return  # else it ends as it was, answered with what its finished probes agreed on
        query.dispatch_tokens += _charge(completion, 1, extra)
        query.allocated += extra
        if _inconsistency(completion, 1, extra) is not None:
            return
        sample = completion.samples[0]
        ran = _sample_tokens(sample, completion)  # retried attempts' tokens are no part of it
        text = cut.text + sample.text
        if sample.finish_reason == "stop":
            answer = extract_answer(text)
            self._observe(query, cut.tokens + ran, finished=True, answer=answer)
            query.cut = None
            query.result = _result(
                query, ReasonCode.CHAIN_FINISHED, window_id, price, answer=answer, text=text
            )
            return
        query.cut = _Cut(_extended(cut.prompt, completion, sample), cut.tokens + ran, text,
                         cut.fallback)  # fmt: skip

    def _end_cut(self, query: _Query, window_id: str, price: float) -> None:
        """The result of a chain that ran out at its allocation, and what the curves learn."""
        cut = query.cut
        assert cut is not None
        query.cut = None
        self._observe(query, cut.tokens, finished=False, answer=None)
        allocated = query.allocated
        if cut.fallback is not None:
            query.result = _result(
                query, ReasonCode.CUT_WITH_PROBE_ANSWER, window_id, price, answer=cut.fallback,
                text=_finished_with(query.probe, cut.fallback).text,
                reason=f"the chain did not finish within its {allocated} allocated tokens; "
                "answered with what the finished probes agreed on",
            )  # fmt: skip
            return
        query.result = _result(
            query, ReasonCode.CUT_AT_ALLOCATION, window_id, price,
            reason=f"the chain did not finish within its {allocated} allocated tokens",
        )  # fmt: skip

    def _thinking_budget(self, chain_tokens: int, tokens: int) -> int | None:
        """vLLM's `thinking_token_budget` for continuing a chain of `chain_tokens` (its
        thinking so far, which vLLM counts from the prompt) with `tokens` more; None when off."""
        if self._answer_tokens is None:
            return None
        return chain_tokens + max(tokens - self._answer_tokens, 0)

    async def _request(
        self,
        query: _Query,
        phase: Literal["probe", "dispatch"],
        prompt: str | list[int],
        n: int,
        max_tokens: int,
        window_id: str,
        price: float | None,
        *,
        thinking: int | None = None,
    ) -> Completion | None:
        """One backend request for `query`, its tokens charged to `phase`. On failure, an
        expired deadline or an inconsistent response, the query gets its result (this query
        only, charged what the pod reported, at most the request's allowance) and None."""
        try:
            completion = await self._complete(
                query.request, prompt, n=n, max_tokens=max_tokens, thinking=thinking
            )
        except BackendError as exc:
            self._charge_to(query, phase, max(exc.discarded_tokens, 0))
            query.result = _result(
                query, ReasonCode.BACKEND_FAILED, window_id, price, reason=f"{phase} failed: {exc}"
            )
            return None
        except _DeadlinePassed:
            query.result = _expired(query, window_id, price, phase)
            return None
        self._charge_to(query, phase, _charge(completion, n, max_tokens))
        problem = _inconsistency(completion, n, max_tokens, probe=phase == "probe")
        if problem is not None:
            query.result = _result(
                query, ReasonCode.BACKEND_INCONSISTENT, window_id, price,
                reason=f"{phase} failed: {problem}",
            )  # fmt: skip
            return None
        return completion

    @staticmethod
    def _charge_to(query: _Query, phase: Literal["probe", "dispatch"], tokens: int) -> None:
        if phase == "probe":
            query.probe_tokens = tokens
        else:
            query.dispatch_tokens = tokens

    async def _complete(
        self,
        request: QueryRequest,
        prompt: str | list[int],
        *,
        n: int,
        max_tokens: int,
        thinking: int | None,
    ) -> Completion:
        """One backend request, cancelled when the query's deadline passes (`_DeadlinePassed`)."""
        request_call = self._backend.complete(
            prompt, n=n, max_tokens=max_tokens, seed=self._seed, thinking_token_budget=thinking
        )
        if request.deadline is None:
            return await request_call
        left = (request.deadline - self._wall_clock()).total_seconds()
        try:
            return await asyncio.wait_for(request_call, max(left, 0.0))
        except TimeoutError as exc:
            raise _DeadlinePassed from exc

    def _observe(self, query: _Query, tokens: int, *, finished: bool, answer: str | None) -> None:
        self._policy.observe(
            query.request, tokens, finished=finished, answered=answer is not None, answer=answer
        )

    def _observe_probe_only(self, query: _Query, except_sample: int = -1) -> None:
        """Chains that never reach dispatch still teach the model (finished or censored):
        all of a query's probe samples, but the one being continued (observed when it ends)."""
        for j, outcome in enumerate(query.outcomes):
            if j != except_sample:
                self._observe(
                    query, outcome.tokens, finished=outcome.finished, answer=outcome.answer
                )

    # --- report ---------------------------------------------------------------------------
    def _report(
        self,
        queries: list[_Query],
        window: Window[PendingQuery],
        budget: float,
        decision: Decision,
        started: datetime,
    ) -> WindowOutcome:
        results = [q.result for q in queries if q.result is not None]
        assert len(results) == len(queries), "every query ends in exactly one status"
        counts = dict.fromkeys(Status, 0)
        for result in results:
            counts[result.status] += 1
        for status, count in counts.items():
            self._metrics.queries.labels(status=status.value).inc(count)
        spent = sum(r.tokens_used for r in results)
        probe = sum(r.tokens_probe for r in results)
        report = WindowReport(
            window_id=window.window_id,
            shadow_price=decision.shadow_price,
            budget_tokens=budget,
            spent_tokens=spent,
            probe_tokens=probe,
            counts=StatusCounts(**{s.value: n for s, n in counts.items()}),
            solver=decision.solver,
            solve_ms=decision.solve_ms,
            started_at=started,
            ended_at=max(self._wall_clock(), started),
        )
        self._metrics.windows.inc()
        self._metrics.shadow_price.set(decision.shadow_price)
        self._metrics.window_budget.set(budget)
        self._metrics.window_spent.set(spent)
        self._log.info(
            "window",
            window_id=window.window_id,
            queries=len(queries),
            shadow_price=report.shadow_price,
            budget=round(budget),
            spent=spent,
            probe=probe,
            solver=report.solver,
            solve_ms=round(report.solve_ms, 2),
            **{s.value: n for s, n in counts.items() if n},
        )
        return WindowOutcome(results, report)


def unserved_results(
    items: Sequence[PendingQuery],
    status: Status,
    reason: str,
    *,
    window_id: str | None = None,
    shadow_price: float | None = None,
    reason_code: ReasonCode | None = None,
) -> list[QueryResult]:
    """Terminal results for queries the pipeline could not serve (a window that raised, a
    shutdown deadline, a hand-over): no tokens are attributed, the reason says why.
    `reason_code` defaults to the code of a known reason text (`UNSERVED_REASON_CODES`:
    shutdown, handover), else to the status's (`QueryResult.unspent`: failed → window_error)."""
    code = reason_code or UNSERVED_REASON_CODES.get(reason)
    return [
        QueryResult.unspent(
            item.request.id,
            status,
            reason,
            window_id=window_id,
            shadow_price=shadow_price,
            reason_code=code,
        )
        for item in items
    ]


def _result(
    query: _Query,
    code: ReasonCode,
    window_id: str,
    price: float | None,
    *,
    answer: str | None = None,
    text: str | None = None,
    reason: str | None = None,
) -> QueryResult:
    """The query's result: its status is its code's; tokens as charged (`tokens_used` is the
    probe's plus the continuation's), with the curve it was priced on and that curve's value at
    its allocation."""
    status = code.status
    curve = query.curve
    return QueryResult(
        id=query.request.id,
        status=status,
        answer=answer,
        text=text,
        tokens_used=query.probe_tokens + query.dispatch_tokens,
        tokens_probe=query.probe_tokens,
        allocated_tokens=query.allocated,
        shadow_price=price if price is not None or status is not Status.ABANDONED else 0.0,
        window_id=window_id,
        reason=reason,
        reason_code=code,
        curve=curve,
        expected_accuracy=curve.value(query.allocated) if curve is not None else None,
    )


class _DeadlinePassed(Exception):
    """A query's deadline passed while its request was running (the request is cancelled)."""


def _expired(query: _Query, window_id: str, price: float | None, phase: str) -> QueryResult:
    return _result(
        query, ReasonCode.DEADLINE, window_id, price, reason=f"deadline passed during {phase}"
    )


def _insolvent(
    query: _Query, window_id: str, price: float, waiting: int, *, before_probe: bool = False
) -> QueryResult:
    """Priced out: by the window's solve, allocated no continuation (`insolvent`), or by probe
    selection on its predicted curve, before anything was spent (`insolvent_before_probe`)."""
    reason = f"insolvent: cannot return the shadow price {price:.4g} per token"
    if before_probe:
        reason += " (judged on its predicted curve, before a probe)"
    if waiting:
        reason += f" (backlog: {waiting} queries waiting; windows are paced to the budget rate)"
    code = ReasonCode.INSOLVENT_BEFORE_PROBE if before_probe else ReasonCode.INSOLVENT
    return _result(query, code, window_id, price, reason=reason)


def _outcomes(probe: Completion | None) -> tuple[ProbeOutcome, ...]:
    if probe is None:
        return ()
    return tuple(
        ProbeOutcome(
            finished=s.finish_reason == "stop",
            tokens=_sample_tokens(s, probe),
            answer=extract_answer(s.text) if s.finish_reason == "stop" else None,
        )
        for s in probe.samples
    )


def _charge(completion: Completion, n: int, max_tokens: int) -> int:
    """Tokens to charge for a response: its usage, but never more than the request allowed
    (a larger count is a backend error, reported by `_inconsistency`), plus what earlier
    attempts generated without a usable answer."""
    used = min(max(completion.completion_tokens, 0), n * max_tokens)
    return used + max(completion.discarded_tokens, 0)


def _inconsistency(
    completion: Completion, n: int, max_tokens: int, *, probe: bool = False
) -> str | None:
    """What is wrong with a response to a request for `n` chains of `max_tokens`, if anything.
    A probe's censored chains must run exactly `max_tokens` (the fit reads them as censored
    there); a continuation may stop short at the model's context limit."""
    if len(completion.samples) != n:
        return f"the backend returned {len(completion.samples)} chains for n={n}"
    if not 0 <= completion.completion_tokens <= n * max_tokens:
        return (
            f"the backend reported {completion.completion_tokens} generated tokens for "
            f"n={n} x max_tokens={max_tokens}"
        )
    for sample in completion.samples:
        tokens = _sample_tokens(sample, completion)
        cut_short = probe and sample.finish_reason == "length" and tokens != max_tokens
        if tokens > max_tokens or cut_short:
            return (
                f"a chain ended '{sample.finish_reason}' after {tokens} tokens "
                f"with max_tokens={max_tokens}"
            )
    return None


def _sample_tokens(sample: Sample, probe: Completion) -> int:
    if sample.completion_tokens is not None:
        return sample.completion_tokens
    # Only the request total is known: split it evenly (exact for n = 1).
    return probe.completion_tokens // max(len(probe.samples), 1)


def _probe_samples(probe: Completion | None) -> tuple[Sample, ...]:
    return probe.samples if probe is not None else ()


def _probe_sample(probe: Completion | None, index: int) -> Sample | None:
    """The probe chain the policy chose to continue (index −1 or no probe: none)."""
    return probe.samples[index] if probe is not None and index >= 0 else None


def _finished_with(probe: Completion | None, answer: str) -> Sample:
    assert probe is not None, "a fallback answer comes from a finished probe"
    # The fit's answers are normalised ("3.0" and "\\boxed{3}" agree): compare likewise.
    return next(
        s for s in probe.samples
        if s.finish_reason == "stop" and answers_agree(extract_answer(s.text), answer)
    )  # fmt: skip


def _rows_left(live: Sequence[_Query], rows: Mapping[str, float]) -> dict[str, float]:
    """What each tag row has left after the window's continuations (empty without tag
    budgets): the row less its queries' dispatched tokens."""
    left = dict(rows)
    for query in live:
        if query.group in left:
            left[query.group] -= query.dispatch_tokens
    return left


def _worth_more(
    query: _Query, extra: int, price: float, gain: ContinuationGain, *, after: int = 0
) -> bool:
    """Whether `extra` more tokens for a cut chain, on top of `after` tokens it gets in the
    same request, return the window's price per token: what they add to the chance `gain`
    gives that the chain, as it stands, ends within the request with an answer, times its
    weight, over `extra`. What is not worth it stays in the budget and carries over."""
    if query.cut is None or extra <= 0 or after + extra < RECYCLE_MIN_TOKENS:  # not sent
        return False
    before, total = gain(query.request, query.outcomes, query.continued, query.cut.tokens,
                         (after, after + extra))  # fmt: skip
    added = total - before
    return query.request.weight * added / extra >= price


def _extended(
    prompt: str | list[int] | None, completion: Completion, sample: Sample
) -> str | list[int] | None:
    """The prompt that continues `sample` after `prompt`: by token ids when the backend gave
    them, else by text; None when neither can be done."""
    if prompt is None:
        return None
    if sample.token_ids is not None:
        base = completion.prompt_token_ids
        if base is None and isinstance(prompt, list):
            base = tuple(prompt)
        if base is not None:
            return [*base, *sample.token_ids]
    return prompt + sample.text if isinstance(prompt, str) else None


def _continuation_prompt(
    prompt: str, probe: Completion | None, chain: Sample | None
) -> str | list[int]:
    """Continue the censored chain: by token ids when the backend gave them (no re-tokenising
    drift), else by text; with no chain to continue, start fresh from the prompt."""
    if chain is None or probe is None:
        return prompt
    if chain.token_ids is not None and probe.prompt_token_ids is not None:
        return [*probe.prompt_token_ids, *chain.token_ids]
    return prompt + chain.text
