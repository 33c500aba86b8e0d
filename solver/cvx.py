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

import warnings
from dataclasses import dataclass
from typing import Literal

import cvxpy as cp
import numpy as np

from clearbudget.solver.curves import TAIL_HORIZON, Curves, build_curves
from clearbudget.solver.problem import FloatArray, WindowProblem
from clearbudget.solver.rounding import KNEE_RTOL, Relaxed, fill_chords

Formulation = Literal["exp", "tangent"]
_OK = {cp.OPTIMAL}
_SOLVER_OPTIONS: dict[str, dict[str, object]] = {
    "CLARABEL": {},
    "ECOS": {},
    "SCS": {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 20_000},
    "HIGHS": {},
}
_PRICE_RTOL = 1e-6  # a query whose v·s is this close to the solver's price is tied with it


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


@dataclass(frozen=True, slots=True)
class _Data:
    """Scaled window data: tokens in units of the budget, values in units of the window's total."""

    rate: FloatArray
    tail: FloatArray
    knee: FloatArray
    tail_max: FloatArray
    token_per_t: FloatArray
    member: FloatArray  # (tags, size) 0/1
    tag_budget: FloatArray


class _Model:
    """The relaxation over either cp.Parameters (DPP, reusable) or constants (built per window)."""

    def __init__(
        self, data: _Data | None, size: int, n_tags: int, formulation: Formulation, cuts: FloatArray
    ) -> None:
        self.params: dict[str, cp.Parameter] = {}
        rate, tail, knee, tail_max, token_per_t = (
            self._input(data, name, (size,))
            for name in ("rate", "tail", "knee", "tail_max", "token_per_t")
        )
        self.y = cp.Variable(size, nonneg=True)
        self.t = cp.Variable(size, nonneg=True)
        tail_value, cut_rows = _tail_value(formulation, tail, self.t, cuts, size)
        self.budget_row = cp.sum(self.y) + token_per_t @ self.t <= 1.0
        constraints = [self.y <= knee, self.t <= tail_max, self.budget_row, *cut_rows]
        self.tag_rows: cp.Constraint | None = None
        if n_tags:
            member = self._input(data, "member", (n_tags, size))
            member_token = self._input(data, "member_token", (n_tags, size))
            tag_budget = self._input(data, "tag_budget", (n_tags,))
            self.tag_rows = member @ self.y + member_token @ self.t <= tag_budget
            constraints.append(self.tag_rows)
        self.problem = cp.Problem(cp.Maximize(rate @ self.y + tail_value), constraints)

    def _input(self, data: _Data | None, name: str, shape: tuple[int, ...]) -> cp.Expression:
        if data is not None:
            return cp.Constant(_data_field(data, name))
        self.params[name] = cp.Parameter(shape, nonneg=True)
        return self.params[name]

    def load(self, data: _Data) -> None:
        for name, param in self.params.items():
            param.value = _data_field(data, name)


def _data_field(data: _Data, name: str) -> FloatArray:
    if name == "member_token":
        return data.member * data.token_per_t
    return getattr(data, name)


def _tail_value(
    formulation: Formulation, tail: cp.Expression, t: cp.Variable, cuts: FloatArray, size: int
) -> tuple[cp.Expression, list[cp.Constraint]]:
    if formulation == "exp":
        # tail·(1 − e^(−t)) less its constant Σ tail, which does not move the optimum.
        return -(tail @ cp.exp(-t)), []
    hypo = cp.Variable(size)
    slopes = np.exp(-cuts)
    rows = [
        hypo <= cp.multiply(tail, (1.0 - slope - cut * slope) + slope * t)
        for cut, slope in zip(cuts, slopes, strict=True)
    ]
    return cp.sum(hypo), rows


