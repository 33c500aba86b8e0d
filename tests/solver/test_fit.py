"""Censored fitting, shrinkage, the probe paths and vectorised == scalar."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from clearbudget.solver.answers import consensus
from clearbudget.solver.fit import (
    CurveEstimate,
    FitSettings,
    ProbeOutcome,
    ProbePlan,
    fit_window,
    select_probes,
)
from clearbudget.solver.priors import LengthPrior, PriorBook, fit_conditional, kaplan_meier_quantile

TAGS = {"task": "amc", "model": "m7b"}


def _draws(tau: float, beta: float, n: int, cap: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    length = tau + rng.exponential(1.0 / beta, size=n)
    return np.minimum(length, cap), length <= cap


def test_censored_fit_recovers_tau_and_beta() -> None:
    tokens, finished = _draws(tau=400.0, beta=1 / 800, n=20_000, cap=2500.0)
    weak = LengthPrior(a=0.5, tau=100.0, beta=1 / 3000)
    fit = fit_conditional(tokens, finished, finished, 0, weak, strength=1.0)
    assert fit.tau == pytest.approx(400.0, rel=0.05)
    assert fit.beta == pytest.approx(1 / 800, rel=0.05)


def test_conditional_fit_is_memoryless_past_tau() -> None:
    tokens, finished = _draws(tau=300.0, beta=1 / 600, n=20_000, cap=4000.0, seed=1)
    weak = LengthPrior(a=0.5, tau=0.0, beta=1 / 3000)
    fit = fit_conditional(tokens, finished, finished, 500, weak, strength=1.0)
    assert fit.tau < 40.0
    assert fit.beta == pytest.approx(1 / 600, rel=0.06)


def test_few_chains_stay_near_the_prior() -> None:
    prior = LengthPrior(a=0.6, tau=200.0, beta=1 / 1500)
    tokens, finished = np.array([50.0, 60.0]), np.array([True, True])
    few = fit_conditional(tokens, finished, finished, 0, prior, strength=8.0)
    many_t, many_f = np.full(400, 50.0), np.ones(400, dtype=bool)
    many = fit_conditional(many_t, many_f, many_f, 0, prior, strength=8.0)
    assert abs(few.tau - prior.tau) < abs(many.tau - prior.tau)
    assert prior.beta < few.beta < many.beta


def test_kaplan_meier_hidden_quantile_is_none() -> None:
    r = np.array([10.0, 500.0, 500.0, 500.0])
    f = np.array([True, False, False, False])
    assert kaplan_meier_quantile(r, f, 0.5) is None
    assert kaplan_meier_quantile(r, f, 0.25) == 10.0


def test_book_pools_per_tag_with_global_fallback() -> None:
    book = PriorBook()
    for _ in range(200):
        book.observe(TAGS, 100, finished=True, answered=True)
    short = book.prior(TAGS)
    other = book.prior({"task": "aime"})
    assert short.beta > other.beta > book.default.beta  # the global pool learned a little
    assert book.chains_seen(TAGS) == 200
    assert book.keys_for({"model": "x", "task": "t"}) == ("*", "task=t", "task=t|model=x")


def test_book_learns_answer_rate_from_observable_answers() -> None:
    book = PriorBook()
    for i in range(100):
        book.observe(TAGS, 300, finished=True, answered=i % 4 == 0)
    assert book.prior(TAGS).a < 0.4


def test_plan_validation() -> None:
    assert not ProbePlan(0, 0).enabled
    with pytest.raises(ValueError, match="samples"):
        ProbePlan(-1, 10)
    with pytest.raises(ValueError, match="tokens"):
        ProbePlan(2, 0)


def test_k0_gives_the_from_scratch_prior() -> None:
    book = PriorBook()
    fit = fit_window([[], []], [TAGS, {}], None, ProbePlan(0, 0), book)
    assert np.allclose(fit.tau, book.default.tau)
    assert list(fit.continue_from) == [-1, -1]
    assert fit.needs_dispatch.all()
    assert fit.probe_tokens.sum() == 0


def test_finished_probes_that_agree_answer_now() -> None:
    plan = ProbePlan(2, 256)
    rows = [
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(True, 150, "7.0")],  # agree
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(True, 150, "8")],  # all done, disagree
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(False, 256)],  # one vote: continue
        [ProbeOutcome(False, 256), ProbeOutcome(False, 256)],
    ]
    fit = fit_window(rows, [TAGS] * 4, None, plan, PriorBook())
    assert fit.answer_now == ("7", "7", None, None)
    assert list(fit.needs_dispatch) == [False, False, True, True]
    assert list(fit.continue_from) == [-1, -1, 1, 0]
    assert fit.fallback_answer[2] == "7"
    assert list(fit.probe_tokens) == [250, 250, 356, 512]
    # A finished probe makes the query look shorter than one with both probes censored.
    assert fit.beta[2] > fit.beta[3]


def test_censored_probe_curve_conditions_on_p() -> None:
    book = PriorBook(default=LengthPrior(a=0.6, tau=400.0, beta=1 / 1000))
    fit = fit_window([[ProbeOutcome(False, 256)]], [TAGS], None, ProbePlan(1, 256), book)
    assert fit.tau[0] == pytest.approx(144.0)
    assert fit.beta[0] == pytest.approx(1 / 1000)  # k = 1 carries no per-query rate signal


def test_hint_lengthens_hard_queries() -> None:
    plan = ProbePlan(1, 64)
    rows = [[ProbeOutcome(False, 64)]] * 2
    fit = fit_window(rows, [TAGS] * 2, [0.0, 1.0], plan, PriorBook())
    assert fit.beta[0] > fit.beta[1]
    with pytest.raises(ValueError, match=r"hints\[0\]"):
        fit_window(rows[:1], [TAGS], [1.5], plan, PriorBook())


def test_bad_outcomes_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"outcomes\[0\]\[0\]\.tokens"):
        fit_window([[ProbeOutcome(False, 100)]], [TAGS], None, ProbePlan(1, 256), PriorBook())
    with pytest.raises(ValueError, match=r"outcomes\[0\]"):
        fit_window([[]], [TAGS], None, ProbePlan(1, 256), PriorBook())


def test_vectorised_matches_scalar() -> None:
    rng = np.random.default_rng(3)
    book = PriorBook()
    tag_sets = [TAGS, {"task": "aime", "model": "m14b"}, {"task": "amc"}]
    for _ in range(300):
        tags = tag_sets[int(rng.integers(3))]
        n = int(rng.integers(50, 3000))
        book.observe(tags, n, finished=bool(rng.random() < 0.7), answered=True)
    plan = ProbePlan(3, 200)
    rows, tags, hints = [], [], []
    for i in range(40):
        lengths = rng.integers(20, 600, size=3)
        rows.append(
            [ProbeOutcome(bool(t <= 200), int(min(t, 200)), str(t % 3) if t <= 200 else None)
             for t in lengths]
        )  # fmt: skip
        tags.append(tag_sets[i % 3])
        hints.append(None if i % 2 else float(rng.random()))
    fit = fit_window(rows, tags, hints, plan, book)
    for i in range(40):
        one = reference_fit(rows[i], tags[i], hints[i], plan, book)
        got = fit.estimate(i)
        assert (got.answer_now, got.fallback_answer) == (one.answer_now, one.fallback_answer)
        assert (got.continue_from, got.probe_tokens) == (one.continue_from, one.probe_tokens)
        assert [got.a, got.tau, got.beta] == pytest.approx([one.a, one.tau, one.beta], rel=1e-12)


def reference_fit(
    outcomes: Sequence[ProbeOutcome],
    tags: Mapping[str, str],
    hint: float | None,
    plan: ProbePlan,
    priors: PriorBook,
    settings: FitSettings | None = None,
) -> CurveEstimate:
    """One query's fit written out scalar by scalar: the reference `fit_window` must match."""
    s = settings or FitSettings()
    p = plan.tokens if plan.enabled else 0
    cond = priors.prior(tags, survived=p)
    beta = cond.beta
    if plan.enabled:
        base = priors.prior(tags, survived=0)
        d = sum(o.finished for o in outcomes)
        exposure = sum(max(min(o.tokens, p) - base.tau, 0.0) for o in outcomes)
        all_censored = len(outcomes) * max(p - base.tau, 0.0)
        n0 = s.query_strength
        beta *= (n0 + d) / (n0 + base.beta * exposure) * (n0 + base.beta * all_censored) / n0
    if hint is not None:
        beta *= math.exp(-s.hint_slope * (hint - 0.5))
    vote = consensus([o.answer for o in outcomes if o.finished])
    a = cond.a * (vote.votes / vote.cast if vote.cast and not vote.unanimous else 1.0)
    censored = [i for i, o in enumerate(outcomes) if not o.finished]
    has_chain = bool(censored) or not plan.enabled
    answer_now = vote.answer if vote.unanimous and vote.votes >= s.agree_votes else None
    if not has_chain:
        answer_now = vote.answer
    return CurveEstimate(
        a=min(max(a if has_chain else 0.0, 0.0), 1.0),
        tau=max(cond.tau, 0.0),
        beta=beta,
        answer_now=answer_now,
        fallback_answer=vote.answer,
        continue_from=censored[0] if censored else -1,
        probe_tokens=sum(min(o.tokens, p) for o in outcomes),
    )


def test_select_probes_skips_hopeless_queries_when_tight() -> None:
    book = PriorBook()
    short, long_ = {"task": "easy"}, {"task": "hard"}
    for _ in range(300):
        book.observe(short, 300, finished=True, answered=True)
        book.observe(long_, 8000, finished=True, answered=True)
    tags = [short] * 4 + [long_] * 4
    tight = select_probes(tags, None, 3000.0, book)
    assert tight[:4].all()
    assert not tight[4:].any()
    assert select_probes(tags, None, 1e6, book).all()
    assert not select_probes(tags, None, 0.0, book).any()


def test_select_probes_never_selects_more_probes_than_the_budget_pays_for() -> None:
    book = PriorBook()
    tags = [{"task": "easy"}] * 10
    for _ in range(300):
        book.observe(tags[0], 300, finished=True, answered=True)
    assert select_probes(tags, None, 1e6, book, probe_cost=256).all()
    assert select_probes(tags, None, 1000.0, book, probe_cost=256).sum() == 3
    assert not select_probes(tags, None, 200.0, book, probe_cost=256).any()
