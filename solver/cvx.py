"""Window allocation with cvxpy: the envelope relaxation as a DPP problem, compiled once per size.

Each query's envelope is split into a chord part y ∈ [0, knee] worth v·s per token and a tail
t = β·z ∈ [0, β·(cap − knee)] worth tail·(1 − e^(−t)). Scaling tokens by the budget and values by
the window's total tail keeps the conic data near 1. Every per-window number is a `cp.Parameter`
(nonneg), so the problem is DPP: cvxpy canonicalises once per (size bucket, tag bucket) and a
re-solve only maps parameters to solver data. Windows are padded to the bucket with inert slots.

Formulations: "exp" (exponential cones: Clarabel, SCS, ECOS) is exact; "tangent" replaces the tail
by tangent cuts, an LP that HiGHS solves to a vertex (its λ is off by the cut spacing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cvxpy as cp
import numpy as np

from solver.curves import TAIL_HORIZON, Curves
from solver.problem import FloatArray
from solver.rounding import KNEE_RTOL, Relaxed, fill_chords

Formulation = Literal["exp", "tangent"]
_OK = {cp.OPTIMAL}
_SOLVER_OPTIONS: dict[str, dict[str, object]] = {
    "CLARABEL": {},
    "ECOS": {},
    "SCS": {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 20_000},
    "HIGHS": {},
}
_ZERO_RTOL = 1e-7  # below this fraction of the budget a relaxed allocation counts as none


class SolverFailure(RuntimeError):
    """The conic solver raised, or finished without an accurate optimum."""


@dataclass(frozen=True, slots=True)
class Relaxation:
    """A relaxed optimum with its prices."""

    relaxed: Relaxed
    shadow_price: float
    tag_prices: FloatArray


def size_bucket(n: int) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... that holds n (at most 50% padding)."""
    size = 16
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def tag_bucket(n_tags: int) -> int:
    return 0 if n_tags == 0 else 1 << (n_tags - 1).bit_length()


class _Compiled:
    """One parametrised problem for a (size, tags) bucket."""

    def __init__(self, size: int, n_tags: int, formulation: Formulation, cuts: FloatArray) -> None:
        nonneg = {"nonneg": True}
        self.rate = cp.Parameter(size, **nonneg)
        self.tail = cp.Parameter(size, **nonneg)
        self.knee = cp.Parameter(size, **nonneg)
        self.tail_max = cp.Parameter(size, **nonneg)
        self.token_per_t = cp.Parameter(size, **nonneg)
        y = cp.Variable(size, nonneg=True)
        t = cp.Variable(size, nonneg=True)
        self.y, self.t = y, t
        tail_value, cut_rows = self._tail_value(formulation, t, cuts, size)
        self.budget_row = cp.sum(y) + self.token_per_t @ t <= 1.0
        constraints = [y <= self.knee, t <= self.tail_max, self.budget_row, *cut_rows]
        self.tag_rows: cp.Constraint | None = None
        if n_tags:
            self.member = cp.Parameter((n_tags, size), **nonneg)
            self.member_token = cp.Parameter((n_tags, size), **nonneg)
            self.tag_budget = cp.Parameter(n_tags, **nonneg)
            self.tag_rows = self.member @ y + self.member_token @ t <= self.tag_budget
            constraints.append(self.tag_rows)
        self.problem = cp.Problem(cp.Maximize(self.rate @ y + tail_value), constraints)
        assert self.problem.is_dcp(dpp=True)

    def _tail_value(
        self, formulation: Formulation, t: cp.Variable, cuts: FloatArray, size: int
    ) -> tuple[cp.Expression, list[cp.Constraint]]:
        if formulation == "exp":
            # tail·(1 − e^(−t)); the constant Σ tail is added back when reading the value.
            return -(self.tail @ cp.exp(-t)), []
        hypo = cp.Variable(size)
        rows = [
            hypo <= cp.multiply(self.tail, (1.0 - np.exp(-c) - c * np.exp(-c)) + np.exp(-c) * t)
            for c in cuts
        ]
        return cp.sum(hypo), rows