class CvxpyAllocator:
    """Solves the envelope relaxation with cvxpy; keeps DPP-compiled problems per size bucket.

    Create one per process (the daemon holds it) so each bucket's compile is paid once. Windows
    above `dpp_max_size` are built from constants instead: cvxpy 1.9 restructures exponential
    cones through an index array of (variables × parameters) entries, quadratic in the window,
    so a DPP problem of 10,000 queries needs gigabytes to compile while a vectorised rebuild
    takes ~25 ms (see benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        solver: str = "CLARABEL",
        *,
        formulation: Formulation | None = None,
        tangent_cuts: int = 32,
        dpp_max_size: int = 1536,
    ) -> None:
        self.solver = solver.upper()
        if self.solver not in _SOLVER_OPTIONS:
            raise ValueError(f"solver: expected one of {sorted(_SOLVER_OPTIONS)}, got {solver!r}")
        self.formulation: Formulation = formulation or (
            "tangent" if self.solver == "HIGHS" else "exp"
        )
        self.dpp_max_size = dpp_max_size
        self._cuts = np.concatenate([[0.0], np.geomspace(0.02, TAIL_HORIZON, tangent_cuts - 1)])
        self._compiled: dict[tuple[int, int], _Model] = {}

    @classmethod
    def one_off(
        cls, solver: str = "CLARABEL", *, formulation: Formulation | None = None
    ) -> CvxpyAllocator:
        """An allocator for a single solve (`clearbudget solve`): every window is built from
        constants, so nothing pays the DPP compile that only a long-lived allocator earns back
        (1,000 tagged queries in a fresh process: about a tenth of the time)."""
        return cls(solver, formulation=formulation, dpp_max_size=0)

    @property
    def name(self) -> str:
        suffix = "-tangent" if self.formulation == "tangent" else ""
        return f"cvxpy-{self.solver.lower()}{suffix}"

    def warm_up(self, n_tags: int) -> None:
        """Solve a made-up window of the smallest size with `n_tags` tag rows: the solver's
        first-use costs are paid now, and that bucket is compiled."""
        size, names = size_bucket(1), [f"t{i}" for i in range(max(n_tags, 1))]
        problem = WindowProblem.create(
            ids=[str(i) for i in range(size)], a=np.full(size, 0.8),
            tau=np.linspace(100.0, 2000.0, size), beta=np.full(size, 5e-3),
            budget=300.0 * size, tags=[names[i % len(names)] for i in range(size)],
            tag_budgets=dict.fromkeys(names, 100.0 * size),
        )  # fmt: skip
        tag_budgets = np.array([problem.tag_budgets[name] for name in problem.tag_names])
        self.relax(build_curves(problem), problem.budget, tag_budgets)

    def compiled_buckets(self) -> list[tuple[int, int]]:
        return sorted(self._compiled)

    def relax(self, curves: Curves, budget: float, tag_budgets: FloatArray) -> Relaxation:
        """Relaxed optimum, λ (budget-row dual) and tag prices; raises SolverFailure."""
        size, n_tags = size_bucket(curves.size), tag_bucket(tag_budgets.size)
        if size > self.dpp_max_size:
            size, n_tags = curves.size, tag_budgets.size  # built per window: no padding needed
        data, value_scale = _scaled_data(curves, budget, tag_budgets, size, n_tags)
        model = self._model(data, size, n_tags)
        self._solve(model)
        return _read(model, curves, budget, tag_budgets, value_scale)

    def _model(self, data: _Data, size: int, n_tags: int) -> _Model:
        if size > self.dpp_max_size:
            return _Model(data, size, n_tags, self.formulation, self._cuts)
        key = (size, n_tags)
        if key not in self._compiled:
            self._compiled[key] = _Model(None, size, n_tags, self.formulation, self._cuts)
        model = self._compiled[key]
        model.load(data)
        return model

    def _solve(self, model: _Model) -> None:
        try:
            with warnings.catch_warnings():
                # cvxpy warns on inaccurate solutions; the status check below handles them.
                warnings.simplefilter("ignore", UserWarning)
                # warm_start=False: cvxpy would otherwise update the previous Clarabel instance
                # in place, which keeps that window's equilibration and returned visibly less
                # accurate (sometimes failed) solves on the next window.
                model.problem.solve(
                    solver=self.solver, warm_start=False, **_SOLVER_OPTIONS[self.solver]
                )
        except (cp.SolverError, ArithmeticError, ValueError) as exc:
            raise SolverFailure(f"{self.solver} raised: {exc}") from exc
        if model.problem.status not in _OK:
            raise SolverFailure(f"{self.solver} finished with status {model.problem.status!r}")


def _scaled_data(
    curves: Curves, budget: float, tag_budgets: FloatArray, size: int, n_tags: int
) -> tuple[_Data, float]:
    total = float(np.sum(curves.tail_scale + curves.return_rate * curves.knee))
    value_scale = 1.0 / max(total, 1e-300)
    tokens = max(budget, 1e-300)
    token_per_t = _pad(1.0 / (curves.beta * tokens), size)
    member = np.zeros((n_tags, size))
    tagged = np.flatnonzero(curves.tag_index >= 0)
    member[curves.tag_index[tagged], tagged] = 1.0
    data = _Data(
        rate=_pad(curves.return_rate * tokens * value_scale, size),
        tail=_pad(curves.tail_scale * value_scale, size),
        knee=_pad(curves.knee / tokens, size),
        tail_max=_pad(curves.beta * np.maximum(curves.cap - curves.knee, 0.0), size),
        token_per_t=token_per_t,
        member=member,
        tag_budget=_pad(tag_budgets / tokens, n_tags),
    )
    return data, value_scale


def _read(
    model: _Model, curves: Curves, budget: float, tag_budgets: FloatArray, value_scale: float
) -> Relaxation:
    per_value = 1.0 / (value_scale * max(budget, 1e-300))
    shadow = max(float(model.budget_row.dual_value), 0.0) * per_value
    tag_prices = np.zeros(tag_budgets.size)
    if model.tag_rows is not None:
        duals = np.asarray(model.tag_rows.dual_value)[: tag_budgets.size]
        tag_prices = np.maximum(duals, 0.0) * per_value
    n = curves.size
    primal = np.asarray(model.y.value)[:n] * max(budget, 1e-300)
    primal = (
        np.clip(primal, 0.0, None) + np.clip(np.asarray(model.t.value)[:n], 0.0, None) / curves.beta
    )
    relaxed = _allocate_at_duals(curves, primal, shadow, tag_prices, budget, tag_budgets)
    if tag_budgets.size == 0:
        shadow = min(shadow, _clearing_price(curves, relaxed.allocations))
    return Relaxation(relaxed=relaxed, shadow_price=shadow, tag_prices=tag_prices)


def _allocate_at_duals(
    curves: Curves,
    primal: FloatArray,
    shadow: float,
    tag_prices: FloatArray,
    budget: float,
    tag_budgets: FloatArray,
) -> Relaxed:
    """Solvency from the solver's prices; queries tied with their price (v·s within tolerance)
    refilled best first, since an interior-point primal splits near-ties evenly. Solvent queries
    keep the primal's tokens, which meet the budget more exactly than the rule at a noisy dual."""
    price = shadow + np.append(tag_prices, 0.0)[curves.tag_index]
    rate = curves.return_rate
    solvent = (rate >= price * (1.0 + _PRICE_RTOL)) & (rate > 0)
    base = np.where(solvent, np.clip(primal, curves.knee, curves.cap), 0.0)
    candidates = np.flatnonzero(
        (rate >= price * (1.0 - _PRICE_RTOL)) & (rate < price * (1.0 + _PRICE_RTOL)) & (rate > 0)
    )
    return fill_chords(curves, base, candidates, budget, tag_budgets)


def _clearing_price(curves: Curves, b: FloatArray) -> float:
    """The lowest price that clears: the best marginal value among queries that could take more.

    Where a query sits at its cap the budget's dual is an interval; the closed form reports its
    lower end and an interior-point solver its middle, so both are mapped to the lower end.
    """
    room = b < curves.cap * (1.0 - KNEE_RTOL)
    on_chord = b < curves.knee * (1.0 - KNEE_RTOL)
    with np.errstate(over="ignore"):
        tail = np.exp(curves.log_peak - curves.beta * np.maximum(b - curves.tau, 0.0))
    marginal = np.where(on_chord, curves.return_rate, tail)
    return float(np.max(np.where(room & (curves.return_rate > 0), marginal, 0.0), initial=0.0))


def _pad(values: FloatArray, size: int) -> FloatArray:
    out = np.zeros(size)
    out[: values.size] = np.nan_to_num(values, nan=0.0, posinf=0.0)
    return out
