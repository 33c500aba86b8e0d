"""Per-partition commit bookkeeping for at-least-once delivery.

An offset is *done* once its query's result (or DLQ record) is published. The committable
position of a partition is the lowest offset not yet done: everything below it is safe to
skip after a restart, everything at or above it is re-read (duplicates only for in-flight work).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition


@dataclass
class _PartitionState:
    in_flight: set[int] = field(default_factory=set)
    highest_seen: int = -1
    committed: int | None = None


@dataclass
class OffsetTracker:
    _partitions: dict[TopicPartition, _PartitionState] = field(default_factory=dict)

    def consumed(self, key: TopicPartition, offset: int) -> None:
        # The first offset read is where the group's committed position already stands.
        state = self._partitions.setdefault(key, _PartitionState(committed=offset))
        state.in_flight.add(offset)
        state.highest_seen = max(state.highest_seen, offset)

    def done(self, key: TopicPartition, offset: int) -> None:
        state = self._partitions.get(key)
        if state is not None:
            state.in_flight.discard(offset)

    def next_offset(self, key: TopicPartition) -> int | None:
        """The offset after the last one consumed from `key` (None before the first)."""
        state = self._partitions.get(key)
        return None if state is None else state.highest_seen + 1

    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self._partitions.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Positions to commit now (next offset to read), only where they moved forward."""
        positions: dict[TopicPartition, int] = {}
        for key, state in self._partitions.items():
            position = min(state.in_flight) if state.in_flight else state.highest_seen + 1
            if state.committed is None or position > state.committed:
                positions[key] = position
        return positions

    def mark_committed(self, positions: dict[TopicPartition, int]) -> None:
        for key, position in positions.items():
            if key in self._partitions:
                self._partitions[key].committed = position

    def forget(self, keys: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: another replica now owns their uncommitted tail."""
        for key in keys:
            self._partitions.pop(key, None)
