"""Chain length in stages: a piecewise-exponential (discrete-stage hazard) model of when a
reasoning chain ends and whether it carries an answer when it does.

Lengths are cut into stages [e_k, e_{k+1}) on a fixed, roughly geometric grid (fine where probes
and tight budgets act, coarse in the long tail; the last stage is open). Within stage k a chain
ends at a constant rate λ_k per token, and a chain that ends there carries an extractable answer
with probability a_k. Both are estimated from censored chains: a chain of ℓ tokens contributes
its overlap with every stage up to ℓ as exposure (tokens at risk), and, if it finished, one event
(and its answered flag) to the stage holding ℓ. The estimate is exact under censoring, needs only
three sums per stage, and lets the answer rate fall with length instead of one A for the chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["EDGES", "StageCounts", "StageCurve", "stage_of"]

FloatArray = NDArray[np.float64]

# Stage edges (tokens). Not fitted to any data: steps of 64 up to the usual probe, then about
# x1.25 per stage; the open last stage starts at 32k.
EDGES: FloatArray = np.array(
    [0, 64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096,
     5120, 6144, 8192, 10240, 12288, 16384, 24576, 32768],
    dtype=np.float64,
)  # fmt: skip
WIDTHS: FloatArray = np.diff(EDGES)  # the last stage is open: no width
STAGES = EDGES.size


def stage_of(tokens: ArrayLike) -> NDArray[np.int64]:
    """Index of the stage holding each length (a chain of exactly e_k tokens ends in stage k−1,
    so a chain cut at a stage edge and one finishing there fall on the same side)."""
    t = np.asarray(tokens, dtype=np.float64)
    return np.clip(np.searchsorted(EDGES, t, side="left") - 1, 0, STAGES - 1).astype(np.int64)


def exposure(tokens: ArrayLike) -> FloatArray:
    """Tokens each chain spent at risk in each stage: shape (..., STAGES)."""
    t = np.asarray(tokens, dtype=np.float64)[..., None]
    upper = np.append(WIDTHS, np.inf)
    return np.clip(t - EDGES, 0.0, upper)


@dataclass(slots=True)
class StageCounts:
    """Sufficient statistics of one pool of chains: events, exposure and answered, per stage."""

    events: FloatArray
    exposure: FloatArray
    answered: FloatArray
    chains: int = 0

    @classmethod
    def empty(cls) -> StageCounts:
        return cls(np.zeros(STAGES), np.zeros(STAGES), np.zeros(STAGES))

    def add(self, tokens: int, finished: bool, answered: bool) -> None:
        self.exposure += exposure(tokens)
        if finished:
            k = int(stage_of(tokens))
            self.events[k] += 1.0
            self.answered[k] += float(answered)
        self.chains += 1

    def unanswer(self, tokens: int) -> bool:
        """Count one answered chain that finished at `tokens` as finished without an answer
        (a grade said its answer was wrong); False, changing nothing, when that stage holds
        no answered chain (the pool forgot it)."""
        k = int(stage_of(tokens))
        if self.answered[k] < 1.0:
            return False
        self.answered[k] -= 1.0
        return True


@dataclass(frozen=True, slots=True)
class StageCurve:
    """Per-stage end rate λ_k (per token) and answer rate a_k of one pool (or one query)."""

    rate: FloatArray
    answer: FloatArray

    def shrunk(self, counts: StageCounts, events0: float, answers0: float) -> StageCurve:
        """This curve as the prior of `counts`: Gamma–Poisson per stage for the rate
        (`events0` pseudo-events at the prior rate), Beta per stage for the answer rate
        (`answers0` pseudo-chains), answer rate made non-increasing in length."""
        rate = (events0 + counts.events) / (events0 / self.rate + counts.exposure)
        weight = answers0 + counts.events
        answer = (answers0 * self.answer + counts.answered) / weight
        return StageCurve(rate, non_increasing(answer, weight))

    def cumulative(self, tokens: ArrayLike) -> FloatArray:
        """Cumulative hazard H(t) = Σ_k λ_k · (time spent in stage k before t)."""
        return exposure(tokens) @ self.rate

    def answer_at(self, tokens: ArrayLike) -> FloatArray:
        """The answer rate of a chain ending at each length."""
        return self.answer[stage_of(tokens)]


def non_increasing(values: FloatArray, weights: FloatArray) -> FloatArray:
    """Weighted least-squares non-increasing fit (pool adjacent violators): a longer chain is
    never assumed likelier to carry an answer than a shorter one."""
    blocks: list[list[float]] = []  # [weighted sum, weight, count]
    for v, w in zip(values.tolist(), weights.tolist(), strict=True):
        blocks.append([v * w, w, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, w2, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += w2
            blocks[-1][2] += c
    return np.concatenate([np.full(int(c), s / w) for s, w, c in blocks])
