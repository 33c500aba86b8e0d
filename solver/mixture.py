"""The numerics of `DifficultyModel.curves`: one window's known chains, stage curves and the
mixture that turns them into each query's U(b).

For query i with tag curve hazard H_i and frailty posterior m ~ Gamma(a_i, b_i), the frailty
curve is S₀(t) = (1 + H_i(t)/b_i)^(−a_i) with answered mass W₀(t) = ∫ a_i(s)·(−dS₀(s)) (the tag
curve's answer rate a_i by stage). The predictive mixes it (weight w₀) with the record's own
chains (weight 1: a finished chain a point at its length carrying its answered flag, a censored
one S₀ past its cut) and the problem's latest chains under other tags (their lengths mapped onto
H_i at equal cumulative hazard; a finished one a log-logistic kernel of the learned width, a
censored one S₀ past its mapped cut). Conditional on surviving z₀ = p:
U(b) = Σ weight·(W(p+b) − W(p)) / Σ weight·S(p).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

from clearbudget.solver.memory import (
    ANSWER,
    ANSWERED,
    CURVE,
    FINISHED,
    NO_ANSWER,
    RECORD,
    TOKENS,
    PromptMemory,
)
from clearbudget.solver.stages import EDGES, WIDTHS, StageCurve, exposure, stage_of

__all__ = [
    "BUDGET_GRID",
    "Chains",
    "Kernels",
    "OwnChain",
    "Prior",
    "Window",
    "inverse_hazard",
    "mixture",
    "survival",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
# Continuation budgets the curve is evaluated at: 0, then ~13% steps from 16 to 32k tokens.
BUDGET_GRID: FloatArray = np.unique(np.concatenate([[0.0], np.round(np.geomspace(16, 32768, 60))]))


@dataclass(frozen=True, slots=True)
class OwnChain:
    """A chain of the query being decided that is already known (a sibling probe sample)."""

    tokens: int
    finished: bool
    answered: bool


def inverse_hazard(rate: FloatArray, hazard: FloatArray) -> FloatArray:
    """Length at which a stage curve's cumulative hazard reaches each value (the inverse of
    `StageCurve.cumulative`; past the last edge the open stage's rate continues)."""
    at_edges = np.concatenate([[0.0], np.cumsum(rate[:-1] * WIDTHS)])
    inside = np.interp(hazard, at_edges, EDGES)
    beyond = EDGES[-1] + (hazard - at_edges[-1]) / rate[-1]
    return np.maximum(np.where(hazard > at_edges[-1], beyond, inside), 1.0)


@dataclass(frozen=True, slots=True)
class Chains:
    """Every known chain of the window's queries, flat: the query it informs, whether it is
    that query's own record, and its state (memory chains and sibling probe samples)."""

    query: IntArray
    own: NDArray[np.bool_]
    curve: IntArray  # curve-tags id the chain ran under
    tokens: IntArray
    finished: NDArray[np.bool_]
    answered: NDArray[np.bool_]
    answer: IntArray

    @classmethod
    def gather(
        cls,
        memory: PromptMemory,
        queries: Sequence[tuple[int, int, int]],
        siblings: Sequence[Sequence[OwnChain]] | None,
    ) -> Chains:
        """Known chains of each (record id, curve id, prompt key): remembered ones, then the
        query's sibling probe samples (its own record, no answer id)."""
        blocks = [memory.chains(key) for _, _, key in queries]
        for i, (record, curve, _) in enumerate(queries):
            extra = siblings[i] if siblings is not None else ()
            if extra:
                rows = [(record, curve, c.tokens, c.finished, c.answered, NO_ANSWER)
                        for c in extra]  # fmt: skip
                blocks[i] = np.vstack([blocks[i], np.array(rows, dtype=np.int64)])
        counts = np.array([b.shape[0] for b in blocks])
        rows = np.concatenate(blocks) if counts.sum() else np.zeros((0, 6), np.int64)
        query = np.repeat(np.arange(len(queries)), counts)
        record = np.array([q[0] for q in queries], dtype=np.int64)
        return cls(query, rows[:, RECORD] == record[query], rows[:, CURVE], rows[:, TOKENS],
                   rows[:, FINISHED] > 0, rows[:, ANSWERED] > 0, rows[:, ANSWER])  # fmt: skip


