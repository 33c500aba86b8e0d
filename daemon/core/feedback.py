"""Graded feedback: what a policy remembers of recent queries so a later grade can correct it.

A downstream grader may say, after a query was answered, whether its answer was right
(`schemas.feedback.Feedback` on `CLEAR_FEEDBACK_TOPIC`). The policy keeps, per recent query id,
what it observed of that query's chains (`RecentQueries`, least recently observed forgotten
first) and hands it to the difficulty model with the verdict (`ClearPolicy.feedback`). A grade
for an id it does not hold (never seen by this replica, forgotten, or already graded) changes
nothing and is counted as `unknown_id`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Literal, TypeVar

__all__ = [
    "DEFAULT_REMEMBERED_QUERIES",
    "FEEDBACK_OUTCOMES",
    "MAX_CHAINS_PER_QUERY",
    "FeedbackOutcome",
    "RecentQueries",
]

# The `outcome` label of `clear_feedback_total`.
FeedbackOutcome = Literal["applied", "unknown_id", "rejected"]
FEEDBACK_OUTCOMES: tuple[FeedbackOutcome, ...] = ("applied", "unknown_id", "rejected")
# Queries remembered for grading when feedback is on: a grader more than this many queries
# behind (per replica) grades queries that are forgotten. About 35 MiB at one chain a query.
DEFAULT_REMEMBERED_QUERIES = 100_000
# Chains kept per query (a probe has at most 64 samples, plus its continuation).
MAX_CHAINS_PER_QUERY = 65

T = TypeVar("T")


class RecentQueries(Generic[T]):
    """A bounded map from query id to what was observed of its chains, in observation order;
    when full, the query observed least recently is forgotten first."""

    def __init__(self, max_queries: int, max_chains: int = MAX_CHAINS_PER_QUERY) -> None:
        if max_queries < 1 or max_chains < 1:
            raise ValueError("max_queries and max_chains must be >= 1")
        self.max_queries = max_queries
        self._max_chains = max_chains
        # One chain (the usual case) is held as itself, several as a list.
        self._items: OrderedDict[str, T | list[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, query_id: object) -> bool:
        return query_id in self._items

    def add(self, query_id: str, item: T) -> None:
        """Remember one more chain of `query_id` (the query becomes the most recent)."""
        if query_id not in self._items:
            self._items[query_id] = item
            if len(self._items) > self.max_queries:
                self._items.popitem(last=False)
            return
        self._items.move_to_end(query_id)
        held = self._items[query_id]
        if not isinstance(held, _Chains):
            self._items[query_id] = _Chains((held, item))
        elif len(held) < self._max_chains:
            held.append(item)

    def pop(self, query_id: str) -> tuple[T, ...] | None:
        """What was observed of `query_id`, forgotten now (so a grade applies once); None if
        it is not held."""
        if query_id not in self._items:
            return None
        held = self._items.pop(query_id)
        return tuple(held) if isinstance(held, _Chains) else (held,)


class _Chains(list):  # type: ignore[type-arg]
    """Several chains of one query (a list of its own type, so an item may itself be a list)."""
