"""Per-query difficulty: every query's own answered-by-budget curve before any token is spent.

What an online system knows of a query before running it, and what it makes of it:

* its tags (task, model, tenant) and `difficulty_hint` (bucketed, a tag level of its own): the
  stage curve of its most specific tag key (`HazardBook`): when chains like it end, and how
  often a chain ending at each length carries an answer (falling with length);
* its prompt text: earlier chains of the same problem (`PromptMemory`, any model or tenant).
  Chains of the problem under *other* serving tags say how much faster or slower it runs than
  their own tags' chains: a shared frailty m multiplying the tag hazard, Gamma(n₀, n₀) a priori,
  whose posterior adds each chain's event and its cumulative tag hazard. Their lengths, mapped
  onto this query's tag curve at equal cumulative hazard, also enter the predictive as kernels
  whose width is learned online (how far a chain lands from its problem's mapped chains).
  Chains of the *same* record (same problem, same serving tags) are draws of this very chain:
  the predictive is a Dirichlet-process mixture of the frailty curve (weight w₀) and those
  chains (a finished one a point at its length with its answered flag, a censored one the
  frailty curve beyond where it was cut); see `solver.mixture`;
* how well the problem's earlier answers agree (`DifficultySettings.agreement`): a problem whose
  chains keep giving one answer likely converges on the right one.

`curves(queries, survived=p)` returns, per query, U(b): the probability that a chain already
`p` tokens long (and not finished) ends within b more tokens with an answer (times the
agreement factor), on a fixed grid of b. A query's own outcome is never read: `observe` is
called once its chain is over, and only later queries see it.

Graded feedback (`grade`): where a downstream grader says whether a query's answer was right,
correctness replaces "an answer was extracted" for that query's chains. `observe` returns an
`Observation` of each chain (no prompt text, a few integers); `grade(observations, correct)`
corrects what those observations already taught, so nothing is counted twice (see `grade`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from clearbudget.solver.answers import normalize_answer
from clearbudget.solver.hazards import DEFAULT_LEVELS, HazardBook
from clearbudget.solver.memory import (
    ANSWER,
    ANSWERED,
    CURVE,
    FINISHED,
    MASKED_LEVELS,
    NO_ANSWER,
    RECORD,
    TOKENS,
    Interner,
    PromptMemory,
    TagSignature,
    prompt_key,
    tag_signature,
)
from clearbudget.solver.mixture import (
    BUDGET_GRID,
    Chains,
    Kernels,
    OwnChain,
    Window,
    inverse_hazard,
    mixture,
)
from clearbudget.solver.stages import StageCurve, exposure

__all__ = [
    "BUDGET_GRID",
    "HINT_LEVEL",
    "DifficultyModel",
    "DifficultySettings",
    "Observation",
    "OwnChain",
    "QueryCurves",
    "QueryInfo",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
HINT_LEVEL = "hint"
_RESOLVED_CACHE = 8192


@dataclass(frozen=True, slots=True)
class DifficultySettings:
    """Generic shrinkage strengths (pseudo-counts), not fitted to any pool."""

    frailty_shape: float = 1.5  # n₀: prior events behind a problem's speed-up factor
    cross_weight: float = 1.0  # a chain under other serving tags counts this much
    own_prior_chains: float = 2.0  # w₀: the frailty curve's weight against the record's chains
    cross_chains: int = 4  # at most this many other-tag chains of the problem shape its curve
    hint_buckets: int = 5  # difficulty_hint h ∈ [0, 1] → tag value floor(h·buckets)
    agreement: bool = True  # scale by the problem's answer agreement (needs answers observed)
    agreement_prior: float = 2.0  # pseudo-answers at the running agreement rate
    max_prompts: int = 65536
    max_chains: int = 64


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """What the model may know of a query before it runs."""

    prompt: str
    tags: Mapping[str, str] = field(default_factory=dict)
    hint: float | None = None


@dataclass(frozen=True, slots=True)
class QueryCurves:
    """U(b) per query (rows) at the continuation budgets `budgets` (columns, from 0)."""

    budgets: FloatArray
    utility: FloatArray


@dataclass(frozen=True, slots=True)
class Observation:
    """What `DifficultyModel.observe` learned from one chain, enough to grade it later: the
    prompt's fingerprint, the tag key its stage curve pools under and the memory row it wrote
    (record, curve, tokens, finished, answered, answer id; `solver.memory.COLUMNS`)."""

    key: int
    curve_tags: TagSignature
    row: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return self.row[TOKENS]

    @property
    def answered(self) -> bool:
        return self.row[ANSWERED] > 0

    @property
    def answer(self) -> int:
        """The chain's answer id (`NO_ANSWER`: none)."""
        return self.row[ANSWER]


@dataclass(frozen=True, slots=True)
class _Resolved:
    record: int
    curve: int
    curve_tags: TagSignature
    key: int


