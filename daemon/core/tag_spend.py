"""The window pipeline, counting each window's generated tokens per budgeted tag."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from clearbudget.daemon.core.metrics import PipelineMetrics
from clearbudget.daemon.core.pipeline import PendingQuery, WindowOutcome, WindowPipeline
from clearbudget.daemon.core.policies import AllocationPolicy
from clearbudget.daemon.core.ports import CompletionBackend
from clearbudget.daemon.core.tags import OTHER, TagBudgets
from clearbudget.daemon.core.windowing import Window
from clearbudget.schemas.messages import QueryResult


class TagSpendPipeline(WindowPipeline):
    """`WindowPipeline` plus `clear_tag_tokens_total`: what the queries of each `TAG=VALUE`
    entry (and `other`) generated, probes included, as their results report it."""

    def __init__(
        self,
        backend: CompletionBackend,
        policy: AllocationPolicy,
        metrics: PipelineMetrics,
        *,
        tag_budgets: TagBudgets,
        **options: Any,
    ) -> None:
        super().__init__(backend, policy, metrics, **options)
        self._tag_budgets = tag_budgets
        self._tag_metrics = metrics.tags

    async def run(
        self,
        window: Window[PendingQuery],
        budget: float,
        *,
        waiting: int = 0,
        carry_room: Callable[[], float] | None = None,
    ) -> WindowOutcome:
        outcome = await super().run(window, budget, waiting=waiting, carry_room=carry_room)
        self._tag_metrics.record_spend(tag_spend(self._tag_budgets, window.items, outcome.results))
        return outcome


def tag_spend(
    tag_budgets: TagBudgets, items: Sequence[PendingQuery], results: Sequence[QueryResult]
) -> dict[str, int]:
    """Tokens used per group (`TAG=VALUE` or `other`) over one window's results."""
    group_by_id = {item.request.id: tag_budgets.group_of(item.request.tags) for item in items}
    spend: dict[str, int] = {}
    for result in results:
        group = group_by_id.get(result.id, OTHER)
        spend[group] = spend.get(group, 0) + result.tokens_used
    return spend
