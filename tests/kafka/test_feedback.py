"""The feedback reader: valid grades reach the policy, bad records go to the DLQ (one replica
publishes them), every record is counted in `clear_feedback_total{outcome}`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.kafka.feedback import FeedbackLoop, holds_first_partition, stop_feedback
from clearbudget.daemon.kafka.intake import Intake, Rejection
from clearbudget.daemon.kafka.sinks import FatalPublishError
from clearbudget.schemas import DeadLetter, Feedback, QueryResult, WindowReport

TOPIC = "clear.feedback"


def admit(value: bytes | None) -> Feedback | Rejection:
    return Intake().admit_feedback(value, topic=TOPIC, partition=0, offset=7)


@pytest.mark.parametrize(
    ("value", "correct"),
    [(b'{"id": "q-1", "correct": true}', True),
     (b'{"id": "q-1", "correct": false, "schema_version": 1}', False)],
)  # fmt: skip
def test_a_valid_grade_is_admitted(value: bytes, correct: bool) -> None:
    assert admit(value) == Feedback(id="q-1", correct=correct)


@pytest.mark.parametrize(
    ("value", "error", "query_id"),
    [
        (b"{not json", "message: not valid JSON", None),
        (None, "message: record has no value", None),
        (b"[1, 2]", "message: must be a JSON object, got an array", None),
        (b'{"id": "q-1"}', "correct: field required", "q-1"),
        (b'{"id": "q-1", "correct": "yes"}', "correct: input should be a valid boolean", "q-1"),
        (b'{"id": "q-1", "correct": 1}', "correct: input should be a valid boolean", "q-1"),
        (b'{"id": "q-1", "correct": true, "grade": 0.5}', "grade: unknown field", "q-1"),
        (b'{"id": "has space", "correct": true}', "id: must be 1-200 characters", None),
        (b'{"id": "q-1", "correct": true, "schema_version": 2}', "schema_version:", "q-1"),
        (b'{"id": "q-1", "id": "q-2", "correct": true}', "id: duplicate key", None),
    ],
)
def test_a_bad_grade_is_a_dead_letter_without_a_result(
    value: bytes | None, error: str, query_id: str | None
) -> None:
    outcome = admit(value)
    assert isinstance(outcome, Rejection)
    assert outcome.result is None  # a rejected result would overwrite the query's own
    letter = outcome.dead_letter
    assert letter.error.startswith(error), letter.error
    assert (letter.topic, letter.partition, letter.offset, letter.query_id) == (
        TOPIC, 0, 7, query_id,
    )  # fmt: skip


class Records:
    """A feedback consumer over one in-memory partition."""

    def __init__(self, values: Sequence[bytes | None] = ()) -> None:
        self.values = list(values)
        self.read = 0

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        await asyncio.sleep(0.001)
        tp = TopicPartition(TOPIC, 0)
        new = self.values[self.read :]
        start, self.read = self.read, len(self.values)
        if not new:
            return {}
        return {tp: [ConsumerRecord(TOPIC, 0, start + i, 0, 0, None, v, None, 0, 0, ())
                     for i, v in enumerate(new)]}  # fmt: skip


class Sink:
    def __init__(self, refuse: bool = False) -> None:
        self.dead_letters: list[DeadLetter] = []
        self.refuse = refuse

    async def publish_results(self, results: Sequence[QueryResult]) -> None:
        raise AssertionError("feedback publishes no results")

    async def publish_dead_letters(self, records: Sequence[DeadLetter]) -> None:
        if self.refuse:
            raise FatalPublishError("clear.dlq refused: TopicAuthorizationFailed")
        self.dead_letters.extend(records)

    async def publish_window(self, report: WindowReport) -> None:
        raise AssertionError


class Policy:
    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.grades: list[tuple[str, bool]] = []

    def feedback(self, query_id: str, correct: bool) -> str:
        if query_id == "boom":
            raise RuntimeError("a bug")
        if query_id not in self.known:
            return "unknown_id"
        self.known.discard(query_id)
        self.grades.append((query_id, correct))
        return "applied"


def counted(metrics: PipelineMetrics) -> dict[str, float]:
    return {outcome: metrics.feedback.labels(outcome=outcome)._value.get()
            for outcome in ("applied", "unknown_id", "rejected")}  # fmt: skip


def loop_for(records: Records, sink: Sink, policy: Policy, **kwargs: Any) -> FeedbackLoop:
    fatal: list[FatalPublishError] = []
    loop = FeedbackLoop(consumer=records, sink=sink, policy=policy, intake=Intake(),
                        metrics=PipelineMetrics.create(CollectorRegistry()),
                        on_fatal=fatal.append, **kwargs)  # fmt: skip
    loop.fatal = fatal  # type: ignore[attr-defined]
    return loop


GRADES = [
    b'{"id": "q1", "correct": false}',
    b'{"id": "q2", "correct": true}',
    b'{"id": "q1", "correct": true}',  # graded already: unknown now
    b'{"id": "elsewhere", "correct": true}',  # another replica's query
    b"not json",
    b'{"id": "q3"}',
    b'{"id": "boom", "correct": true}',  # the policy raises: skipped, the loop goes on
]


async def test_grades_are_applied_counted_and_bad_ones_dead_lettered() -> None:
    records, sink, policy = Records(GRADES), Sink(), Policy({"q1", "q2"})
    loop = loop_for(records, sink, policy)
    assert await loop.poll_once() == len(GRADES)
    assert policy.grades == [("q1", False), ("q2", True)]
    assert counted(loop._metrics) == {"applied": 2, "unknown_id": 2, "rejected": 2}
    assert [d.error.split(":")[0] for d in sink.dead_letters] == ["message", "correct"]
    assert {d.topic for d in sink.dead_letters} == {TOPIC}
    assert loop._metrics.dead_letters._value.get() == 2
    assert await loop.poll_once() == 0


async def test_only_one_replica_dead_letters_but_every_one_counts() -> None:
    records, sink = Records([b"not json"]), Sink()
    loop = loop_for(records, sink, Policy(set()), dead_letters_here=lambda: False)
    await loop.poll_once()
    assert sink.dead_letters == []
    assert counted(loop._metrics)["rejected"] == 1


def test_the_dead_lettering_replica_holds_input_partition_0() -> None:
    class Group:
        def __init__(self) -> None:
            self.assigned: set[TopicPartition] = set()

        def assignment(self) -> set[TopicPartition]:
            return self.assigned

    group = Group()
    here = holds_first_partition(group, "clear.queries")
    assert not here()
    group.assigned = {TopicPartition("clear.queries", 1)}
    assert not here()
    group.assigned = {TopicPartition("clear.queries", 0)}
    assert here()


async def test_a_refusing_dlq_stops_the_reader_and_the_daemon() -> None:
    records, sink = Records([b"not json"]), Sink(refuse=True)
    loop = loop_for(records, sink, Policy(set()))
    stop = asyncio.Event()
    await asyncio.wait_for(loop.run(stop), 5)  # returns by itself
    assert loop.stopped_by is not None
    assert [str(e) for e in loop.fatal] == ["clear.dlq refused: TopicAuthorizationFailed"]  # type: ignore[attr-defined]


async def test_the_reader_stops_when_told() -> None:
    records = Records()
    loop = loop_for(records, Sink(), Policy(set()))
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await asyncio.sleep(0.01)
    records.values.append(json.dumps({"id": "x", "correct": True}).encode())
    await asyncio.sleep(0.05)
    await stop_feedback(task, stop)
    assert task.done()
    assert counted(loop._metrics)["unknown_id"] == 1


def test_the_feedback_schema_agrees_with_the_model_and_the_contracts_doc() -> None:
    from pathlib import Path

    from pydantic import ValidationError

    from clearbudget.schemas.export import drifted_schema_files, schema_document

    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema_document("feedback"))
    good = [{"id": "q-1", "correct": True}, {"id": "q-1", "correct": False, "schema_version": 1}]
    bad = [{"id": "q-1"}, {"id": "q-1", "correct": 1}, {"id": "q 1", "correct": True},
           {"id": "q-1", "correct": True, "note": "x"}, {"correct": True}]  # fmt: skip
    for payload in good:
        Feedback.model_validate(payload)
        assert validator.is_valid(payload), payload
    for payload in bad:
        with pytest.raises(ValidationError):
            Feedback.model_validate(payload)
        assert not validator.is_valid(payload), payload
    assert "feedback.schema.json" not in drifted_schema_files()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text()
    section = doc[doc.index("## Feedback") :]
    assert all(f"`{field}`" in section for field in Feedback.model_fields)
