"""Tumbling windows over a stream of admitted queries, driven by an injected clock.

Pure bookkeeping: the Kafka loop and trace replay both feed it `add(item, now)` and
`due(now)`, so real time and a virtual clock share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")


@dataclass(frozen=True, slots=True)
class Window(Generic[Item]):
    """A closed window: its items and the time span its budget is earned over."""

    window_id: str
    opened_at: float
    closed_at: float
    items: tuple[Item, ...]

    @property
    def duration(self) -> float:
        return self.closed_at - self.opened_at


@dataclass
class WindowAssembler(Generic[Item]):
    """Closes a window after `seconds` or at `max_items`, whichever comes first.

    A window's span runs from the previous window's close (or, after an idle spell, from one
    window length before its first item), so the budget it earns is bounded.
    """

    seconds: float
    max_items: int
    started_at: float
    id_prefix: str = "w"
    _items: list[Item] = field(default_factory=list)
    _opened_at: float = field(init=False)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError("seconds: must be > 0")
        if self.max_items < 1:
            raise ValueError("max_items: must be >= 1")
        self._opened_at = self.started_at

    @property
    def pending(self) -> int:
        return len(self._items)

    @property
    def pending_items(self) -> tuple[Item, ...]:
        return tuple(self._items)

    def retain(self, keep: Callable[[Item], bool]) -> None:
        """Drop the open window's items that `keep` refuses (their source was taken away)."""
        self._items = [item for item in self._items if keep(item)]

    def deadline(self) -> float:
        """When the open window closes by time."""
        return self._opened_at + self.seconds

    def add(self, item: Item, now: float) -> list[Window[Item]]:
        """Add an item arriving at `now`; returns the windows this closed (0, 1 or 2)."""
        closed = self.due(now)
        if not self._items:
            # After an idle spell a window earns at most one window's worth of time up front;
            # the budget ledger's bounded carry-over covers the rest.
            self._opened_at = max(self._opened_at, now - self.seconds)
        self._items.append(item)
        if len(self._items) >= self.max_items:
            closed.append(self._close(now))
        return closed

    def due(self, now: float) -> list[Window[Item]]:
        """Close the open window if its time is up (empty windows are skipped, time carries)."""
        if now < self.deadline():
            return []
        if not self._items:
            return []
        return [self._close(max(now, self._opened_at))]

    def flush(self, now: float) -> Window[Item] | None:
        """Close whatever is open (shutdown, end of a trace)."""
        return self._close(max(now, self._opened_at)) if self._items else None

    def _close(self, now: float) -> Window[Item]:
        self._count += 1
        window = Window(
            window_id=f"{self.id_prefix}-{self._count}",
            opened_at=self._opened_at,
            closed_at=now,
            items=tuple(self._items),
        )
        self._items = []
        self._opened_at = now
        return window
