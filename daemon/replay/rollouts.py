"""Recorded rollout pools (`rollouts.jsonl`) and the policy maths on them.

A pool holds, per (model, problem) record, the token counts and grades of a few sampled reasoning
chains. The truncation rule (see data/README.md): under a cap b a chain is answered iff
`tokens <= b`, and then right iff `correct`; a chain cut at b has no answer and costs b tokens.
So a record's expected accuracy at cap b is `mean(tokens <= b and correct)` and its expected cost
`mean(min(tokens, b))`.

The uniform policy gives every record one cap; the oracle picks per-record caps knowing the
recorded samples, maximising total expected accuracy under a total expected-cost budget. The
oracle is solved exactly as the LP relaxation of a multiple-choice knapsack: greedy over the
segments of each record's upper concave hull of (cost, accuracy) at the candidate caps
{0} ∪ {sample lengths} (at most one record ends between two hull vertices).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from clearbudget.daemon.replay.files import (
    InputFileError,
    json_lines,
    json_object,
    non_negative_int,
)

__all__ = [
    "OracleAllocation",
    "PolicyPoint",
    "RolloutPool",
    "RolloutRecord",
    "RolloutSample",
    "draw_counts",
    "expected_accuracy",
    "expected_cost",
    "load_rollouts",
    "oracle_allocation",
    "parse_rollout_line",
    "uniform_at_cost",
    "uniform_cap_for_cost",
    "uniform_curve",
    "uniform_point",
]

# Keys end up inside simulator markers (`<<sim chain=KEY#i at=n>>`), so keep them marker-safe;
# a problem id also may not contain '/', so `model/problem_id` keys stay unambiguous.
_MODEL_SAFE = re.compile(r"^[^\s#<>]+$")
_PROBLEM_SAFE = re.compile(r"^[^\s#<>/]+$")


@dataclass(frozen=True, slots=True)
class RolloutSample:
    """One recorded chain: its length in completion tokens, grade and final answer."""

    tokens: int
    correct: bool
    answer: str | None


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """One (model, problem) pair with its recorded chains."""

    model: str
    benchmark: str
    problem_id: str
    prompt_tokens: int
    gold: str
    samples: tuple[RolloutSample, ...]

    @property
    def key(self) -> str:
        """Unique record key, e.g. `DS-R1-7B-TLDR/amc23-8`."""
        return f"{self.model}/{self.problem_id}"


@dataclass(frozen=True, slots=True)
class PolicyPoint:
    """Mean expected cost (tokens per query) and mean expected accuracy of a policy."""

    tokens_per_query: float
    accuracy: float


@dataclass(frozen=True, slots=True)
class OracleAllocation:
    """The oracle's per-record caps at a tokens-per-query budget.

    `accuracy` is the exact LP optimum (reached by randomising one record between two caps);
    `caps` are the integral, budget-feasible caps (that record at its lower cap), whose value is
    `caps_accuracy` at `caps_tokens_per_query`. `price` is the accuracy per token of the last
    segment bought: the oracle's shadow price.
    """

    caps: NDArray[np.int64]
    accuracy: float
    tokens_per_query: float
    caps_accuracy: float
    caps_tokens_per_query: float
    price: float


class RolloutPool:
    """An immutable rollout pool with (records × samples) numpy views for the policy maths."""

    def __init__(self, records: Sequence[RolloutRecord], source: str = "<memory>") -> None:
        if not records:
            raise InputFileError(source, None, None, "no records")
        width = len(records[0].samples)
        for r in records:
            if len(r.samples) != width or width == 0:
                raise InputFileError(
                    source, None, "samples", f"record {r.key!r}: every record needs {width} samples"
                )
        self.records: tuple[RolloutRecord, ...] = tuple(records)
        self.source = source
        self.tokens: NDArray[np.int64] = np.array(
            [[s.tokens for s in r.samples] for r in records], dtype=np.int64
        ).reshape(len(records), width)
        self.correct: NDArray[np.bool_] = np.array(
            [[s.correct for s in r.samples] for r in records], dtype=bool
        ).reshape(len(records), width)
        self._index = {r.key: i for i, r in enumerate(records)}
        self._by_problem: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            self._by_problem.setdefault(r.problem_id, []).append(i)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[RolloutRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> RolloutRecord:
        return self.records[index]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.model for r in self.records))

    def index_of(self, key: str) -> int:
        """Index of the record with this key; KeyError if absent."""
        return self._index[key]

    def get(self, key: str) -> RolloutRecord | None:
        i = self._index.get(key)
        return None if i is None else self.records[i]

    def indices_for_problem(self, problem_id: str) -> tuple[int, ...]:
        """Indices of every model's record for a problem id (empty if unknown)."""
        return tuple(self._by_problem.get(problem_id, ()))


