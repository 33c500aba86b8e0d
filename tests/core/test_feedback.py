"""What a policy remembers for graded feedback: a bounded LRU of recent queries' chains, and
`ClearPolicy.feedback` correcting the model once per query."""

from __future__ import annotations

import numpy as np
import pytest

from clearbudget.daemon.core.feedback import RecentQueries
from clearbudget.daemon.core.policies import ClearPolicy, OraclePolicy, UniformPolicy, query_info
from clearbudget.schemas.messages import QueryRequest
from clearbudget.solver.fit import ProbePlan
from clearbudget.solver.memory import ANSWERED

PLAN = ProbePlan(samples=1, tokens=256)


def request(i: int, text: str = "p") -> QueryRequest:
    return QueryRequest(id=f"q{i}", prompt=f"problem: {text}\nSolve {text}.",
                        tags={"task": "amc23", "model": "m"})  # fmt: skip


def test_recent_queries_forget_the_least_recently_observed_first() -> None:
    recent: RecentQueries[int] = RecentQueries(3)
    for i in range(3):
        recent.add(f"q{i}", i)
    recent.add("q0", 10)  # q0 is the most recent now
    recent.add("q3", 3)  # so q1 goes
    assert len(recent) == 3
    assert "q1" not in recent
    assert recent.pop("q0") == (0, 10)
    assert recent.pop("q0") is None  # popped: a grade applies once
    assert recent.pop("q2") == (2,)
    assert recent.pop("never") is None


def test_recent_queries_bound_the_chains_of_one_query() -> None:
    recent: RecentQueries[int] = RecentQueries(10, max_chains=2)
    for i in range(5):
        recent.add("q", i)
    assert recent.pop("q") == (0, 1)
    listed: RecentQueries[list[int]] = RecentQueries(2)
    listed.add("q", [1])  # an item that is a list is still one chain
    assert listed.pop("q") == ([1],)


def test_recent_queries_need_room() -> None:
    with pytest.raises(ValueError, match="max_queries"):
        RecentQueries(0)


def test_a_policy_that_remembers_nothing_knows_no_id() -> None:
    policy = ClearPolicy(PLAN)
    policy.observe(request(1), 900, finished=True, answered=True, answer="3")
    assert policy.recent is None
    assert policy.feedback("q1", False) == "unknown_id"
    for baseline in (UniformPolicy(100), OraclePolicy({})):
        assert baseline.feedback("q1", True) == "unknown_id"


def test_clear_feedback_applies_once_and_corrects_the_model() -> None:
    policy = ClearPolicy(PLAN, remember_queries=100)
    for i in range(20):  # a broad tag curve
        policy.observe(request(100 + i, f"o{i}"), 400 + 200 * i, finished=True, answered=True,
                       answer=str(i))  # fmt: skip
    policy.observe(request(1), 256, finished=False, answered=False)
    policy.observe(request(1), 1400, finished=True, answered=True, answer="5")
    info = query_info(request(2))
    before = policy.model.curves([info]).utility[0, -1]
    assert policy.feedback("q1", correct=False) == "applied"
    rows = policy.model.memory.chains(policy.model._resolve(info).key)
    assert rows[:, ANSWERED].tolist() == [0, 0]
    assert policy.model.curves([info]).utility[0, -1] < before
    after = policy.model.curves([info]).utility.copy()
    assert policy.feedback("q1", correct=False) == "unknown_id"  # not counted twice
    np.testing.assert_array_equal(policy.model.curves([info]).utility, after)
    assert policy.feedback("q-unknown", correct=True) == "unknown_id"


def test_clear_feedback_forgets_beyond_its_bound() -> None:
    policy = ClearPolicy(PLAN, remember_queries=2)
    for i in range(3):
        policy.observe(request(i), 900, finished=True, answered=True, answer="3")
    assert policy.feedback("q0", correct=True) == "unknown_id"
    assert policy.feedback("q1", correct=True) == "applied"
    assert policy.feedback("q2", correct=True) == "applied"