class CvxpyAllocator:
    """Solves the envelope relaxation with cvxpy; keeps compiled problems per size bucket.

    Create one per process (the daemon holds it) so the compile cost is paid once per bucket.
    """

    def __init__(
        self,
        solver: str = "CLARABEL",
        *,
        formulation: Formulation | None = None,
        tangent_cuts: int = 32,
    ) -> None:
        self.solver = solver.upper()
        if self.solver not in _SOLVER_OPTIONS:
            raise ValueError(f"solver: expected one of {sorted(_SOLVER_OPTIONS)}, got {solver!r}")
        self.formulation: Formulation = formulation or (
            "tangent" if self.solver == "HIGHS" else "exp"
        )
        self._cuts = np.concatenate([[0.0], np.geomspace(0.02, TAIL_HORIZON, tangent_cuts - 1)])
        self._compiled: dict[tuple[int, int], _Compiled] = {}

    @property
    def name(self) -> str:
        suffix = "-tangent" if self.formulation == "tangent" else ""
        return f"cvxpy-{self.solver.lower()}{suffix}"

    def compiled_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._compiled)

    def relax(self, curves: Curves, budget: float, tag_budgets: FloatArray) -> Relaxation:
        """Relaxed optimum, λ (budget-row dual) and tag prices; raises SolverFailure."""
        key = (size_bucket(curves.size), tag_bucket(tag_budgets.size))
        if key not in self._compiled:
            self._compiled[key] = _Compiled(*key, self.formulation, self._cuts)
        compiled = self._compiled[key]
        value_scale = self._load(compiled, curves, budget, tag_budgets)
        self._solve(compiled)
        return self._read(compiled, curves, budget, tag_budgets, value_scale)

    def _load(
        self, compiled: _Compiled, curves: Curves, budget: float, tag_budgets: FloatArray
    ) -> float:
        size = compiled.rate.size
        value_scale = 1.0 / max(float(np.sum(curves.tail_scale + curves.return_rate * curves.knee)), 1e-300)
        tokens = max(budget, 1e-300)
        compiled.rate.value = _pad(curves.return_rate * tokens * value_scale, size)
        compiled.tail.value = _pad(curves.tail_scale * value_scale, size)
        compiled.knee.value = _pad(curves.knee / tokens, size)
        compiled.tail_max.value = _pad(curves.beta * np.maximum(curves.cap - curves.knee, 0.0), size)
        compiled.token_per_t.value = _pad(1.0 / (curves.beta * tokens), size)
        if compiled.tag_rows is not None:
            member = np.zeros((compiled.tag_budget.size, size))
            tagged = np.flatnonzero(curves.tag_index >= 0)
            member[curves.tag_index[tagged], tagged] = 1.0
            compiled.member.value = member
            compiled.member_token.value = member * compiled.token_per_t.value
            compiled.tag_budget.value = _pad(tag_budgets / tokens, compiled.tag_budget.size)
        return value_scale

    def _solve(self, compiled: _Compiled) -> None:
        try:
            compiled.problem.solve(solver=self.solver, **_SOLVER_OPTIONS[self.solver])
        except (cp.SolverError, ArithmeticError, ValueError) as exc:
            raise SolverFailure(f"{self.solver} raised: {exc}") from exc
        if compiled.problem.status not in _OK:
            raise SolverFailure(f"{self.solver} finished with status {compiled.problem.status!r}")

    def _read(
        self,
        compiled: _Compiled,
        curves: Curves,
        budget: float,
        tag_budgets: FloatArray,
        value_scale: float,
    ) -> Relaxation:
        n = curves.size
        tokens = max(budget, 1e-300)
        y = np.asarray(compiled.y.value)[:n] * tokens
        tail_tokens = np.asarray(compiled.t.value)[:n] / curves.beta
        b = np.clip(y, 0.0, None) + np.clip(tail_tokens, 0.0, None)
        per_value = 1.0 / (value_scale * tokens)
        shadow = max(float(compiled.budget_row.dual_value), 0.0) * per_value
        tag_prices = np.zeros(tag_budgets.size)
        if compiled.tag_rows is not None:
            duals = np.asarray(compiled.tag_rows.dual_value)[: tag_budgets.size]
            tag_prices = np.maximum(duals, 0.0) * per_value
        relaxed = _vertex_from_interior(curves, b, budget, tag_budgets)
        return Relaxation(relaxed=relaxed, shadow_price=shadow, tag_prices=tag_prices)


def _vertex_from_interior(
    curves: Curves, b: FloatArray, budget: float, tag_budgets: FloatArray
) -> Relaxed:
    """Interior-point solvers split ties evenly across chords; refill them greedily to a vertex."""
    zero = b <= _ZERO_RTOL * budget
    reached = (b >= curves.knee * (1.0 - KNEE_RTOL)) & ~zero
    base = np.where(reached, np.clip(b, curves.knee, curves.cap), 0.0)
    candidates = np.flatnonzero(~zero & ~reached & (curves.return_rate > 0))
    return fill_chords(curves, base, candidates, budget, tag_budgets)


def _pad(values: FloatArray, size: int) -> FloatArray:
    out = np.zeros(size)
    out[: values.size] = np.nan_to_num(values, nan=0.0, posinf=0.0)
    return out