# --------------------------------------------------------------------------- loading


def load_rollouts(path: str | Path) -> RolloutPool:
    """Load and validate a rollouts.jsonl pool; InputFileError names file, line and field."""
    p = Path(path)
    records: list[RolloutRecord] = []
    seen: dict[str, int] = {}
    for line_no, obj in json_lines(p, "rollouts"):
        record = _record(obj, line_no, str(p))
        _check_consistent(record, records, seen, line_no, str(p))
        seen[record.key] = line_no
        records.append(record)
    return RolloutPool(records, source=str(p))


def _check_consistent(
    record: RolloutRecord,
    records: Sequence[RolloutRecord],
    seen: dict[str, int],
    line: int,
    source: str,
) -> None:
    if record.key in seen:
        raise InputFileError(
            source, line, "problem_id", f"duplicate record {record.key!r} (line {seen[record.key]})"
        )
    if records and len(record.samples) != len(records[0].samples):
        raise InputFileError(
            source,
            line,
            "samples",
            f"has {len(record.samples)} samples; the pool's records have "
            f"{len(records[0].samples)} (all records must have the same number)",
        )


def parse_rollout_line(text: str, *, line: int = 1, source: str = "<string>") -> RolloutRecord:
    """Parse one rollouts.jsonl line into a validated record."""
    return _record(json_object(text, source, line), line, source)


def _record(obj: dict[str, Any], line: int, source: str) -> RolloutRecord:
    model = _key_part(obj, "model", _MODEL_SAFE, line, source)
    problem_id = _key_part(obj, "problem_id", _PROBLEM_SAFE, line, source)
    benchmark = _typed(obj, "benchmark", str, line, source)
    gold = _typed(obj, "gold", str, line, source)
    prompt_tokens = _count(obj, "prompt_tokens", line, source)
    raw_samples = obj.get("samples")
    if not isinstance(raw_samples, list) or not raw_samples:
        raise InputFileError(source, line, "samples", "must be a non-empty list")
    samples = tuple(
        _parse_sample(s, f"samples[{i}]", line, source) for i, s in enumerate(raw_samples)
    )
    return RolloutRecord(model, benchmark, problem_id, prompt_tokens, gold, samples)


def _parse_sample(obj: Any, where: str, line: int, source: str) -> RolloutSample:
    if not isinstance(obj, dict):
        raise InputFileError(source, line, where, "must be an object")
    tokens = _count(obj, "tokens", line, source, prefix=where)
    correct = obj.get("correct")
    if not isinstance(correct, bool):
        raise InputFileError(source, line, f"{where}.correct", "must be true or false")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise InputFileError(source, line, f"{where}.answer", "must be a string or null")
    return RolloutSample(tokens=tokens, correct=correct, answer=answer)


def _typed(obj: dict[str, Any], field: str, kind: type, line: int, source: str) -> Any:
    value = obj.get(field)
    if not isinstance(value, kind):
        raise InputFileError(source, line, field, f"missing or not a {kind.__name__}")
    return value


def _key_part(
    obj: dict[str, Any], field: str, pattern: re.Pattern[str], line: int, source: str
) -> str:
    value = _typed(obj, field, str, line, source)
    if not pattern.match(value):
        banned = "'#', '<', '>'" + (", '/'" if "/" in pattern.pattern else "")
        raise InputFileError(
            source, line, field, f"must be non-empty, without whitespace, {banned}"
        )
    return str(value)


