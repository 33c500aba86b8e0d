"""The window allocation problem and its result, as frozen dataclasses over numpy arrays."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
NO_TAG = -1  # tag_index of a query whose tag has no budget of its own


class ProblemError(ValueError):
    """Invalid window input; `field` names the offending field (e.g. ``queries[3].beta``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class WindowProblem:
    """One window: per-query curves (A, τ, β), weights, caps and tags; a budget; tag budgets.

    Build it with `WindowProblem.create`, which validates every field. `cap` is +inf where a query
    has none; `tag_index[i]` indexes `tag_names` (or is NO_TAG when its tag has no budget).
    """

    ids: tuple[str, ...]
    a: FloatArray
    tau: FloatArray
    beta: FloatArray
    weight: FloatArray
    cap: FloatArray
    tags: tuple[str | None, ...]
    budget: float
    tag_budgets: Mapping[str, float]
    tag_names: tuple[str, ...] = field(init=False)
    tag_index: NDArray[np.int64] = field(init=False)

    def __post_init__(self) -> None:
        names, index = tag_rows(self.tags, self.tag_budgets)
        object.__setattr__(self, "tag_names", names)
        object.__setattr__(self, "tag_index", index)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def tag_budget_array(self) -> FloatArray:
        """Budgets of `tag_names`, in that order."""
        return np.array([self.tag_budgets[name] for name in self.tag_names], dtype=np.float64)

    @classmethod
    def create(
        cls,
        ids: Sequence[str],
        a: ArrayLike,
        tau: ArrayLike,
        beta: ArrayLike,
        budget: float,
        *,
        weight: ArrayLike | None = None,
        cap: ArrayLike | None = None,
        tags: Sequence[str | None] | None = None,
        tag_budgets: Mapping[str, float] | None = None,
    ) -> WindowProblem:
        """Validate and freeze; raises ProblemError naming the first bad field."""
        ids = tuple(ids)
        n = len(ids)
        _check_ids(ids)
        arrays = {
            "A": _float_array("A", a, n),
            "tau": _float_array("tau", tau, n),
            "beta": _float_array("beta", beta, n),
            "weight": _float_array("weight", 1.0 if weight is None else weight, n),
            "cap": _float_array("cap", np.inf if cap is None else cap, n),
        }
        _check_range(ids, "A", arrays["A"], lambda x: (x >= 0) & (x <= 1), "must be in [0, 1]")
        _check_range(ids, "tau", arrays["tau"], _finite_nonneg, "must be finite and >= 0")
        _check_range(ids, "beta", arrays["beta"], _finite_pos, "must be finite and > 0")
        _check_range(ids, "weight", arrays["weight"], _finite_nonneg, "must be finite and >= 0")
        _check_range(ids, "cap", arrays["cap"], lambda x: x >= 0, "must be >= 0")
        tag_tuple = _check_tags(tags, n)
        budgets = _check_budgets(budget, tag_budgets)
        for arr in arrays.values():
            arr.setflags(write=False)
        return cls(
            ids=ids,
            a=arrays["A"],
            tau=arrays["tau"],
            beta=arrays["beta"],
            weight=arrays["weight"],
            cap=arrays["cap"],
            tags=tag_tuple,
            budget=float(budget),
            tag_budgets=MappingProxyType(budgets),
        )

    def with_weight(self, index: int, weight: float) -> WindowProblem:
        """A copy with one query's weight changed (used by what-if analyses and tests)."""
        new = self.weight.copy()
        new[index] = weight
        return self._replace_arrays(weight=new)

    def with_budget(self, budget: float) -> WindowProblem:
        return WindowProblem.create(
            self.ids, self.a, self.tau, self.beta, budget, weight=self.weight, cap=self.cap,
            tags=self.tags, tag_budgets=self.tag_budgets,
        )  # fmt: skip

    def _replace_arrays(self, *, weight: FloatArray) -> WindowProblem:
        return WindowProblem.create(
            self.ids, self.a, self.tau, self.beta, self.budget, weight=weight, cap=self.cap,
            tags=self.tags, tag_budgets=self.tag_budgets,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class AllocationResult:
    """What the solver decided for one window.

    allocations: tokens per query (floats; `token_allocations` floors them, never over budget).
    abandoned: True where a query gets nothing (insolvent at the shadow price, or the chord query
        the budget could not fund).
    shadow_price: λ, the dual of the window budget row (value per token at the margin).
    objective: Σ weight·U(allocation) of the returned allocation.
    relaxed_objective: the envelope relaxation's optimum (an upper bound on any allocation).
    tag_prices: extra price per token of each tag whose budget binds (0 where it is slack).
    fallbacks: 1 when the requested solver failed and the closed form answered instead.
    """

    ids: tuple[str, ...]
    allocations: FloatArray
    abandoned: NDArray[np.bool_]
    shadow_price: float
    objective: float
    relaxed_objective: float
    tag_prices: Mapping[str, float]
    solver: str
    solve_ms: float
    budget: float = math.inf
    fallbacks: int = 0
    fallback_reason: str | None = None

    @property
    def fell_back(self) -> bool:
        return self.fallbacks > 0

    def token_allocations(self) -> NDArray[np.int64]:
        """Whole tokens: floored (forgiving float dust just below an integer), within budget."""
        tokens = np.floor(self.allocations + 1e-6).astype(np.int64)
        while tokens.sum() > self.budget:  # dust forgiven on many queries can add up to a token
            tokens[np.argmax(tokens)] -= 1
        return tokens

    def to_contract(self) -> dict[str, object]:
        """The `clearbudget solve` output JSON (DESIGN.md contract) plus tag prices."""
        tokens = self.token_allocations()
        return {
            "shadow_price": self.shadow_price,
            "objective": self.objective,
            "allocations": {qid: int(tok) for qid, tok in zip(self.ids, tokens, strict=True)},
            "abandoned": [qid for qid, gone in zip(self.ids, self.abandoned, strict=True) if gone],
            "solver": self.solver,
            "solve_ms": self.solve_ms,
            "tag_prices": dict(self.tag_prices),
            "fallbacks": self.fallbacks,
        }


def tag_rows(
    tags: Sequence[str | None], tag_budgets: Mapping[str, float]
) -> tuple[tuple[str, ...], NDArray[np.int64]]:
    """The tags that get a budget row (those with a budget and at least one query, sorted) and
    each query's row (NO_TAG where its tag has none)."""
    names = tuple(sorted({t for t in tags if t is not None and t in tag_budgets}))
    lookup = {name: k for k, name in enumerate(names)}
    index = np.array([lookup.get(t, NO_TAG) if t else NO_TAG for t in tags], np.int64)
    return names, index


def _finite_nonneg(x: FloatArray) -> NDArray[np.bool_]:
    return np.isfinite(x) & (x >= 0)


def _finite_pos(x: FloatArray) -> NDArray[np.bool_]:
    return np.isfinite(x) & (x > 0)


def _check_ids(ids: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for i, qid in enumerate(ids):
        if not isinstance(qid, str) or not qid:
            raise ProblemError(f"queries[{i}].id", f"must be a non-empty string, got {qid!r}")
        if qid in seen:
            raise ProblemError(f"queries[{i}].id", f"duplicate id {qid!r}")
        seen.add(qid)


def _float_array(name: str, values: ArrayLike, n: int) -> FloatArray:
    try:
        arr = np.array(np.broadcast_to(np.asarray(values, dtype=np.float64), (n,)))
    except (TypeError, ValueError) as exc:
        raise ProblemError(name, f"expected {n} numbers ({exc})") from None
    return arr


def _check_range(ids: tuple[str, ...], name: str, arr: FloatArray, ok, rule: str) -> None:
    bad = np.flatnonzero(~ok(arr))
    if bad.size:
        i = int(bad[0])
        raise ProblemError(f"queries[{i}].{name}", f"{rule}, got {float(arr[i])!r} (id {ids[i]!r})")


def _check_tags(tags: Sequence[str | None] | None, n: int) -> tuple[str | None, ...]:
    if tags is None:
        return (None,) * n
    tag_tuple = tuple(tags)
    if len(tag_tuple) != n:
        raise ProblemError("tag", f"expected {n} tags, got {len(tag_tuple)}")
    for i, tag in enumerate(tag_tuple):
        if tag is not None and not isinstance(tag, str):
            raise ProblemError(f"queries[{i}].tag", f"must be a string or null, got {tag!r}")
    return tag_tuple


def _check_budgets(budget: float, tag_budgets: Mapping[str, float] | None) -> dict[str, float]:
    if not _is_finite_nonneg_number(budget):
        raise ProblemError("budget", f"must be a finite number >= 0, got {budget!r}")
    checked: dict[str, float] = {}
    for tag, tag_budget in (tag_budgets or {}).items():
        if not isinstance(tag, str):
            raise ProblemError("tag_budgets", f"keys must be strings, got {tag!r}")
        if not _is_finite_nonneg_number(tag_budget):
            raise ProblemError(
                f"tag_budgets.{tag}", f"must be a finite number >= 0, got {tag_budget!r}"
            )
        checked[tag] = float(tag_budget)
    return checked


def _is_finite_nonneg_number(x: object) -> bool:
    if isinstance(x, bool) or not isinstance(x, int | float | np.floating | np.integer):
        return False
    return math.isfinite(float(x)) and float(x) >= 0
