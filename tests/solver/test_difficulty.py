"""The per-query difficulty model: it starts empty, learns recurring prompts (under any model),
reads only earlier chains, and its curve's answer rate falls with length."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.solver.difficulty import (
    BUDGET_GRID,
    DifficultyModel,
    DifficultySettings,
    QueryInfo,
)
from clearbudget.solver.hazards import HazardBook
from clearbudget.solver.memory import PromptMemory, prompt_key
from clearbudget.solver.mixture import inverse_hazard
from clearbudget.solver.stages import (
    EDGES,
    StageCounts,
    StageCurve,
    exposure,
    non_increasing,
    stage_of,
)

TAGS = {"task": "amc23", "model": "r1-7b"}


def query(text: str, model: str = "r1-7b", hint: float | None = None) -> QueryInfo:
    # Like the replay's prompts: a header naming the model, then the problem text.
    return QueryInfo(f"problem: {model}/{text}\n{text} asks for x.\n", {"task": "amc23",
                     "model": model}, hint)  # fmt: skip


def u_at(model: DifficultyModel, q: QueryInfo, budget: float, survived: int = 0) -> float:
    curves = model.curves([q], survived=survived)
    return float(np.interp(budget, curves.budgets, curves.utility[0]))


def warm(model: DifficultyModel, n: int = 60, seed: int = 0) -> None:
    """Other problems of the same tag, 400–6000 tokens, so the tag curve is broad."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        tokens = int(rng.uniform(400, 6000))
        model.observe(query(f"other-{i}"), tokens, finished=True, answered=True, answer=str(i))


def test_a_fresh_model_is_empty_and_gives_every_query_the_generic_curve() -> None:
    model = DifficultyModel()
    assert len(model.memory) == 0
    assert model.book.keys == 0
    curves = model.curves([query("p1"), query("p2", model="r1-14b")])
    np.testing.assert_allclose(curves.utility[0], curves.utility[1])
    assert curves.utility[0, 0] == 0.0
    assert np.all(np.diff(curves.utility[0]) >= 0.0)


def test_two_models_never_share_what_they_learned() -> None:
    first, second = DifficultyModel(), DifficultyModel()
    first.observe(query("p1"), 900, finished=True, answered=True)
    assert (
        second.curves([query("p1")]).utility.tolist()
        == DifficultyModel().curves([query("p1")]).utility.tolist()
    )


def test_a_recurring_prompt_gets_the_length_its_earlier_chains_showed() -> None:
    model = DifficultyModel()
    warm(model)
    for tokens in (950, 1000, 1050, 980, 1020):
        model.observe(query("short"), tokens, finished=True, answered=True, answer="3")
    known, unseen = query("short"), query("never-seen")
    # Most of the known prompt's mass sits just past 1,000 tokens; an unseen one spreads out.
    assert u_at(model, known, 800) < 0.2
    assert u_at(model, known, 1200) > 0.6
    assert u_at(model, known, 1200) > u_at(model, unseen, 1200) + 0.3


def test_the_same_problem_under_another_model_is_recognised() -> None:
    model = DifficultyModel(DifficultySettings(agreement=False))
    warm(model)
    for i in range(30):  # the other model's tag: the same spread of lengths
        model.observe(query(f"other-{i}", model="r1-14b"), 400 + 180 * i, finished=True,
                      answered=True)  # fmt: skip
    for tokens in (450, 500, 480):
        model.observe(query("quick"), tokens, finished=True, answered=True)
    other_model, unseen = query("quick", model="r1-14b"), query("fresh", model="r1-14b")
    assert prompt_key(other_model.prompt, other_model.tags) == prompt_key(
        query("quick").prompt, query("quick").tags
    )
    assert u_at(model, other_model, 700) > u_at(model, unseen, 700) + 0.1


def test_curves_read_only_what_was_observed_before() -> None:
    model = DifficultyModel()
    warm(model)
    q = query("target")
    before = model.curves([q]).utility.copy()
    again = model.curves([q]).utility  # predicting learns nothing
    np.testing.assert_array_equal(before, again)
    model.observe(q, 700, finished=True, answered=True)
    assert not np.allclose(model.curves([q]).utility, before)  # only observe teaches it


def test_answer_rate_falls_with_length_and_caps_what_long_budgets_buy() -> None:
    model = DifficultyModel(DifficultySettings(agreement=False))
    for i in range(200):  # half end at ~500 with an answer, half at ~5000 without one
        long = i % 2 == 1
        model.observe(query(f"p{i}"), 5000 if long else 500, finished=True, answered=not long)
    curve = model.book.curve(TAGS)
    assert np.all(np.diff(curve.answer) <= 1e-12)
    assert curve.answer_at(5000)[()] < 0.2 < 0.8 < curve.answer_at(500)[()]
    q = query("new")
    # Half the chains are still running at 1,000 tokens, but nearly all answers are in.
    assert u_at(model, q, 8000) - u_at(model, q, 1000) < 0.1
    assert u_at(model, q, 1000) > 0.35