class DifficultyModel:
    """Learns online from finished chains; predicts every query's curve (module docstring)."""

    def __init__(
        self,
        settings: DifficultySettings | None = None,
        *,
        levels: Sequence[str] = DEFAULT_LEVELS,
        masked: Sequence[str] = MASKED_LEVELS,
    ) -> None:
        self.settings = s = settings or DifficultySettings()
        self.book = HazardBook(levels=levels)
        self.memory = PromptMemory(max_prompts=s.max_prompts, max_chains=s.max_chains)
        self._masked = tuple(masked)
        self._signatures = Interner()
        self._answers = Interner()
        self._agreement = _AgreementRate()
        self._spread = _RunningMean(prior=0.5, weight=4.0)  # log-length variance, ~0.7 sd
        self._resolved: dict[tuple[object, ...], _Resolved] = {}
        self._generation = 0

    def observe(
        self,
        query: QueryInfo,
        tokens: int,
        *,
        finished: bool,
        answered: bool,
        answer: str | None = None,
    ) -> Observation:
        """Record one chain's final state (once per chain, after its last request); the
        returned `Observation` is what `grade` needs to correct it later."""
        answered = bool(finished and answered)
        r = self._resolve(query)
        self.book.observe(dict(r.curve_tags), tokens, finished=finished, answered=answered)
        answer_id = NO_ANSWER
        if answered and answer is not None:
            answer_id = self._answers.id(normalize_answer(answer))
            self._agreement.add(self.memory.chains(r.key)[:, ANSWER], answer_id)
        if finished:
            self._learn_spread(r, tokens)
        row = (r.record, r.curve, int(tokens), int(finished), int(answered), answer_id)
        self.memory.add(r.key, row)
        return Observation(r.key, r.curve_tags, row)

    def grade(self, observations: Sequence[Observation], correct: bool) -> int:
        """Apply a grader's verdict on one query's delivered answer to the chains `observe`
        recorded for that query (`observations`, as `observe` returned them).

        The verdict covers the chains that carry the graded answer: the most common answer
        among the query's answered chains (ties: the latest), the one the query delivered
        when its chains agree. Their "answered" was already counted by `observe`, so the grade
        corrects it instead of adding to it:

        * `correct=True`: answered was right; nothing changes.
        * `correct=False`: each such chain is re-counted as one that finished without an
          answer, in the answer-rate statistics of every tag key its curve pools under (the
          stage of its length: one answered chain fewer, its end event kept) and in the
          prompt memory (its row's answered flag 0 and answer id cleared, so it neither adds
          answered mass to later queries of the problem nor votes in its agreement). The model
          then holds exactly what `observe(..., answered=False)` would have left, except the
          running agreement rate (how consistent answers are, not whether they are right).

        Chains that finished without an answer or were cut are not touched, nor are those
        with another answer. A chain the model forgot since (its prompt or tag key evicted,
        its memory row overwritten) is corrected where it is still held. Apply a query's grade
        once: a second `correct=False` would subtract again where an equal chain is held.
        Returns how many chains the verdict covered (0: none carried an answer)."""
        answered = [o for o in observations if o.answered]
        if not answered:
            return 0
        counts: dict[int, int] = {}
        for o in answered:  # insertion order: the latest of equally common answers wins ties
            counts[o.answer] = counts.pop(o.answer, 0) + 1
        graded = max(reversed(counts), key=counts.__getitem__)
        covered = [o for o in answered if o.answer == graded]
        if not correct:
            for o in covered:
                self.book.unanswer(dict(o.curve_tags), o.tokens)
                self.memory.unanswer(o.key, o.row)
        return len(covered)

    def _learn_spread(self, r: _Resolved, tokens: int) -> None:
        """How far a chain lands from the problem's earlier chains under other tags, once those
        are mapped onto its own tags' length scale (log tokens): the width of their kernels."""
        rows = self.memory.chains(r.key)
        other = rows[(rows[:, RECORD] != r.record) & (rows[:, FINISHED] > 0)]
        if other.size == 0 or tokens <= 0:
            return
        mapped = self._map_lengths(other[:, CURVE], other[:, TOKENS], r.curve_tags)
        self._spread.add(float(np.mean((np.log(tokens) - np.log(mapped)) ** 2)))

    def _map_lengths(self, curves: IntArray, tokens: IntArray, target: TagSignature) -> FloatArray:
        """Lengths under other tag curves mapped to `target`'s at equal cumulative hazard."""
        hazard = np.empty(tokens.size)
        for ident in np.unique(curves).tolist():
            mine = curves == ident
            hazard[mine] = exposure(tokens[mine]) @ self._curve_of(ident).rate
        return inverse_hazard(self.book.curve(dict(target)).rate, hazard)

    def curves(
        self,
        queries: Sequence[QueryInfo],
        survived: int = 0,
        siblings: Sequence[Sequence[OwnChain]] | None = None,
    ) -> QueryCurves:
        """U(b) of each query's chain given it already ran `survived` tokens unfinished."""
        if not queries:
            return QueryCurves(BUDGET_GRID, np.zeros((0, BUDGET_GRID.size)))
        resolved = [self._resolve(q) for q in queries]
        chains = Chains.gather(self.memory, [(r.record, r.curve, r.key) for r in resolved],
                               siblings)  # fmt: skip
        query_curves = np.array([r.curve for r in resolved], dtype=np.int64)
        window = Window.build(self._curve_of, query_curves, chains, float(survived))
        shape, scale = self._frailty(window, chains, len(resolved))
        prior = window.prior(shape, scale)
        s = self.settings
        kernels = Kernels(s.own_prior_chains, s.cross_weight, float(np.sqrt(self._spread.mean)),
                          s.cross_chains)  # fmt: skip
        utility = mixture(window, chains, shape, scale, prior, kernels)
        if self.settings.agreement:
            utility *= self._agreement_factor(chains, len(resolved))[:, None]
        return QueryCurves(BUDGET_GRID, utility)

    def signature(self, ident: int) -> TagSignature | None:
        value = self._signatures.value(ident)
        return value if isinstance(value, tuple) else None

    def _curve_of(self, ident: int) -> StageCurve:
        """The stage curve of a tag-signature id (a forgotten id reads the global pool's)."""
        tags = self.signature(ident)
        return self.book.curve(dict(tags) if tags is not None else {})

    def _resolve(self, query: QueryInfo) -> _Resolved:
        # The same query is resolved at probe selection, at its decision and when it is
        # observed: remember the last few thousand (hashing prompts and tags is most of it).
        memo = (query.prompt, tuple(query.tags.items()), query.hint)
        found = self._resolved.get(memo)
        if found is None:
            stale = self._generation != self._signatures.generation  # ids were recycled
            if stale or len(self._resolved) >= _RESOLVED_CACHE:
                self._resolved.clear()
                self._generation = self._signatures.generation
            found = self._resolved[memo] = self._resolve_new(query)
        return found

    def _resolve_new(self, query: QueryInfo) -> _Resolved:
        tags = dict(query.tags)
        record = self._signatures.id(tag_signature({k: tags[k] for k in self._masked if k in tags}))
        if query.hint is not None:
            tags[HINT_LEVEL] = str(_hint_bucket(query.hint, self.settings.hint_buckets))
        curve_tags = tag_signature(tags)
        key = prompt_key(query.prompt, query.tags, self._masked)
        return _Resolved(record, self._signatures.id(curve_tags), curve_tags, key)

    def _frailty(self, window: Window, chains: Chains, n: int) -> tuple[FloatArray, FloatArray]:
        """Gamma posterior (shape, rate) of each query's hazard multiplier."""
        s = self.settings
        weight = np.where(chains.own, 1.0, s.cross_weight)
        hazard = window.chain_hazard
        shape = s.frailty_shape + np.bincount(chains.query, weight * chains.finished, minlength=n)
        scale = s.frailty_shape + np.bincount(chains.query, weight * hazard, minlength=n)
        return shape, scale

    def _agreement_factor(self, chains: Chains, n: int) -> FloatArray:
        """Share of the problem's answers that agree with its most common one, shrunk toward
        the running agreement rate: how likely a new answer is the one the problem settles on."""
        k, prior = self.settings.agreement_prior, self._agreement.rate
        has = chains.answer != NO_ANSWER
        query, answer = chains.query[has], chains.answer[has]
        cast = np.bincount(query, minlength=n).astype(np.float64)
        top = np.zeros(n)
        if query.size:
            # One int per (query, answer) pair: answer ids are small (the interner is bounded).
            pairs, counts = np.unique(query * (1 << 32) + answer, return_counts=True)
            np.maximum.at(top, pairs >> 32, counts.astype(np.float64))
        return (k * prior + top) / (k + cast)


class _RunningMean:
    """A mean of observations shrunk toward `prior` with `weight` pseudo-observations."""

    def __init__(self, prior: float, weight: float) -> None:
        self.total = prior * weight
        self.count = weight

    @property
    def mean(self) -> float:
        return self.total / self.count

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1.0


def _hint_bucket(hint: float, buckets: int) -> int:
    return min(int(hint * buckets), buckets - 1)


class _AgreementRate:
    """Running rate at which a new answer matches the most common earlier answer of its
    problem (the prior of every problem's agreement factor); starts at ½."""

    def __init__(self) -> None:
        self.hits = 1.0
        self.trials = 2.0

    @property
    def rate(self) -> float:
        return self.hits / self.trials

    def add(self, earlier: IntArray, answer: int) -> None:
        answers = earlier[earlier != NO_ANSWER]
        if answers.size == 0:
            return
        values, counts = np.unique(answers, return_counts=True)
        self.hits += float(values[np.argmax(counts)] == answer)
        self.trials += 1.0