def _count(obj: dict[str, Any], field: str, line: int, source: str, prefix: str = "") -> int:
    return non_negative_int(obj.get(field), source, line, f"{prefix}.{field}" if prefix else field)


# --------------------------------------------------------------------------- policy maths


def expected_accuracy(
    tokens: NDArray[np.int64], correct: NDArray[np.bool_], caps: ArrayLike
) -> NDArray[np.float64]:
    """Per-record expected accuracy at caps (scalar, or one per record; broadcasts leading axes)."""
    b = np.asarray(caps, dtype=np.float64)[..., None]
    return np.mean((tokens <= b) & correct, axis=-1)


def expected_cost(tokens: NDArray[np.int64], caps: ArrayLike) -> NDArray[np.float64]:
    """Per-record expected generated tokens at caps: mean(min(tokens, cap))."""
    b = np.asarray(caps, dtype=np.float64)[..., None]
    return np.mean(np.minimum(tokens, b), axis=-1)


def uniform_point(pool: RolloutPool, cap: float) -> PolicyPoint:
    """Mean cost and accuracy when every record gets the same cap."""
    return PolicyPoint(
        tokens_per_query=float(expected_cost(pool.tokens, cap).mean()),
        accuracy=float(expected_accuracy(pool.tokens, pool.correct, cap).mean()),
    )


