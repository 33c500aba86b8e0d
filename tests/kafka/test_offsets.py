"""Commit bookkeeping: never past an offset whose result is not published."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from clearbudget.daemon.kafka.offsets import OffsetTracker


def test_commit_position_is_lowest_unfinished_offset() -> None:
    tracker = OffsetTracker()
    p0, p1 = TopicPartition("q", 0), TopicPartition("q", 1)
    for offset in range(5):
        tracker.consumed(p0, offset)
    tracker.consumed(p1, 7)  # the group had committed up to 7 already
    assert tracker.committable() == {}  # offset 0 of p0 and 7 of p1 still in flight
    for offset in (1, 2, 4):
        tracker.done(p0, offset)
    assert tracker.committable() == {}
    tracker.done(p0, 0)
    assert tracker.committable() == {p0: 3}
    tracker.mark_committed({p0: 3})
    assert tracker.committable() == {}
    tracker.done(p0, 3)
    tracker.done(p1, 7)
    assert tracker.committable() == {p0: 5, p1: 8}
    assert tracker.in_flight() == 0
    tracker.forget([p1])
    assert tracker.committable() == {p0: 5}


@settings(max_examples=200, deadline=None)
@given(st.permutations(list(range(12))), st.integers(min_value=0, max_value=12))
def test_never_commits_past_an_unfinished_offset(order: list[int], finished: int) -> None:
    tracker, key = OffsetTracker(), TopicPartition("q", 0)
    for offset in range(12):
        tracker.consumed(key, offset)
    done = set(order[:finished])
    for offset in done:
        tracker.done(key, offset)
    position = tracker.committable().get(key, 0)
    assert all(o in done for o in range(position))
    assert position == 12 or position not in done
