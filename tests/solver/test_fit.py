"""Probe plans and outcomes: validation, the answer logic of finished probes and which probes a
budget pays for, through the per-query fit (`fit_queries`) on a fresh model."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.solver.difficulty import DifficultyModel, QueryInfo
from clearbudget.solver.fit import ProbeOutcome, ProbePlan, affordable_probes
from clearbudget.solver.query_fit import fit_queries

TAGS = {"task": "amc", "model": "m7b"}


def infos(n: int, hints: list[float | None] | None = None) -> list[QueryInfo]:
    hints = hints or [None] * n
    return [QueryInfo(f"problem {i}", TAGS, hint) for i, hint in enumerate(hints)]


def test_plan_validation() -> None:
    assert not ProbePlan(0, 0).enabled
    with pytest.raises(ValueError, match="samples"):
        ProbePlan(-1, 10)
    with pytest.raises(ValueError, match="tokens"):
        ProbePlan(2, 0)


def test_without_probes_every_query_starts_a_fresh_chain() -> None:
    fit = fit_queries([[], []], infos(2), ProbePlan(0, 0), DifficultyModel()).fit
    assert list(fit.continue_from) == [-1, -1]
    assert fit.answer_now == (None, None)
    assert fit.probe_tokens.sum() == 0


def test_finished_probes_that_agree_answer_now() -> None:
    plan = ProbePlan(2, 256)
    rows = [
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(True, 150, "7.0")],  # agree
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(True, 150, "8")],  # all done, disagree
        [ProbeOutcome(True, 100, "7"), ProbeOutcome(False, 256)],  # one vote: continue
        [ProbeOutcome(False, 256), ProbeOutcome(False, 256)],
    ]
    window = fit_queries(rows, infos(4), plan, DifficultyModel())
    fit = window.fit
    assert fit.answer_now == ("7", "7", None, None)
    assert list(fit.needs_dispatch) == [False, False, True, True]
    assert list(fit.continue_from) == [-1, -1, 1, 0]
    assert fit.fallback_answer[2] == "7"
    assert list(fit.probe_tokens) == [250, 250, 356, 512]
    assert not window.utility[:2].any()  # nothing left to run


def test_bad_outcomes_and_hints_name_the_field() -> None:
    model, plan = DifficultyModel(), ProbePlan(1, 256)
    with pytest.raises(ValueError, match=r"outcomes\[0\]\[0\]\.tokens"):
        fit_queries([[ProbeOutcome(False, 100)]], infos(1), plan, model)
    with pytest.raises(ValueError, match=r"outcomes\[0\]"):
        fit_queries([[]], infos(1), plan, model)
    with pytest.raises(ValueError, match=r"hints\[0\]"):
        fit_queries([[ProbeOutcome(False, 256)]], infos(1, [1.5]), plan, model)


def test_the_best_funded_keep_their_probes_when_the_budget_cannot_pay_all() -> None:
    allocations = np.array([0.0, 900.0, 300.0, 600.0])
    assert affordable_probes(allocations, 1e6, 256).tolist() == [False, True, True, True]
    assert affordable_probes(allocations, 600.0, 256).tolist() == [False, True, False, True]
    assert not affordable_probes(allocations, 200.0, 256).any()
    per_query = np.array([64.0, 64.0, 64.0, 400.0])
    # In order of funding: 900 and 600 cost 464 of 500, and 300 no longer fits.
    assert affordable_probes(allocations, 500.0, per_query).tolist() == [False, True, False, True]
