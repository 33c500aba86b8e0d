"""Allocation policies: how a window's budget becomes per-query token caps.

`ClearPolicy` is the product (probe → fit → shadow price → abandon the insolvent). `UniformPolicy`
and `OraclePolicy` are the baselines replay compares it with; all three run through the same
pipeline, so every policy is charged for exactly the tokens the backend generated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from clearbudget.daemon.core.feedback import FeedbackOutcome, RecentQueries
from clearbudget.daemon.core.metrics import TagMetrics
from clearbudget.daemon.core.tags import TagBudgets, TagRows
from clearbudget.schemas.messages import Curve, QueryRequest
from clearbudget.solver.allocate import solve_window
from clearbudget.solver.cvx import CvxpyAllocator
from clearbudget.solver.difficulty import DifficultyModel, Observation, QueryInfo
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.problem import AllocationResult, WindowProblem
from clearbudget.solver.query_fit import (
    CurveWindow,
    continuation_chance,
    curve_problem,
    fit_queries,
    plan_probes,
    select_queries,
)

NO_PROBE = ProbePlan(samples=0, tokens=0)
# The most tokens probe selection lets a query without its own max_tokens want.
SELECTION_HORIZON = 32768


@dataclass(frozen=True, slots=True)
class ProbeSelection:
    """The probe and which queries get it; `tokens`, each query's own probe length where they
    differ (None: the plan's for all)."""

    plan: ProbePlan
    selected: NDArray[np.bool_]
    tokens: NDArray[np.int64] | None = None

    @classmethod
    def everyone(cls, plan: ProbePlan, n: int) -> ProbeSelection:
        return cls(plan, np.ones(n, dtype=bool))

    def tokens_of(self, i: int) -> int:
        """Query i's probe length."""
        return int(self.tokens[i]) if self.tokens is not None else self.plan.tokens


@dataclass(frozen=True, slots=True)
class QueryView:
    """What a policy sees of one live query after probing."""

    request: QueryRequest
    outcomes: tuple[ProbeOutcome, ...]
    probe_tokens: int
    cap_left: int  # tokens the query may still generate (its cap minus probe tokens)
    probe_length: int = 0  # what its probe's samples were cut at (0: the plan's length)


@dataclass(frozen=True, slots=True)
class Decision:
    """Per live query: continuation budget (0 abandons it), an early answer, which probe chain
    to continue (−1: start fresh) and the answer to fall back on if that chain does not finish;
    plus the window's price, and with tag budgets each group's row and price (λ plus the
    group's premium where its row binds). `curves`: per live query the curve the allocation
    was solved on (None where the query was not priced on one, e.g. answered from its probe);
    empty when the policy has no curves (the baselines). `continuation`: set when what this
    window's continuations leave may go to its chains cut at their allocation; it values such a
    chain's next tokens (`WindowPipeline._recycle` offers them where they return the price, each
    group's within what its tag row has left; `groups`: each live query's row with tag
    budgets). None for the baselines, whose caps are the policy."""

    tokens: NDArray[np.int64]
    answer_now: tuple[str | None, ...]
    continue_from: tuple[int, ...]
    fallback_answer: tuple[str | None, ...]
    shadow_price: float
    solver: str
    solve_ms: float = 0.0
    fallbacks: int = 0
    tag_budgets: Mapping[str, float] = field(default_factory=dict)
    tag_prices: Mapping[str, float] = field(default_factory=dict)
    curves: tuple[Curve | None, ...] = ()
    continuation: ContinuationGain | None = None
    groups: tuple[str, ...] = ()  # with tag budgets: each live query's group (its row's key)
    fallback_reason: str | None = None  # why cvxpy failed, when `fallbacks` counts it

    @classmethod
    def caps(cls, tokens: NDArray[np.int64], solver: str) -> Decision:
        """Fresh chains capped at `tokens`, nothing probed (the baselines)."""
        n = len(tokens)
        return cls(tokens, (None,) * n, (-1,) * n, (None,) * n, 0.0, solver)


class ContinuationGain(Protocol):
    def __call__(
        self,
        request: QueryRequest,
        outcomes: Sequence[ProbeOutcome],
        continued: int,
        chain_tokens: int,
        extras: Sequence[int],
    ) -> Sequence[float]:
        """Per entry of `extras`, the chance that the query's chain (extending its probe
        sample `continued`; −1: a fresh chain), `chain_tokens` long and not finished, ends
        within that many more tokens with an answer."""
        ...


class AllocationPolicy(Protocol):
    name: str

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        """The probe and which queries get it; the others are abandoned unprobed."""
        ...

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision: ...

    def observe(
        self,
        request: QueryRequest,
        chain_tokens: int,
        *,
        finished: bool,
        answered: bool,
        answer: str | None = None,
    ) -> None:
        """Learn from one chain's final state (reported once, after its last request): its
        length, whether it finished, and the answer extracted from it (None: none)."""

    def feedback(self, query_id: str, correct: bool) -> FeedbackOutcome:
        """A grader's verdict on an answered query's answer: `applied` when the policy still
        holds what it observed of the query (and corrects what it learned), else
        `unknown_id`."""
        ...


class ClearPolicy:
    """CLEAR: give each query its own curve (per-query difficulty model, learned online), probe
    the ones worth it, condition on the probe, price tokens, fund the solvent."""

    name = "clear"

    def __init__(
        self,
        plan: ProbePlan,
        *,
        model: DifficultyModel | None = None,
        tag_budgets: TagBudgets | None = None,
        tag_metrics: TagMetrics | None = None,
        allocator: CvxpyAllocator | None = None,
        remember_queries: int = 0,
        max_tokens_per_query: int = SELECTION_HORIZON,
        adaptive_probes: bool = True,
    ) -> None:
        """`model`: the per-query difficulty model (default: a fresh one, learning from
        nothing).

        `remember_queries`: how many recent queries' observations to keep for graded
        feedback (`feedback`; `daemon.core.feedback.DEFAULT_REMEMBERED_QUERIES` when a
        feedback topic is configured); 0 keeps none and every grade is `unknown_id`.

        `tag_budgets`: shares of each window's budget reserved per tag value (see
        `daemon.core.tags`); `tag_metrics` then gets each window's per-tag prices. Tagged
        windows are solved with cvxpy on `allocator`, one per policy (so per process): each
        size bucket compiles once and is then re-solved with new parameters.

        `max_tokens_per_query`: the daemon's cap on one query's tokens; probe selection values
        a query at most that far (and never past `SELECTION_HORIZON`).

        `adaptive_probes`: a query predicted to finish within the plan's probe gets a probe that
        just covers it (`solver.query_fit.probe_lengths`); False: every probe is the plan's."""
        self._plan = plan
        self._horizon = min(max_tokens_per_query, SELECTION_HORIZON)
        self._adaptive_probes = adaptive_probes
        self.model = model or DifficultyModel()
        self.tag_budgets = tag_budgets
        self._tag_metrics = tag_metrics
        self._allocator = allocator
        self.recent: RecentQueries[Observation] | None = (
            RecentQueries(remember_queries) if remember_queries > 0 else None
        )

    def prepare(self) -> None:
        """Load and run once what tagged windows need (cvxpy: about a second to import, and a
        first solve), so the first one does not hold the event loop. Thread-safe to call
        before any window runs."""
        self.allocator.warm_up(len(self.tag_budgets.entries) if self.tag_budgets else 1)

    @property
    def allocator(self) -> CvxpyAllocator:
        """The long-lived allocator (made on the first tagged window, or by `prepare`)."""
        if self._allocator is None:
            self._allocator = CvxpyAllocator()
        return self._allocator

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        if not self._plan.enabled:
            return ProbeSelection.everyone(self._plan, len(requests))
        groups = self._groups(requests)
        rows = self.tag_budgets.rows(groups, budget) if self.tag_budgets and groups else None
        # Queries the window would abandon on their own prior curves (within their tag's row,
        # and their own max_tokens) are not worth a probe.
        caps = [min(r.max_tokens or self._horizon, self._horizon) for r in requests]
        infos, tags = [query_info(r) for r in requests], groups if rows else None
        tag_budgets = rows.budgets if rows else None
        if self._adaptive_probes:
            selected, lengths = plan_probes(infos, budget, self.model, self._plan, max_tokens=caps,
                                            tags=tags, tag_budgets=tag_budgets)  # fmt: skip
            return ProbeSelection(self._plan, selected, lengths)
        selected = select_queries(
            infos, budget, self.model, max_tokens=caps, probe_cost=self._plan.max_cost,
            tags=tags, tag_budgets=tag_budgets,
        )  # fmt: skip
        return ProbeSelection(self._plan, selected)

    def _groups(self, requests: Sequence[QueryRequest]) -> list[str]:
        if self.tag_budgets is None:
            return []
        return [self.tag_budgets.group_of(r.tags) for r in requests]

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        if not queries:
            return Decision.caps(np.zeros(0, np.int64), "none")
        started = time.perf_counter()
        window = fit_queries(
            [q.outcomes for q in queries],
            [query_info(q.request) for q in queries],
            self._plan,
            self.model,
            probe_tokens=[q.probe_length or self._plan.tokens for q in queries],
        )
        fitted = window.fit
        answer_now = tuple(fitted.answer_now)
        chains = (tuple(fitted.continue_from.tolist()), tuple(fitted.fallback_answer))
        todo = np.array([a is None for a in answer_now], dtype=bool)
        tokens = np.zeros(len(queries), np.int64)
        if not todo.any():
            return Decision(tokens, answer_now, *chains, 0.0, "none")
        index = np.flatnonzero(todo)
        groups = self._groups([q.request for q in queries])
        rows = None
        if self.tag_budgets is not None:
            # Every live query's probe counts against its group's share, answered or not; a
            # group with nothing left to allocate leaves its share to the pool.
            probes: dict[str, float] = {}
            for group, query in zip(groups, queries, strict=True):
                probes[group] = probes.get(group, 0.0) + query.probe_tokens
            rows = self.tag_budgets.rows([groups[i] for i in index], budget, probes)
        result, tag_budgets, problem = self._allocate(queries, index, window, budget, groups, rows)
        tokens[index] = result.token_allocations()
        tag_prices = {
            key: result.shadow_price + result.tag_prices.get(key, 0.0) for key in tag_budgets
        }
        if self._tag_metrics is not None:
            self._tag_metrics.record_prices(result.shadow_price, tag_prices)
        # The reported time covers the whole decision: curves, price, fits and the solve.
        elapsed_ms = (time.perf_counter() - started) * 1e3
        return Decision(
            tokens, answer_now, *chains, result.shadow_price, result.solver, elapsed_ms,
            result.fallbacks, tag_budgets, tag_prices, _solved_curves(len(queries), index, problem),
            continuation=self.continuation_gain,
            groups=tuple(groups) if rows is not None else (),
            fallback_reason=result.fallback_reason,
        )  # fmt: skip

    def _allocate(
        self,
        queries: Sequence[QueryView],
        index: NDArray[np.int64],
        window: CurveWindow,
        budget: float,
        groups: Sequence[str],
        rows: TagRows | None,
    ) -> tuple[AllocationResult, dict[str, float], WindowProblem]:
        """The window's allocation, the tag rows it was solved on and the problem solved (its
        curves); solved again on rebalanced rows if the first solve broke a reserve or left
        one idle while another group wanted more (`TagRows.rebalance`)."""
        fitted = window.fit
        cap = np.array([queries[i].cap_left for i in index], np.float64)
        tags = [groups[i] for i in index] if rows is not None else None
        solved: list[WindowProblem] = []

        def solve(tag_budgets: Mapping[str, float] | None) -> AllocationResult:
            problem = curve_problem(
                [queries[i].request.id for i in index], window.budgets, window.utility[index],
                budget, weight=[queries[i].request.weight for i in index], cap=cap,
                envelope=(fitted.a[index], fitted.tau[index], fitted.beta[index]),
                tags=tags, tag_budgets=tag_budgets,
            )  # fmt: skip
            solved.append(problem)
            return solve_window(problem, allocator=self.allocator if tag_budgets else None)

        if rows is None or tags is None:
            return solve(None), {}, solved[-1]
        result = solve(rows.budgets)
        allocated: dict[str, float] = {}
        wants_more: set[str] = set()
        for group, tokens, limit in zip(tags, result.allocations, cap, strict=True):
            allocated[group] = allocated.get(group, 0.0) + float(tokens)
            if tokens < limit - 1.0:
                wants_more.add(group)
        rebalanced = rows.rebalance(allocated, wants_more)
        if rebalanced is None:
            return result, rows.budgets, solved[-1]
        return solve(rebalanced), rebalanced, solved[-1]

    def continuation_gain(
        self,
        request: QueryRequest,
        outcomes: Sequence[ProbeOutcome],
        continued: int,
        chain_tokens: int,
        extras: Sequence[int],
    ) -> Sequence[float]:
        """`ContinuationGain` on the curve the window priced the query on, given the chain
        survived `chain_tokens` (the answer rate falls with length, so a long chain's next
        tokens are worth less than a fresh one's); `solver.query_fit.continuation_chance`."""
        chances = continuation_chance(
            self.model, query_info(request), outcomes, continued, chain_tokens, extras
        )
        return chances.tolist()

    def observe(
        self,
        request: QueryRequest,
        chain_tokens: int,
        *,
        finished: bool,
        answered: bool,
        answer: str | None = None,
    ) -> None:
        observed = self.model.observe(
            query_info(request), chain_tokens, finished=finished, answered=answered, answer=answer
        )
        if self.recent is not None:
            self.recent.add(request.id, observed)

    def feedback(self, query_id: str, correct: bool) -> FeedbackOutcome:
        """Correctness replaces "an answer was extracted" in what the query's chains taught
        the model (`DifficultyModel.grade`: a wrong answer is re-counted as none, a right one
        stays); the query is then forgotten, so a repeated grade is `unknown_id`."""
        observed = self.recent.pop(query_id) if self.recent is not None else None
        if observed is None:
            return "unknown_id"
        self.model.grade(observed, correct)
        return "applied"


def _solved_curves(
    n: int, index: NDArray[np.int64], problem: WindowProblem
) -> tuple[Curve | None, ...]:
    """Per live query, the curve `problem` priced it on (None for queries not in it)."""
    curves: list[Curve | None] = [None] * n
    for k, i in enumerate(index.tolist()):
        a, tau, beta = float(problem.a[k]), float(problem.tau[k]), float(problem.beta[k])
        curves[i] = Curve(A=a, tau=tau, beta=beta)
    return tuple(curves)


def query_info(request: QueryRequest) -> QueryInfo:
    """What the difficulty model may read of a request: prompt, tags, hint (never its id)."""
    return QueryInfo(request.prompt, request.tags, request.difficulty_hint)


class _FixedCaps:
    """A baseline: no probe, a cap per query, nothing learned."""

    def probe_plan(self, requests: Sequence[QueryRequest], budget: float) -> ProbeSelection:
        return ProbeSelection.everyone(NO_PROBE, len(requests))

    def observe(
        self,
        request: QueryRequest,
        chain_tokens: int,
        *,
        finished: bool,
        answered: bool,
        answer: str | None = None,
    ) -> None:
        """Baselines learn nothing."""

    def feedback(self, query_id: str, correct: bool) -> FeedbackOutcome:
        """Baselines remember nothing to grade."""
        return "unknown_id"


class UniformPolicy(_FixedCaps):
    """One cap for every query; with no fixed cap, the window budget split evenly."""

    name = "uniform"

    def __init__(self, cap: int | None = None) -> None:
        self._cap = cap

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        cap = self._cap if self._cap is not None else int(budget // max(len(queries), 1))
        tokens = np.array([min(cap, q.cap_left) for q in queries], np.int64)
        return Decision.caps(tokens, "uniform")


class OraclePolicy(_FixedCaps):
    """Per-query caps chosen knowing the recorded samples (replay only: a ceiling, not a method)."""

    name = "oracle"

    def __init__(self, caps_by_id: Mapping[str, int]) -> None:
        self._caps = caps_by_id

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        tokens = np.array([min(self._caps.get(q.request.id, 0), q.cap_left) for q in queries])
        return Decision.caps(tokens.astype(np.int64), "oracle")