def uniform_curve(
    pool: RolloutPool, caps: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(tokens_per_query, accuracy) arrays of the uniform policy at each cap in `caps`."""
    b = np.asarray(caps, dtype=np.float64).reshape(-1, 1)  # (K, 1) against (R, S) below
    flat_t = pool.tokens.reshape(1, -1)
    flat_c = pool.correct.reshape(1, -1)
    cost = np.minimum(flat_t, b).mean(axis=1)
    acc = ((flat_t <= b) & flat_c).mean(axis=1)
    return cost, acc


def uniform_cap_for_cost(pool: RolloutPool, tokens_per_query: float) -> float:
    """The uniform cap whose mean expected cost equals `tokens_per_query` (exact inversion).

    Mean cost is piecewise linear and increasing in the cap up to the longest chain; a budget at or
    above the uncapped mean returns the longest chain's length.
    """
    if tokens_per_query < 0:
        raise ValueError("tokens_per_query must be non-negative")
    t = np.sort(pool.tokens.ravel()).astype(np.float64)
    n = t.size
    # Mean cost with the cap at each chain length t[j]: (sum of t[:j+1] + t[j] * (n-j-1)) / n.
    cost_at = (np.cumsum(t) + t * (n - 1 - np.arange(n))) / n
    if tokens_per_query >= cost_at[-1]:
        return float(t[-1])
    j = int(np.searchsorted(cost_at, tokens_per_query, side="left"))
    lo_cap, lo_cost = (0.0, 0.0) if j == 0 else (t[j - 1], cost_at[j - 1])
    slope = (n - j) / n  # fraction of chains longer than the cap on this piece
    return float(lo_cap + (tokens_per_query - lo_cost) / slope)


def uniform_at_cost(pool: RolloutPool, tokens_per_query: float) -> PolicyPoint:
    """Cost-matched uniform: the uniform policy spending exactly `tokens_per_query`."""
    return uniform_point(pool, uniform_cap_for_cost(pool, tokens_per_query))


@dataclass(frozen=True, slots=True)
class _Segments:
    """All records' hull segments, sorted by accuracy per token (best first)."""

    record: NDArray[np.int64]
    to_cap: NDArray[np.int64]
    d_cost: NDArray[np.float64]
    d_acc: NDArray[np.float64]


def _record_hull(
    caps: NDArray[np.int64], cost: NDArray[np.float64], acc: NDArray[np.float64]
) -> list[int]:
    """Indices of the upper concave hull of points sorted by cost, from the origin point."""
    hull: list[int] = [0]
    for j in range(1, len(caps)):
        if cost[j] <= cost[hull[-1]]:  # same cost (tied lengths): keep the better accuracy
            if acc[j] > acc[hull[-1]]:
                hull[-1] = j
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Keep b only if it lies strictly above the chord from a to j.
            rise_ab, rise_aj = acc[b] - acc[a], acc[j] - acc[a]
            above = rise_ab * (cost[j] - cost[a]) - rise_aj * (cost[b] - cost[a])
            if above > 0:
                break
            hull.pop()
        hull.append(j)
    return hull


def _hull_segments(pool: RolloutPool) -> _Segments:
    t = np.sort(pool.tokens, axis=1)
    caps = np.concatenate([np.zeros((len(pool), 1), dtype=np.int64), t], axis=1)  # (R, S+1)
    cost = expected_cost(pool.tokens[:, None, :], caps)
    acc = expected_accuracy(pool.tokens[:, None, :], pool.correct[:, None, :], caps)
    rec, to_cap, d_cost, d_acc = [], [], [], []
    for i in range(len(pool)):
        hull = _record_hull(caps[i], cost[i], acc[i])
        for a, b in itertools.pairwise(hull):
            gain = acc[i, b] - acc[i, a]
            if gain <= 0:  # flat tail: more tokens buy nothing
                break
            rec.append(i)
            to_cap.append(caps[i, b])
            d_cost.append(cost[i, b] - cost[i, a])
            d_acc.append(gain)
    d_cost_a = np.array(d_cost, dtype=np.float64)
    d_acc_a = np.array(d_acc, dtype=np.float64)
    # Stable sort by slope; within a record hull slopes strictly decrease, so order is kept.
    order = np.argsort(-d_acc_a / d_cost_a, kind="stable")
    return _Segments(
        record=np.array(rec, dtype=np.int64)[order],
        to_cap=np.array(to_cap, dtype=np.int64)[order],
        d_cost=d_cost_a[order],
        d_acc=d_acc_a[order],
    )


def oracle_allocation(
    pool: RolloutPool, tokens_per_query: float, weights: ArrayLike | None = None
) -> OracleAllocation:
    """Per-record caps maximising mean expected accuracy at a mean expected cost budget.

    `weights` (one per record, e.g. how often a replay drew it) weight both accuracy and cost;
    the budget is `tokens_per_query × sum(weights)` and the figures are weighted means.
    """
    if tokens_per_query < 0:
        raise ValueError("tokens_per_query must be non-negative")
    w = _weights(pool, weights)
    total_w = float(w.sum())
    seg = _hull_segments(pool)
    live = w[seg.record] > 0
    rec, to_cap = seg.record[live], seg.to_cap[live]
    d_cost = seg.d_cost[live] * w[rec]
    d_acc = seg.d_acc[live] * w[rec]
    budget = tokens_per_query * total_w
    spent = np.cumsum(d_cost)
    full = int(np.searchsorted(spent, budget, side="right"))  # segments bought whole
    caps = np.zeros(len(pool), dtype=np.int64)
    caps[rec[:full]] = to_cap[:full]  # per-record segments are in order, last write wins
    whole_acc = float(d_acc[:full].sum())
    whole_cost = float(spent[full - 1]) if full else 0.0
    acc, price = whole_acc, 0.0
    if full < len(d_cost):
        fraction = (budget - whole_cost) / d_cost[full]
        acc += fraction * float(d_acc[full])
        price = float(d_acc[full] / d_cost[full])
    return OracleAllocation(
        caps=caps,
        accuracy=acc / total_w,
        tokens_per_query=min(budget, float(spent[-1]) if len(spent) else 0.0) / total_w,
        caps_accuracy=whole_acc / total_w,
        caps_tokens_per_query=whole_cost / total_w,
        price=price,
    )


def _weights(pool: RolloutPool, weights: ArrayLike | None) -> NDArray[np.float64]:
    if weights is None:
        return np.ones(len(pool), dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(pool),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError("weights must be one non-negative finite number per record, not all 0")
    return w


def draw_counts(pool: RolloutPool, keys: Iterable[str]) -> NDArray[np.float64]:
    """How many times each record appears in `keys` (weights for `oracle_allocation`)."""
    counts = np.zeros(len(pool), dtype=np.float64)
    for key in keys:
        counts[pool.index_of(key)] += 1
    return counts
