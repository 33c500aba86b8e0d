"""Graded feedback in the difficulty model: a grade corrects what `observe` already counted
(a wrong answer becomes "finished without an answer", a right one stays), never adds to it."""

from __future__ import annotations

import numpy as np

from clearbudget.solver.difficulty import (
    DifficultyModel,
    DifficultySettings,
    Observation,
    QueryInfo,
)
from clearbudget.solver.hazards import HazardBook
from clearbudget.solver.memory import ANSWER, ANSWERED, NO_ANSWER, PromptMemory
from clearbudget.solver.stages import StageCounts, stage_of

TAGS = {"task": "amc23", "model": "r1-7b"}


def query(text: str, model: str = "r1-7b") -> QueryInfo:
    return QueryInfo(f"problem: {model}/{text}\n{text} asks for x.\n", {**TAGS, "model": model})


def warm(model: DifficultyModel, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        tokens = int(rng.uniform(400, 6000))
        model.observe(query(f"other-{i}"), tokens, finished=True, answered=True, answer=str(i))


def state(model: DifficultyModel, q: QueryInfo) -> tuple[object, ...]:
    """What a grade may change: the tag keys' answered counts and the prompt's memory rows."""
    r = model._resolve(q)
    keys = model.book.keys_for(dict(r.curve_tags))
    answered = tuple(tuple(model.book._counts[k].answered.tolist()) for k in keys)
    events = tuple(tuple(model.book._counts[k].events.tolist()) for k in keys)
    return answered, events, model.memory.chains(r.key).tolist()


def test_observe_returns_what_a_grade_needs() -> None:
    model = DifficultyModel()
    seen = model.observe(query("p"), 900, finished=True, answered=True, answer="3")
    assert isinstance(seen, Observation)
    assert (seen.tokens, seen.answered) == (900, True)
    assert seen.answer != NO_ANSWER
    cut = model.observe(query("p"), 256, finished=False, answered=False)
    assert (cut.answered, cut.answer) == (False, NO_ANSWER)


def test_a_wrong_grade_leaves_what_an_unanswered_chain_would_have() -> None:
    settings = DifficultySettings(agreement=False)
    graded, unanswered = DifficultyModel(settings), DifficultyModel(settings)
    for model in (graded, unanswered):
        warm(model)
    seen = graded.observe(query("p"), 1500, finished=True, answered=True, answer="5")
    unanswered.observe(query("p"), 1500, finished=True, answered=False)
    assert state(graded, query("p")) != state(unanswered, query("p"))
    assert graded.grade([seen], correct=False) == 1
    assert state(graded, query("p")) == state(unanswered, query("p"))
    # So every later query sees the same curves, the graded prompt's under another model too.
    later = [query("p"), query("p", model="r1-14b"), query("fresh")]
    np.testing.assert_allclose(graded.curves(later).utility, unanswered.curves(later).utility)


def test_a_right_grade_changes_nothing_it_was_already_counted() -> None:
    model = DifficultyModel()
    warm(model)
    seen = model.observe(query("p"), 1500, finished=True, answered=True, answer="5")
    before = state(model, query("p"))
    curves = model.curves([query("p")]).utility
    assert model.grade([seen], correct=True) == 1
    assert state(model, query("p")) == before
    np.testing.assert_array_equal(model.curves([query("p")]).utility, curves)


def test_a_wrong_grade_lowers_the_problems_curve() -> None:
    model = DifficultyModel()
    warm(model)
    seen = [model.observe(query("p"), 1200 + 10 * i, finished=True, answered=True, answer="5")
            for i in range(4)]  # fmt: skip
    before = model.curves([query("p")]).utility[0, -1]
    model.grade(seen, correct=False)
    assert model.curves([query("p")]).utility[0, -1] < 0.5 * before
    rows = model.memory.chains(model._resolve(query("p")).key)
    assert rows[:, ANSWERED].tolist() == [0] * 4
    assert rows[:, ANSWER].tolist() == [NO_ANSWER] * 4


def test_the_grade_covers_the_chains_with_the_delivered_answer() -> None:
    """The most common answer of the query's answered chains (ties: the latest)."""
    model = DifficultyModel()
    a1 = model.observe(query("p"), 300, finished=True, answered=True, answer="7")
    b = model.observe(query("p"), 310, finished=True, answered=True, answer="8")
    a2 = model.observe(query("p"), 320, finished=True, answered=True, answer="7.0")  # agrees
    cut = model.observe(query("p"), 256, finished=False, answered=False)
    assert model.grade([a1, b, a2, cut], correct=False) == 2
    rows = model.memory.chains(model._resolve(query("p")).key)
    assert rows[:, ANSWERED].tolist() == [0, 1, 0, 0]
    # A tie between one "3" and one "4": the latest observed ("4") is the graded one.
    other = DifficultyModel()
    three = other.observe(query("q"), 300, finished=True, answered=True, answer="3")
    four = other.observe(query("q"), 300, finished=True, answered=True, answer="4")
    other.grade([three, four], correct=False)
    rows = other.memory.chains(other._resolve(query("q")).key)
    assert rows[:, ANSWERED].tolist() == [1, 0]


def test_nothing_to_grade_without_an_answer() -> None:
    model = DifficultyModel()
    cut = model.observe(query("p"), 256, finished=False, answered=False)
    before = state(model, query("p"))
    assert model.grade([cut], correct=False) == 0
    assert model.grade([], correct=True) == 0
    assert state(model, query("p")) == before


def test_a_forgotten_chain_is_corrected_only_where_it_is_still_held() -> None:
    model = DifficultyModel(DifficultySettings(max_prompts=1))
    seen = model.observe(query("p"), 900, finished=True, answered=True, answer="3")
    model.observe(query("q"), 900, finished=True, answered=True, answer="3")  # evicts p's rows
    assert len(model.memory.chains(model._resolve(query("p")).key)) == 0
    model.grade([seen], correct=False)  # the tag counts still hold it; no error
    root = model.book._counts["*"]
    assert root.answered[stage_of(900)] == 1.0  # two answered, one graded wrong


def test_stage_counts_and_book_never_go_below_zero() -> None:
    counts = StageCounts.empty()
    counts.add(500, True, False)
    assert not counts.unanswer(500)
    assert counts.answered.sum() == 0.0
    book = HazardBook()
    book.observe(TAGS, 500, finished=True, answered=True)
    assert book.unanswer(TAGS, 500) == 3  # the global pool, task, task+model
    assert book.unanswer(TAGS, 500) == 0
    assert book.unanswer({"task": "never-seen"}, 500) == 0


def test_book_curves_follow_a_grade() -> None:
    book = HazardBook()
    for _ in range(20):
        book.observe(TAGS, 700, finished=True, answered=True)
    before = book.curve(TAGS).answer_at(700)
    for _ in range(10):
        book.unanswer(TAGS, 700)
    assert book.curve(TAGS).answer_at(700) < before  # the cached curve was refreshed


def test_memory_rewrites_one_matching_row() -> None:
    memory = PromptMemory(max_chains=4)
    row = (1, 2, 300, 1, 1, 9)
    memory.add(7, row)
    memory.add(7, row)
    assert memory.unanswer(7, row)
    assert memory.chains(7)[:, ANSWERED].tolist() == [0, 1]
    assert memory.unanswer(7, row)
    assert not memory.unanswer(7, row)  # both graded
    assert not memory.unanswer(8, row)  # unknown prompt
    assert not memory.unanswer(7, (1, 2, 300, 1, 0, -1))  # nothing answered to correct
