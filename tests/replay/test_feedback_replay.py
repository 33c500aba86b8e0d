"""Replay with graded feedback: the recorded grade of every answered query reaches the policy
after its window and the delay, never before the query was answered; the report says so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import clearbudget.daemon.replay.inprocess as inprocess
from clearbudget.daemon.cli.inputs import report_dict
from clearbudget.daemon.core.feedback import FeedbackOutcome
from clearbudget.daemon.core.policies import ClearPolicy, Decision, QueryView
from clearbudget.daemon.replay.config import ReplayConfig, draw_queries, make_policy
from clearbudget.daemon.replay.rollouts import load_rollouts
from clearbudget.daemon.replay.simulator import grade
from clearbudget.daemon.replay.traces import read_trace
from clearbudget.schemas.messages import QueryRequest


class Recording(ClearPolicy):
    """ClearPolicy noting, in order, each window's decided ids and each grade it receives."""

    def __init__(self, inner: ClearPolicy) -> None:
        self.__dict__.update(inner.__dict__)
        self.events: list[tuple[str, Any]] = []

    def decide(self, queries: Sequence[QueryView], budget: float) -> Decision:
        self.events.append(("window", {q.request.id for q in queries}))
        return super().decide(queries, budget)

    def observe(self, request: QueryRequest, chain_tokens: int, **state: Any) -> None:
        self.events.append(("observe", request.id))
        super().observe(request, chain_tokens, **state)

    def feedback(self, query_id: str, correct: bool) -> FeedbackOutcome:
        self.events.append(("grade", (query_id, correct)))
        return super().feedback(query_id, correct)


@pytest.fixture(scope="module")
def inputs(shared_data: Path):
    pool = load_rollouts(shared_data / "rollouts.jsonl")
    arrivals = list(read_trace(shared_data / "azure_llm_conv_2023.csv", limit=300))
    return pool, draw_queries(arrivals, pool, seed=0)


async def _replay(inputs, monkeypatch: pytest.MonkeyPatch, **options: Any):
    pool, queries = inputs
    made: list[Recording] = []

    def recording(*args: Any) -> Recording:
        policy = make_policy(*args)
        assert isinstance(policy, ClearPolicy)
        made.append(Recording(policy))
        return made[-1]

    monkeypatch.setattr(inprocess, "make_policy", recording)
    config = ReplayConfig(policy="clear", budget_per_query=600, **options)
    report = await inprocess.replay(queries, pool, config)
    return report, made[0]


async def test_grades_arrive_after_their_queries_were_answered(inputs, monkeypatch) -> None:
    report, policy = await _replay(inputs, monkeypatch, feedback=True)
    assert policy.recent is not None  # the replay's policy remembers queries for grading
    observed: set[str] = set()
    grades = []
    for kind, value in policy.events:
        if kind == "observe":
            observed.add(value)
        elif kind == "window":
            assert not value & {g[0] for g in grades}  # no query is decided after its grade
        else:
            query_id, _ = value
            # Its chain's final state was observed, so its window had decided and answered it.
            assert query_id in observed, f"{query_id} graded before it was answered"
            grades.append(value)
    assert grades, "no grade reached the policy"
    assert len({g[0] for g in grades}) == len(grades)  # each answered query graded once
    # The grades are the recorded ones: what the report scores as correct.
    assert 0 < sum(c for _, c in grades) <= round(report.mean_accuracy * report.queries)
    assert sum(1 for _, c in grades if not c) > 0


async def test_a_grade_waits_for_its_delay(inputs, monkeypatch) -> None:
    _, queries = inputs
    span = queries[-1].arrival - queries[0].arrival
    _, never = await _replay(inputs, monkeypatch, feedback=True, feedback_delay=span + 1)
    assert not [e for e in never.events if e[0] == "grade"]
    _, prompt = await _replay(inputs, monkeypatch, feedback=True)
    _, later = await _replay(inputs, monkeypatch, feedback=True, feedback_delay=span / 2)
    count = {name: sum(1 for e in p.events if e[0] == "grade")
             for name, p in (("prompt", prompt), ("later", later))}  # fmt: skip
    assert 0 < count["later"] < count["prompt"]


async def test_without_feedback_nothing_is_remembered_or_graded(inputs, monkeypatch) -> None:
    _, policy = await _replay(inputs, monkeypatch)
    assert policy.recent is None
    assert not [e for e in policy.events if e[0] == "grade"]


def test_the_simulator_grades_what_the_report_scores(inputs) -> None:
    pool, _ = inputs
    record = pool.records[0]
    sample = record.samples[0]
    text = f"<<sim chain={record.key}#0 at={sample.tokens}>>"
    assert grade(text, record) == sample.correct


def test_the_report_says_whether_feedback_was_on() -> None:
    from clearbudget.daemon.replay.report import ReplayReport

    report = ReplayReport("clear", 1, 1, 0, 0, 1.0, 10, 5, 10.0, 10.0, 1, 0.0, 0.0, 0.0)
    off = report_dict(report, ReplayConfig(policy="clear", budget_per_query=100))
    assert (off["feedback"], off["feedback_delay"]) == (False, None)
    assert off["budget_mode"] == "max_tokens"
    config = ReplayConfig(policy="clear", budget_per_query=100, hint_field="level",
                          feedback=True, feedback_delay=30.0, budget_mode="thinking")  # fmt: skip
    on = report_dict(report, config)
    assert (on["hint_field"], on["feedback"], on["feedback_delay"]) == ("level", True, 30.0)
    assert list(on)[-4:] == ["hint_field", "feedback", "feedback_delay", "budget_mode"]
    assert on["budget_mode"] == "thinking"


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="feedback_delay"):
        ReplayConfig(policy="clear", budget_per_query=100, feedback=True, feedback_delay=-1)


def test_replay_command_reports_feedback(shared_data: Path) -> None:
    import json

    from typer.testing import CliRunner

    from clearbudget.daemon.cli import app

    args = ["replay", "--budget-per-query", "500", "--limit", "60",
            "--trace", str(shared_data / "azure_llm_conv_2023.csv"),
            "--rollouts", str(shared_data / "rollouts.jsonl")]  # fmt: skip
    outcome = CliRunner().invoke(app, [*args, "--feedback", "--feedback-delay", "5"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output[outcome.output.index("{") :])
    assert (report["feedback"], report["feedback_delay"]) == (True, 5.0)
    refused = CliRunner().invoke(app, [*args, "--feedback", "--kafka"])
    assert refused.exit_code != 0
    assert "--feedback runs in-process only" in refused.output
    schema = CliRunner().invoke(app, ["schema", "feedback"])
    assert json.loads(schema.output)["title"] == "Feedback"