def test_a_probe_that_ran_on_conditions_the_curve_on_survival() -> None:
    model = DifficultyModel(DifficultySettings(agreement=False))
    for i in range(100):
        model.observe(query(f"p{i}"), 200 if i % 2 else 3000, finished=True, answered=True)
    q = query("new")
    fresh, after = model.curves([q]), model.curves([q], survived=256)
    # From scratch half the mass lands by ~256 tokens; past a censored 256-token probe,
    # what remains is the long mode.
    assert float(np.interp(300, fresh.budgets, fresh.utility[0])) > 0.3
    assert float(np.interp(300, after.budgets, after.utility[0])) < 0.15
    assert float(np.interp(4000, after.budgets, after.utility[0])) > 0.5


def test_problems_whose_answers_agree_are_worth_more() -> None:
    model = DifficultyModel()
    for i in range(6):
        model.observe(query("agree"), 800, finished=True, answered=True, answer="42")
        model.observe(query("split"), 800, finished=True, answered=True, answer=str(i))
    agree, split = model.curves([query("agree"), query("split")]).utility[:, -1]
    assert agree > 1.5 * split


def test_hint_buckets_learn_their_own_lengths() -> None:
    model = DifficultyModel(DifficultySettings(agreement=False))
    for i in range(80):
        hard = i % 2 == 1
        model.observe(query(f"p{i}", hint=0.9 if hard else 0.1), 4000 if hard else 400,
                      finished=True, answered=True)  # fmt: skip
    easy, hard = query("e", hint=0.05), query("h", hint=0.95)
    assert u_at(model, easy, 600) > u_at(model, hard, 600) + 0.4


def test_memory_is_bounded_in_prompts_and_chains() -> None:
    memory = PromptMemory(max_prompts=3, max_chains=2)
    for key in range(5):
        for tokens in range(4):
            memory.add(key, (0, 0, tokens, 1, 1, -1))
    assert len(memory) == 3
    assert memory.chains(0).shape[0] == 0
    assert sorted(memory.chains(4)[:, 2].tolist()) == [2, 3]


def test_prompt_keys_mask_serving_tags_and_ignore_case_and_spacing() -> None:
    a = prompt_key("Problem: r1-7b/x\nFind  X.", {"task": "amc", "model": "r1-7b"})
    b = prompt_key("problem: R1-14B/x\nfind x.", {"task": "amc", "model": "R1-14B"})
    c = prompt_key("problem: r1-7b/y\nFind X.", {"task": "amc", "model": "r1-7b"})
    assert a == b != c


def test_stage_counts_give_the_censored_rate() -> None:
    counts = StageCounts.empty()
    for _ in range(50):
        counts.add(300, finished=True, answered=True)
        counts.add(600, finished=False, answered=False)
    k = int(stage_of(300))
    # 50 events over the exposure of 100 chains in that stage (each spends its whole width).
    assert counts.events[k] == 50
    assert counts.exposure[k] == pytest.approx(100 * (EDGES[k + 1] - EDGES[k]) - 50 * 20)
    flat = StageCurve(np.full(EDGES.size, 1e-3), np.full(EDGES.size, 0.5))
    learned = flat.shrunk(counts, events0=1.0, answers0=1.0)
    assert learned.rate[k] == pytest.approx((1 + 50) / (1 / 1e-3 + counts.exposure[k]))
    # The answered stage pools with the earlier, emptier stages: rates never rise with length.
    assert learned.answer[k] > 0.9
    assert np.all(np.diff(learned.answer) <= 0.0)


def test_cumulative_hazard_inverts() -> None:
    rate = np.linspace(1e-3, 2e-4, EDGES.size)
    tokens = np.array([1.0, 200.0, 1000.0, 9000.0, 50000.0])
    hazard = exposure(tokens) @ rate
    np.testing.assert_allclose(inverse_hazard(rate, hazard), tokens, rtol=1e-9)


def test_pool_adjacent_violators_is_non_increasing_and_weighted() -> None:
    out = non_increasing(np.array([0.9, 0.5, 0.7, 0.2]), np.array([1.0, 1.0, 3.0, 1.0]))
    np.testing.assert_allclose(out, [0.9, 0.65, 0.65, 0.2])


def test_tag_keys_stay_bounded() -> None:
    book = HazardBook(max_keys=4)
    for i in range(50):
        book.observe({"task": f"t{i}"}, 300, finished=True, answered=True)
    assert book.keys == 5  # four task keys and the global pool
    assert book.chains_seen() == 50


def test_grid_starts_at_zero_and_reaches_32k() -> None:
    assert BUDGET_GRID[0] == 0.0
    assert BUDGET_GRID[-1] == 32768.0
    assert np.all(np.diff(BUDGET_GRID) > 0)
