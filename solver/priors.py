"""Empirical-Bayes priors on chain length and answer rate, pooled per tag and learned online.

Every chain the daemon finishes with (a probe left alone, or a dispatched continuation) is reported
once with its final state: total tokens generated, whether it ended naturally, and whether an answer
could be extracted. From these the book fits, per pool key and conditional on a chain having
already run `s` tokens, the remaining length R = L − s as τ + Exp(β) and the answer rate A.

Keys nest in a fixed tag order (e.g. task, then task+model, then task+model+tenant); each level is
shrunk toward its parent with `strength` pseudo-observations, the root toward `default`. Fits are
cached per (key, s) and refreshed only when that key has seen new chains.

Fit of one key (censored data, remaining lengths r_j, finished flags f_j):
    β | τ  = (n₀ + d) / (n₀/β_parent + Σ_j (r_j − τ)⁺)            (Gamma posterior mean)
    τ       = shrunk Kaplan–Meier quantile match: the model's q-quantile equals the data's
    A       = (n₀·A_parent + answered) / (n₀ + d)                   (Beta posterior mean)
A counts only observable success (an extractable answer), never correctness against a gold answer.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFAULT_LEVELS", "LengthPrior", "PriorBook"]

DEFAULT_LEVELS: tuple[str, ...] = ("task", "model", "tenant")
_GLOBAL = "*"
_QUANTILE = 0.25  # τ is matched at this quantile of the remaining length


@dataclass(frozen=True, slots=True)
class LengthPrior:
    """A (possibly conditional) chain model: R ~ τ + Exp(β), answer rate A, evidence `chains`."""

    a: float
    tau: float
    beta: float
    chains: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.a <= 1.0:
            raise ValueError(f"a: must be in [0, 1], got {self.a!r}")
        if not (math.isfinite(self.tau) and self.tau >= 0.0):
            raise ValueError(f"tau: must be finite and >= 0, got {self.tau!r}")
        if not (math.isfinite(self.beta) and self.beta > 0.0):
            raise ValueError(f"beta: must be finite and > 0, got {self.beta!r}")

    def conditional(self, survived: float) -> LengthPrior:
        """The same model given the chain already ran `survived` tokens (memoryless past τ)."""
        return LengthPrior(self.a, max(self.tau - survived, 0.0), self.beta, self.chains)


class _Chains:
    """Bounded store of one key's chains (total tokens, finished flag, answered flag) and the
    fits made from them, per `survived` (version and parent signature they were made under)."""

    def __init__(self, limit: int) -> None:
        self.rows: deque[tuple[int, bool, bool]] = deque(maxlen=limit)
        self.version = 0
        self.fits: dict[int, tuple[int, int, LengthPrior]] = {}

    def add(self, tokens: int, finished: bool, answered: bool) -> None:
        self.rows.append((tokens, finished, answered))
        self.version += 1

    def arrays(self) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
        if not self.rows:
            empty = np.zeros(0)
            return empty, empty.astype(bool), empty.astype(bool)
        data = np.array(self.rows, dtype=np.float64)
        return data[:, 0], data[:, 1] > 0, data[:, 2] > 0


class PriorBook:
    """Per-tag priors learned online; `prior(tags, survived)` is what `fit_window` consumes."""

    def __init__(
        self,
        *,
        default: LengthPrior | None = None,
        levels: Sequence[str] = DEFAULT_LEVELS,
        strength: float = 8.0,
        max_chains_per_key: int = 4096,
        max_keys: int = 4096,
    ) -> None:
        if strength <= 0:
            raise ValueError(f"strength: must be > 0, got {strength!r}")
        if max_chains_per_key < 1:
            raise ValueError(f"max_chains_per_key: must be >= 1, got {max_chains_per_key!r}")
        if max_keys < 1:
            raise ValueError(f"max_keys: must be >= 1, got {max_keys!r}")
        # A weak, generic reasoning-chain default: answers appear after a few hundred tokens.
        self.default = default or LengthPrior(a=0.6, tau=200.0, beta=1.0 / 1500.0)
        self.levels = tuple(levels)
        self.strength = float(strength)
        self._limit = max_chains_per_key
        # Least recently observed first: any producer can invent tag values, so the keys are
        # bounded and the stalest one (never the global pool) goes when a new one comes.
        self._chains: OrderedDict[str, _Chains] = OrderedDict()
        self._max_keys = max_keys
        self.evicted_keys = 0

    # ------------------------------------------------------------------ learning

    def observe(
        self, tags: Mapping[str, str], tokens: int, *, finished: bool, answered: bool
    ) -> None:
        """Record one chain's final state (report each chain once, after its last request)."""
        if tokens < 0:
            raise ValueError(f"tokens: must be >= 0, got {tokens!r}")
        for key in self.keys_for(tags):
            store = self._chains.get(key)
            if store is None:
                store = self._chains[key] = _Chains(self._limit)
                self._evict_beyond_cap()
            else:
                self._chains.move_to_end(key)
            store.add(int(tokens), bool(finished), bool(finished and answered))

    def _evict_beyond_cap(self) -> None:
        while len(self._chains) > self._max_keys + 1:  # + the global pool, never evicted
            oldest = next(k for k in self._chains if k != _GLOBAL)
            del self._chains[oldest]
            self.evicted_keys += 1

    @property
    def keys(self) -> int:
        """Pool keys held now (the global pool included)."""
        return len(self._chains)

    def chains_seen(self, tags: Mapping[str, str] | None = None) -> int:
        """How many chains the most specific key of `tags` (the global pool if None) holds."""
        key = self.keys_for(tags or {})[-1]
        store = self._chains.get(key)
        return len(store.rows) if store else 0

    # ------------------------------------------------------------------ reading

    def keys_for(self, tags: Mapping[str, str]) -> tuple[str, ...]:
        """Pool keys from the root to the most specific (levels absent from `tags` are skipped)."""
        keys = [_GLOBAL]
        parts: list[str] = []
        for level in self.levels:
            if level in tags:
                parts.append(f"{level}={tags[level]}")
                keys.append("|".join(parts))
        return tuple(keys)

    def prior(self, tags: Mapping[str, str], survived: int = 0) -> LengthPrior:
        """The model of a chain with these tags that already ran `survived` tokens."""
        parent = self.default.conditional(survived)
        for key in self.keys_for(tags):
            parent = self._fit_key(key, int(survived), parent)
        return parent

    def priors(
        self, tags: Sequence[Mapping[str, str]], survived: int = 0
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """(A, τ, β) arrays for a window; queries with identical tags share one lookup."""
        memo: dict[tuple[tuple[str, str], ...], LengthPrior] = {}
        out = np.empty((3, len(tags)))
        for i, t in enumerate(tags):
            sig = tuple(sorted((k, t[k]) for k in self.levels if k in t))
            p = memo.get(sig)
            if p is None:
                p = memo[sig] = self.prior(t, survived)
            out[:, i] = (p.a, p.tau, p.beta)
        return out[0], out[1], out[2]

    def _fit_key(self, key: str, survived: int, parent: LengthPrior) -> LengthPrior:
        store = self._chains.get(key)
        if store is None or not store.rows:
            return parent
        parent_sig = hash((parent.a, parent.tau, parent.beta))
        cached = store.fits.get(survived)
        if cached and cached[0] == store.version and cached[1] == parent_sig:
            return cached[2]
        tokens, finished, answered = store.arrays()
        fitted = fit_conditional(tokens, finished, answered, survived, parent, self.strength)
        store.fits[survived] = (store.version, parent_sig, fitted)
        return fitted


def fit_conditional(
    tokens: NDArray[np.float64],
    finished: NDArray[np.bool_],
    answered: NDArray[np.bool_],
    survived: int,
    parent: LengthPrior,
    strength: float,
) -> LengthPrior:
    """Shrunk censored fit of the remaining length of chains that ran past `survived` tokens."""
    alive = tokens > survived
    r = tokens[alive] - survived
    f = finished[alive]
    d = int(f.sum())
    if r.size == 0:
        return parent
    a = (strength * parent.a + float(answered[alive].sum())) / (strength + d)
    tau = parent.tau
    beta = _beta_given_tau(r, d, tau, parent, strength)
    q_data = kaplan_meier_quantile(r, f, _QUANTILE)
    if q_data is not None:
        for _ in range(3):  # τ and β depend on each other; a few rounds settle them
            tau_data = max(q_data + math.log1p(-_QUANTILE) / beta, 0.0)
            tau = (strength * parent.tau + d * tau_data) / (strength + d)
            beta = _beta_given_tau(r, d, tau, parent, strength)
    return LengthPrior(a=min(max(a, 0.0), 1.0), tau=tau, beta=beta, chains=float(r.size))


def _beta_given_tau(
    r: NDArray[np.float64], d: int, tau: float, parent: LengthPrior, strength: float
) -> float:
    exposure = float(np.maximum(r - tau, 0.0).sum())
    return (strength + d) / (strength / parent.beta + exposure)


def kaplan_meier_quantile(
    r: NDArray[np.float64], finished: NDArray[np.bool_], q: float
) -> float | None:
    """Smallest r at which the Kaplan–Meier CDF reaches q (None if censoring hides it)."""
    order = np.lexsort((~finished, r))  # at ties, events before censorings (KM convention)
    r_sorted, f_sorted = r[order], finished[order]
    at_risk = np.arange(r.size, 0, -1, dtype=np.float64)
    survival = np.cumprod(np.where(f_sorted, 1.0 - 1.0 / at_risk, 1.0))
    reached = np.flatnonzero((1.0 - survival >= q) & f_sorted)
    return float(r_sorted[reached[0]]) if reached.size else None