@dataclass(slots=True)
class Window:
    """Evaluation points z (from `survived` on) and the stage curves the window reads."""

    points: FloatArray  # z_0 = survived < z_1 < ...
    columns: IntArray  # where survived + BUDGET_GRID sit in `points`
    rate: FloatArray  # (curves, stages)
    answer: FloatArray
    rows: IntArray  # each query's curve row
    chain_rows: IntArray  # each known chain's curve row
    at_edges: FloatArray  # (curves, stages): cumulative hazard at each stage's start
    chain_hazard: FloatArray  # each known chain's cumulative hazard under its own curve

    @classmethod
    def build(
        cls,
        curve_of: Callable[[int], StageCurve],
        query_curves: IntArray,
        chains: Chains,
        survived: float,
    ) -> Window:
        """Points from `survived` on, and the stage curve (by id, `curve_of`) of every query
        (`query_curves`) and every known chain."""
        p = survived
        points = np.unique(np.concatenate([p + BUDGET_GRID, EDGES[p < EDGES]]))
        columns = np.searchsorted(points, p + BUDGET_GRID).astype(np.int64)
        ids, inverse = np.unique(np.concatenate([query_curves, chains.curve]), return_inverse=True)
        curves = [curve_of(ident) for ident in ids.tolist()]
        inverse = inverse.astype(np.int64)
        rate = np.array([c.rate for c in curves])
        answer = np.array([c.answer for c in curves])
        steps = np.cumsum(rate[:, :-1] * WIDTHS, axis=1)
        at_edges = np.concatenate([np.zeros((len(curves), 1)), steps], axis=1)
        n = query_curves.size
        window = cls(points, columns, rate, answer, inverse[:n], inverse[n:], at_edges,
                     np.zeros(0))  # fmt: skip
        window.chain_hazard = window.hazard_at(window.chain_rows, chains.tokens)
        return window

    def hazard_at(self, rows: IntArray, tokens: IntArray | FloatArray) -> FloatArray:
        """Cumulative hazard of curve `rows[j]` at `tokens[j]` (one gather, no stage sweep)."""
        k = stage_of(tokens)
        return self.at_edges[rows, k] + self.rate[rows, k] * (tokens - EDGES[k])

    def mapped(self, chains: Chains, pick: NDArray[np.bool_]) -> FloatArray:
        """Picked chains' lengths mapped onto their query's tag curve at equal cumulative
        hazard (a chain at its tag's median lands at the query's tag median)."""
        hazard = self.chain_hazard[pick]
        rows = self.rows[chains.query[pick]]
        out = np.empty(rows.size)
        for row in np.unique(rows).tolist():
            mine = rows == row
            out[mine] = inverse_hazard(self.rate[row], hazard[mine])
        return out

    def prior(self, shape: FloatArray, scale: FloatArray) -> Prior:
        """Frailty survival S₀(z) and answered mass W₀(z) − W₀(z₀) at every point."""
        hazard = self.rate[self.rows] @ exposure(self.points).T
        surv = survival(hazard, shape[:, None], scale[:, None])
        mid = stage_of(0.5 * (self.points[:-1] + self.points[1:]))
        answered = self.answer[self.rows][:, mid] * (surv[:, :-1] - surv[:, 1:])
        mass = np.concatenate([np.zeros((len(self.rows), 1)), np.cumsum(answered, axis=1)], 1)
        return Prior(surv, mass)


@dataclass(frozen=True, slots=True)
class Prior:
    surv: FloatArray  # S₀ at every point, per query
    mass: FloatArray  # W₀(z) − W₀(z₀)


def survival(hazard: FloatArray, shape: FloatArray, scale: FloatArray) -> FloatArray:
    """Gamma-frailty survival: E[exp(−m·H)] for m ~ Gamma(shape, rate=scale)."""
    return np.exp(-shape * np.log1p(hazard / scale))


@dataclass(frozen=True, slots=True)
class Kernels:
    """How the mixture weighs its parts: the frailty curve counts `prior_weight` chains; each
    of the problem's chains under other serving tags (at most `cross_chains`, the latest)
    counts `weight`, as a kernel of log-sd `sigma` around its mapped length (finished) or the
    frailty tail past its mapped cut (censored)."""

    prior_weight: float
    weight: float
    sigma: float
    cross_chains: int


def mixture(
    window: Window,
    chains: Chains,
    shape: FloatArray,
    scale: FloatArray,
    prior: Prior,
    kernels: Kernels,
) -> FloatArray:
    """U at the output budgets: the frailty curve (weight w₀) mixed with the record's own
    chains and the problem's other chains, conditional on surviving to z₀:
    Σ weight·ΔW / Σ weight·S(z₀)."""
    out = window.points[window.columns]
    w0 = kernels.prior_weight
    alive = w0 * prior.surv[:, 0]
    mass = w0 * prior.mass[:, window.columns]
    own, done = chains.own, chains.finished
    parts = [
        _finished_part(out, chains.query[own & done], chains.tokens[own & done],
                       chains.answered[own & done], mass.shape),
        _censored_part(window, chains.query[own & ~done], chains.tokens[own & ~done], shape,
                       scale, prior),
    ]  # fmt: skip
    cross = ~own & _latest(chains.query, ~own, kernels.cross_chains)
    if cross.any():
        mapped = window.mapped(chains, cross)
        fin = done[cross]
        q = chains.query[cross]
        parts.append(_kernel_part(out, q[fin], mapped[fin], chains.answered[cross][fin],
                                  kernels, mass.shape))  # fmt: skip
        a, m = _censored_part(window, q[~fin], mapped[~fin], shape, scale, prior)
        parts.append((kernels.weight * a, kernels.weight * m))
    for part_alive, part_mass in parts:
        alive = alive + part_alive
        mass = mass + part_mass
    return np.maximum(mass / np.maximum(alive, 1e-300)[:, None], 0.0)


