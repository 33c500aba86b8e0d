"""Window assembly on a virtual clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearbudget.daemon.core.windowing import WindowAssembler


def test_window_closes_by_time_and_spans_from_previous_close() -> None:
    assembler: WindowAssembler[str] = WindowAssembler(seconds=2.0, max_items=100, started_at=10.0)
    assert assembler.add("a", 10.5) == []
    assert assembler.add("b", 11.9) == []
    (window,) = assembler.add("c", 12.1)  # time is up: a and b close, c opens the next
    assert window.items == ("a", "b")
    assert (window.opened_at, window.closed_at, window.duration) == (10.0, 12.1, pytest.approx(2.1))
    assert assembler.due(13.0) == []
    (second,) = assembler.due(14.2)
    assert second.items == ("c",)
    assert second.opened_at == 12.1
    assert second.window_id != window.window_id


def test_window_closes_at_max_items() -> None:
    assembler: WindowAssembler[int] = WindowAssembler(seconds=60.0, max_items=3, started_at=0.0)
    closed = [w for i in range(7) for w in assembler.add(i, 0.1 * i)]
    assert [w.items for w in closed] == [(0, 1, 2), (3, 4, 5)]
    last = assembler.flush(1.0)
    assert last is not None
    assert last.items == (6,)
    assert assembler.flush(2.0) is None


def test_empty_windows_are_skipped_and_idle_time_carries() -> None:
    assembler: WindowAssembler[str] = WindowAssembler(seconds=1.0, max_items=10, started_at=0.0)
    assert assembler.due(5.0) == []
    assert assembler.add("late", 5.5) == []
    (window,) = assembler.due(6.5)
    assert window.items == ("late",)
    assert (window.opened_at, window.closed_at) == (4.5, 6.5)  # at most 1 s earned up front


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=60),
    seconds=st.floats(min_value=0.1, max_value=5.0),
    max_items=st.integers(min_value=1, max_value=8),
)
def test_every_item_lands_in_exactly_one_window_in_order(
    gaps: list[float], seconds: float, max_items: int
) -> None:
    assembler: WindowAssembler[int] = WindowAssembler(seconds, max_items, started_at=0.0)
    now, windows = 0.0, []
    for i, gap in enumerate(gaps):
        now += gap
        windows += assembler.add(i, now)
    tail = assembler.flush(now)
    windows += [tail] if tail else []
    assert [i for w in windows for i in w.items] == list(range(len(gaps)))
    assert all(1 <= len(w.items) <= max_items for w in windows)
    assert all(w.closed_at >= w.opened_at for w in windows)
