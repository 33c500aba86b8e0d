"""From predicted curves to (A, τ, β): the envelope and price fits, probe selection, and the
window allocation on curves."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.solver.difficulty import BUDGET_GRID, DifficultyModel, QueryInfo
from clearbudget.solver.fit import ProbeOutcome, ProbePlan
from clearbudget.solver.query_fit import (
    allocate_curves,
    continuation_chance,
    fit_queries,
    plan_probes,
    probe_lengths,
    select_queries,
)
from clearbudget.solver.surge_fit import curve_price, fit_at_price, fit_surge
from clearbudget.solver.utility import envelope, value

G = BUDGET_GRID


def step_curve(at: float, height: float = 0.9) -> np.ndarray:
    return np.where(at <= G, height, 0.0)


def heavy_tail_curve() -> np.ndarray:
    """Slow, log-like growth: 0.1 per doubling past 100 tokens."""
    return np.clip(0.1 * np.log2(np.maximum(G, 1.0) / 100.0), 0.0, 0.9)


def test_envelope_fit_keeps_the_curves_best_value_per_token_and_knee() -> None:
    u = np.vstack([step_curve(1000.0), heavy_tail_curve(), np.zeros_like(G)])
    a, tau, beta = fit_surge(G, u)
    env = envelope(a[:2], tau[:2], beta[:2])
    ratio = u[:2, 1:] / G[1:]
    best = np.argmax(ratio, axis=1)
    np.testing.assert_allclose(env.slope, ratio[[0, 1], best], rtol=1e-6)
    np.testing.assert_allclose(env.knee, G[1:][best], rtol=1e-6)
    assert a[2] == 0.0  # nothing to gain: never funded
    assert np.all((a >= 0) & (a <= 1) & (tau >= 0) & (beta > 0))


def delayed_tail_curve() -> np.ndarray:
    """A strict phase to 300 tokens, then slow, log-like growth."""
    return np.clip(0.25 * np.log2(np.maximum(G, 1.0) / 300.0), 0.0, 0.9)


def test_price_fit_demands_what_the_curve_demands_at_that_price() -> None:
    u = delayed_tail_curve()[None, :]
    for price in (1e-4, 3e-4):
        a, tau, beta = fit_at_price(G, u, np.array([price]))
        own = int(np.argmax(u[0] - price * G))
        assert tau[0] > 0.0
        demand = tau + np.log(a * beta / price) / beta
        assert demand[0] == pytest.approx(G[own], rel=1e-6)
        assert value(G[own], a, tau, beta)[0] == pytest.approx(u[0, own], rel=1e-6)


def test_price_fit_keeps_solvency_and_falls_back_on_the_envelope() -> None:
    u = np.vstack([heavy_tail_curve(), step_curve(2000.0)])
    price = np.array([1e-5, 1.0])  # the step is insolvent at a price of 1 per token
    a, tau, beta = fit_at_price(G, u, price)
    env = envelope(a, tau, beta)
    assert env.slope[0] > price[0]
    assert tau[0] >= 0.0
    env_a, env_tau, env_beta = fit_surge(G, u[1:])
    assert (a[1], tau[1], beta[1]) == (env_a[0], env_tau[0], env_beta[0])


def test_curve_price_spends_the_budget_on_the_curves_own_demands() -> None:
    u = np.vstack([heavy_tail_curve()] * 10)
    v, cap = np.ones(10), np.full(10, np.inf)
    price = curve_price(G, u, 20_000.0, v, cap)
    demand = G[np.argmax(u - price * G, axis=1)].sum()
    assert 15_000.0 < demand <= 20_000.0
    assert curve_price(G, u, 1e9, v, cap) == 0.0  # everything fits


def test_allocation_on_curves_stays_within_budget_and_prefers_sure_short_queries() -> None:
    u = np.vstack([step_curve(400.0), step_curve(4000.0), heavy_tail_curve()])
    result = allocate_curves(["short", "long", "tail"], G, u, 1000.0)
    assert result.allocations.sum() <= 1000.0 + 1e-6
    assert result.allocations[0] >= 400.0
    assert result.allocations[1] == 0.0
    ample = allocate_curves(["short", "long", "tail"], G, u, 1e7)
    assert ample.allocations[1] >= 4000.0


def _model_with_two_kinds() -> DifficultyModel:
    model = DifficultyModel()
    for i in range(40):
        model.observe(QueryInfo("short problem", {"task": "t"}), 150, finished=True,
                      answered=True, answer="1")  # fmt: skip
        model.observe(QueryInfo("long problem", {"task": "t"}), 9000, finished=True,
                      answered=True, answer="2")  # fmt: skip
        model.observe(QueryInfo(f"mid {i}", {"task": "t"}), 150 + 200 * i, finished=True,
                      answered=True, answer=str(i))  # fmt: skip
    return model


def test_probe_selection_skips_queries_known_to_be_hopeless() -> None:
    model = _model_with_two_kinds()
    infos = [QueryInfo("short problem", {"task": "t"}), QueryInfo("long problem", {"task": "t"})]
    assert select_queries(infos, 600.0, model, probe_cost=256).tolist() == [True, False]
    assert select_queries(infos, 1e6, model, probe_cost=256).all()
    assert not select_queries(infos, 200.0, model, probe_cost=256).any()


def test_fit_queries_answers_finished_probes_and_continues_censored_ones() -> None:
    model = _model_with_two_kinds()
    plan = ProbePlan(1, 256)
    infos = [QueryInfo("short problem", {"task": "t"}), QueryInfo("long problem", {"task": "t"})]
    outcomes = [[ProbeOutcome(True, 150, "1")], [ProbeOutcome(False, 256)]]
    window = fit_queries(outcomes, infos, plan, model)
    assert window.fit.answer_now == ("1", None)
    assert window.fit.continue_from.tolist() == [-1, 0]
    assert window.fit.a[0] == 0.0  # nothing left to run
    assert window.utility.shape == (2, G.size)
    # The long problem's continuation: nothing before its known length, most of it after.
    long = window.utility[1]
    assert np.interp(4000, G, long) < 0.1 < 0.6 < np.interp(12000, G, long)


def test_a_query_predicted_to_finish_early_gets_a_probe_that_just_covers_it() -> None:
    plan = ProbePlan(1, 256)
    curves = np.stack([step_curve(150), step_curve(9000), heavy_tail_curve(), 0 * G])
    lengths = probe_lengths(G, curves, plan)
    assert 150 <= lengths[0] <= 192  # finishes by 150: a 160-token probe answers it
    assert lengths[0] % 32 == 0
    assert lengths[1:].tolist() == [256, 256, 256]  # long, slow or hopeless: the plan's probe
    assert probe_lengths(G, curves, ProbePlan(0, 0)).tolist() == [0, 0, 0, 0]


def test_probe_planning_pays_each_query_its_own_probe() -> None:
    model = _model_with_two_kinds()
    infos = [QueryInfo("short problem", {"task": "t"})] * 4
    selected, lengths = plan_probes(infos, 800.0, model, ProbePlan(1, 256))
    assert len(set(lengths.tolist())) == 1
    assert 150 <= lengths[0] <= 192  # learned to finish at 150
    assert selected.tolist() == [True] * 4  # four such probes fit in 800; four of 256 do not
    assert select_queries(infos, 800.0, model, probe_cost=256).sum() == 3


def test_a_window_of_mixed_probe_lengths_is_fitted_as_its_parts() -> None:
    model = _model_with_two_kinds()
    short = QueryInfo("short problem", {"task": "t"})
    long = QueryInfo("long problem", {"task": "t"})
    plan = ProbePlan(1, 256)
    mixed = fit_queries(
        [[ProbeOutcome(False, 160)], [ProbeOutcome(False, 256)]], [short, long], plan, model,
        probe_tokens=[160, 256],
    )  # fmt: skip
    alone = [
        fit_queries([[ProbeOutcome(False, 160)]], [short], ProbePlan(1, 160), model),
        fit_queries([[ProbeOutcome(False, 256)]], [long], plan, model),
    ]
    for i, part in enumerate(alone):
        assert mixed.fit.a[i] == pytest.approx(part.fit.a[0])
        assert mixed.fit.tau[i] == pytest.approx(part.fit.tau[0])
        np.testing.assert_allclose(mixed.utility[i], part.utility[0])
    assert mixed.fit.probe_tokens.tolist() == [160, 256]
    with pytest.raises(ValueError, match="censored samples run exactly p"):
        fit_queries([[ProbeOutcome(False, 256)]], [short], plan, model, probe_tokens=[160])


def test_a_chains_continuation_chance_is_the_curve_the_window_was_fitted_on() -> None:
    model = _model_with_two_kinds()
    plan = ProbePlan(2, 256)
    info = QueryInfo("long problem", {"task": "t"})
    for outcomes in ([ProbeOutcome(True, 150, "1"), ProbeOutcome(False, 256)],  # one vote
                     [ProbeOutcome(False, 256), ProbeOutcome(False, 256)]):  # fmt: skip
        window = fit_queries([outcomes], [info], plan, model)
        continued = int(window.fit.continue_from[0])
        extras = (500, 4000, 12000)
        chances = continuation_chance(model, info, outcomes, continued, 256, extras)
        assert chances == pytest.approx(np.interp(extras, G, window.utility[0]))
    # Finished probes that disagree lower it by the majority's share, as in the fit.
    split = [ProbeOutcome(True, 150, "1"), ProbeOutcome(True, 180, "2"), ProbeOutcome(False, 256)]
    one = [ProbeOutcome(True, 150, "1"), ProbeOutcome(False, 256), ProbeOutcome(False, 256)]
    (lowered,) = continuation_chance(model, info, split, 2, 256, (12000,))
    (unanimous,) = continuation_chance(model, info, one, 2, 256, (12000,))
    assert lowered == pytest.approx(0.5 * unanimous, rel=0.2)
