"""What a replay runs (policy, budget, windows) and on what (arrivals drawn from a rollout pool),
and the one budget-span rule every replay path shares.

The budget span rule: a trace "lasts" from its first to its last arrival, at least one window.
A budget given per query earns `budget_per_query × queries / span` tokens per second over it; a
budget given as `tokens_per_second` earns that. In-process replay, replay through Kafka and the
demo all size their budgets with `trace_span`, `token_rate` and `tokens_per_query` below.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clearbudget.daemon.core.budget import BudgetLedger
from clearbudget.daemon.core.feedback import DEFAULT_REMEMBERED_QUERIES
from clearbudget.daemon.core.policies import (
    AllocationPolicy,
    ClearPolicy,
    OraclePolicy,
    UniformPolicy,
)
from clearbudget.daemon.core.ports import (
    BUDGET_MODES,
    DEFAULT_THINKING_ANSWER_TOKENS,
    BudgetMode,
    answer_allowance,
)
from clearbudget.daemon.replay.files import InputFileError, json_lines
from clearbudget.daemon.replay.rollouts import (
    RolloutPool,
    draw_counts,
    oracle_allocation,
    uniform_cap_for_cost,
)
from clearbudget.daemon.replay.simulator import prompt_for
from clearbudget.daemon.replay.traces import Arrival
from clearbudget.schemas.messages import QueryRequest
from clearbudget.solver.fit import ProbePlan

PolicyName = Literal["clear", "uniform", "oracle"]
POLICIES: tuple[PolicyName, ...] = ("clear", "uniform", "oracle")
# A chain may run this long in replay: longer than any recorded chain, so only budgets bind.
REPLAY_MAX_TOKENS = 1 << 16
DEFAULT_PROBE = ProbePlan(samples=1, tokens=256)


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    policy: PolicyName
    budget_per_query: float | None = None
    tokens_per_second: float | None = None
    seed: int = 0
    window_seconds: float = 2.0
    window_max_queries: int = 256
    probe: ProbePlan = DEFAULT_PROBE
    carry_over_windows: float = 1.0
    hint_field: str | None = None  # the record field replayed as difficulty_hint (None: none)
    # Graded feedback: each answered query's recorded grade reaches the policy this many trace
    # seconds after its window published it (in-process replay; `daemon.replay.inprocess`).
    feedback: bool = False
    feedback_delay: float = 0.0
    # How allocations bound chains (`daemon.core.ports.BudgetMode`); the simulator ends a
    # chain's thinking in "thinking" mode.
    budget_mode: BudgetMode = "max_tokens"
    thinking_answer_tokens: int = DEFAULT_THINKING_ANSWER_TOKENS
    adaptive_probes: bool = True  # clear: a probe length per query (`ClearPolicy`)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode: must be one of {', '.join(BUDGET_MODES)}, got "
                             f"{self.budget_mode!r}")  # fmt: skip
        if self.thinking_answer_tokens < 1:
            raise ValueError("thinking_answer_tokens: must be >= 1")
        if not (np.isfinite(self.feedback_delay) and self.feedback_delay >= 0):
            raise ValueError(f"feedback_delay: must be a finite number >= 0, got "
                             f"{self.feedback_delay!r}")  # fmt: skip
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if not (np.isfinite(self.window_seconds) and self.window_seconds > 0):
            raise ValueError(f"window_seconds: must be a finite number > 0, got "
                             f"{self.window_seconds!r}")  # fmt: skip
        if self.window_max_queries < 1:
            raise ValueError(f"window_max_queries: must be >= 1, got {self.window_max_queries}")
        if (self.budget_per_query is None) == (self.tokens_per_second is None):
            raise ValueError("give exactly one of budget_per_query or tokens_per_second")
        for name in ("budget_per_query", "tokens_per_second"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")

    @property
    def thinking_answer_allowance(self) -> int | None:
        """The pipeline's `thinking_answer_tokens`: None unless in thinking mode."""
        return answer_allowance(self.budget_mode, self.thinking_answer_tokens)


@dataclass(frozen=True, slots=True)
class ReplayQuery:
    arrival: float
    request: QueryRequest
    record: int  # index into the rollout pool


@dataclass(frozen=True, slots=True)
class RecordExtras:
    """Per pool record, what the pool loader does not keep: the problem text (the prompt a
    replayed query carries) and, when a hint field is named, that field as a hint in [0, 1]."""

    texts: tuple[str, ...]
    hints: tuple[float | None, ...] | None = None
    hint_field: str | None = None


def read_extras(path: str | Path, pool: RolloutPool, hint_field: str | None = None) -> RecordExtras:
    """Problem texts and hints of `pool`'s records from the pool file at `path`.

    A numeric hint field is rescaled to [0, 1] over the values the pool holds (the field's own
    range, e.g. MATH levels 1–5 → 0, ¼, …, 1); records without it get no hint. InputFileError
    when no record carries the field as a number.
    """
    raw: dict[str, dict[str, Any]] = {}
    for _, obj in json_lines(Path(path), "rollouts"):
        raw[f"{obj.get('model')}/{obj.get('problem_id')}"] = obj
    rows = [raw.get(r.key, {}) for r in pool.records]
    texts = tuple(str(row.get("problem") or "") for row in rows)
    if hint_field is None:
        return RecordExtras(texts)
    return RecordExtras(texts, _hint_values(rows, hint_field, path), hint_field)