def _latest(query: IntArray, pick: NDArray[np.bool_], keep: int) -> NDArray[np.bool_]:
    """Among picked rows (grouped by query, in memory order), the last `keep` of each query."""
    count = np.bincount(query[pick], minlength=int(query.max(initial=-1)) + 1)
    rank = np.cumsum(pick) - 1  # position among picked rows overall
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    within = rank - first[query] if query.size else rank
    return pick & (count[query] - within <= keep) if query.size else pick


def _kernel_part(
    points: FloatArray,
    query: IntArray,
    mapped: FloatArray,
    answered: NDArray[np.bool_],
    kernels: Kernels,
    shape: tuple[int, ...],
) -> tuple[FloatArray, FloatArray]:
    """A finished chain of the problem under other tags, as a kernel around its mapped length
    (in log tokens): alive at z₀ with the kernel's mass past z₀, answered as it was."""
    with np.errstate(divide="ignore"):
        logz = np.log(points)
    # Log-logistic kernel with the learned log-length sd (σ√3/π scale): as wide as the
    # normal one, and an expit is a fraction of the cost of an erf.
    scale = kernels.sigma * np.sqrt(3.0) / np.pi
    cdf = expit((logz[None, :] - np.log(mapped)[:, None]) / scale)  # (m, |z|)
    alive_j = kernels.weight * (1.0 - cdf[:, 0])
    mass_j = kernels.weight * answered[:, None] * (cdf - cdf[:, :1])
    alive = np.bincount(query, alive_j, minlength=shape[0])
    mass = np.zeros(shape)
    if query.size:
        _add_rows(mass, query, mass_j)
    return alive, mass


def _finished_part(
    points: FloatArray,
    query: IntArray,
    tokens: IntArray,
    answered: NDArray[np.bool_],
    shape: tuple[int, ...],
) -> tuple[FloatArray, FloatArray]:
    """A finished chain longer than z₀: alive at z₀, answered (or not) from its length on."""
    later = tokens > points[0]
    query, tokens, answered = query[later], tokens[later], answered[later]
    alive = np.bincount(query, minlength=shape[0]).astype(np.float64)
    at = np.searchsorted(points, tokens, side="left")
    inside = at < points.size
    flat = query[inside] * shape[1] + at[inside]
    weights = answered[inside].astype(np.float64)
    step = np.bincount(flat, weights, minlength=shape[0] * shape[1]).reshape(shape)
    return alive, np.cumsum(step, axis=1)


def _censored_part(
    window: Window,
    query: IntArray,
    cut: IntArray | FloatArray,
    shape: FloatArray,
    scale: FloatArray,
    prior: Prior,
) -> tuple[FloatArray, FloatArray]:
    """A chain cut at c: the frailty curve conditional on running past c."""
    n, cols = prior.mass.shape[0], window.columns
    if query.size == 0:
        return np.zeros(n), np.zeros((n, cols.size))
    h_cut = window.hazard_at(window.rows[query], cut)
    s_cut = np.maximum(survival(h_cut, shape[query], scale[query]), 1e-300)
    early = cut <= window.points[0]
    # Cut before z₀: alive at z₀ with odds S₀(z₀)/S₀(c), then the frailty tail.
    factor = np.bincount(query[early], 1.0 / s_cut[early], minlength=n)
    alive = factor * prior.surv[:, 0]
    mass = factor[:, None] * prior.mass[:, cols]
    late = ~early
    if late.any():
        q, c = query[late], cut[late].astype(np.float64)
        base = _interp_rows(window.points, prior.mass[q], c)
        tail = np.maximum(prior.mass[q][:, cols] - base[:, None], 0.0) / s_cut[late][:, None]
        alive += np.bincount(q, minlength=n)
        _add_rows(mass, q, tail)
    return alive, mass


def _add_rows(target: FloatArray, index: IntArray, rows: FloatArray) -> None:
    """target[index[j]] += rows[j] for every j (repeated indices summed), without np.add.at;
    `index` is sorted (chains are gathered query by query)."""
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    target[index[starts]] += np.add.reduceat(rows, starts, axis=0)


def _interp_rows(points: FloatArray, rows: FloatArray, at: FloatArray) -> FloatArray:
    """Row-wise linear interpolation of `rows` (sampled at `points`) at one point per row."""
    hi = np.clip(np.searchsorted(points, at, side="right"), 1, points.size - 1)
    lo = hi - 1
    frac = np.clip((at - points[lo]) / (points[hi] - points[lo]), 0.0, 1.0)
    index = np.arange(rows.shape[0])
    return rows[index, lo] + frac * (rows[index, hi] - rows[index, lo])