def _hint_values(
    rows: Sequence[dict[str, Any]], field: str, path: str | Path
) -> tuple[float | None, ...]:
    values = [_number(row.get(field)) for row in rows]
    present = [v for v in values if v is not None]
    if not present:
        raise InputFileError(path, None, None, f"--hint-field {field!r}: no record has it as a "
                             "number")  # fmt: skip
    low, high = min(present), max(present)
    span = high - low
    return tuple(None if v is None else (v - low) / span if span else 0.5 for v in values)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def one_lap_error(pool: RolloutPool, arrivals: int) -> str | None:
    """Why `arrivals` queries cannot replay `pool` (None if they can): a record holding one
    chain would replay that identical chain on its second draw, so such a pool replays for at
    most one lap."""
    width = int(pool.tokens.shape[1])
    if width > 1 or arrivals <= len(pool):
        return None
    return (
        f"{pool.source} holds one chain per record: replay at most one lap ({len(pool)} "
        f"arrivals), got {arrivals}; pass --limit {len(pool)} or less"
    )


def draw_queries(
    arrivals: Iterable[Arrival],
    pool: RolloutPool,
    seed: int,
    extras: RecordExtras | None = None,
) -> list[ReplayQuery]:
    """One query per arrival, drawing pool records evenly: a seeded shuffle, reshuffled per lap.
    With `extras`, the prompt carries the record's problem text and, if hints were read, the
    request its difficulty_hint."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    queries = []
    for i, arrival in enumerate(arrivals):
        if not order:
            order = rng.permutation(len(pool)).tolist()
        index = order.pop()
        record = pool.records[index]
        text = extras.texts[index] if extras else ""
        hint = extras.hints[index] if extras and extras.hints else None
        request = QueryRequest(
            id=f"q{i:06d}",
            prompt=prompt_for(record, text),
            tags={"task": record.benchmark, "model": record.model},
            difficulty_hint=hint,
        )
        queries.append(ReplayQuery(arrival.arrival, request, index))
    return queries


# --------------------------------------------------------------------------- the budget rule


def trace_span(
    queries: Sequence[ReplayQuery], window_seconds: float, speedup: float = 1.0
) -> float:
    """Seconds from the first to the last arrival (replayed `speedup` times faster), at least
    `window_seconds`: the time a replay's budget accrues over."""
    span = (queries[-1].arrival - queries[0].arrival) / speedup if queries else 0.0
    return max(span, window_seconds)


def token_rate(config: ReplayConfig, queries: Sequence[ReplayQuery], speedup: float = 1.0) -> float:
    """Tokens per (wall-clock, at `speedup`) second that `config`'s budget earns on `queries`."""
    if config.tokens_per_second is not None:
        return config.tokens_per_second * speedup
    span = trace_span(queries, config.window_seconds)
    return float(config.budget_per_query or 0.0) * len(queries) / span * speedup


def tokens_per_query(config: ReplayConfig, queries: Sequence[ReplayQuery]) -> float:
    """The budget as tokens per query (what cost-matched uniform and the oracle are given)."""
    if config.budget_per_query is not None:
        return config.budget_per_query
    span = trace_span(queries, config.window_seconds)
    return token_rate(config, queries) * span / max(len(queries), 1)


def budget_ledger(config: ReplayConfig) -> BudgetLedger:
    """The in-process ledger: it earns per trace second, or per query when budgeted by count
    (then a window "lasts" as many units as it holds queries; see `ledger_span`)."""
    if config.tokens_per_second is not None:
        rate, window = config.tokens_per_second, config.window_seconds
    else:
        rate, window = float(config.budget_per_query or 0.0), float(config.window_max_queries)
    return BudgetLedger(rate, carry_over_cap_tokens=rate * window * config.carry_over_windows)


def ledger_span(config: ReplayConfig, duration: float, size: int) -> float:
    """What a window of `duration` seconds and `size` queries earns for on `budget_ledger`."""
    return duration if config.tokens_per_second is not None else size


# --------------------------------------------------------------------------- policies


def make_policy(
    config: ReplayConfig, pool: RolloutPool, queries: Sequence[ReplayQuery]
) -> AllocationPolicy:
    """The allocation policy `config` names; uniform and oracle are sized to the budget."""
    per_query = tokens_per_query(config, queries)
    if config.policy == "clear":
        remember = DEFAULT_REMEMBERED_QUERIES if config.feedback else 0
        return ClearPolicy(
            config.probe, remember_queries=remember, adaptive_probes=config.adaptive_probes
        )
    if config.policy == "uniform":
        # Cost-matched: the one cap whose expected cost per query equals the budget.
        if config.budget_per_query is None:
            return UniformPolicy()
        return UniformPolicy(round(uniform_cap_for_cost(pool, per_query)))
    weights = draw_counts(pool, [pool.records[q.record].key for q in queries])
    oracle = oracle_allocation(pool, per_query, weights=weights)
    return OraclePolicy({q.request.id: int(oracle.caps[q.record]) for q in queries})
