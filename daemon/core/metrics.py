"""Prometheus metrics of the pipeline, registered on an injected registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from clearbudget.daemon.core.feedback import FEEDBACK_OUTCOMES
from clearbudget.schemas.messages import Status

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class TagMetrics:
    """Per-tag spend and prices under `CLEAR_TAG_BUDGETS`. The label set is bounded: the
    configured `TAG=VALUE` entries and `other`, all created up front (none without tag
    budgets); a key outside it is counted as `other`."""

    labels: tuple[str, ...]
    tokens: Counter
    shadow_price: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry, labels: Sequence[str]) -> TagMetrics:
        metrics = cls(
            labels=tuple(labels),
            tokens=Counter(
                "clear_tag_tokens",
                "Generated tokens (probes included) of the queries of each budgeted tag.",
                ["tag"],
                registry=registry,
            ),
            shadow_price=Gauge(
                "clear_tag_shadow_price",
                "Price per token the last window's queries of each budgeted tag faced: the "
                "shadow price plus the tag's premium where its budget binds.",
                ["tag"],
                registry=registry,
            ),
        )
        for label in metrics.labels:
            metrics.tokens.labels(tag=label)
            metrics.shadow_price.labels(tag=label)
        return metrics

    def _label(self, key: str) -> str | None:
        if key in self.labels:
            return key
        return "other" if "other" in self.labels else None

    def record_spend(self, tokens: Mapping[str, float]) -> None:
        for key, amount in tokens.items():
            label = self._label(key)
            if label is not None and amount > 0:
                self.tokens.labels(tag=label).inc(amount)

    def record_prices(self, shadow_price: float, prices: Mapping[str, float]) -> None:
        """Every label gets this window's price: its own where it had a row, else λ."""
        for label in self.labels:
            self.shadow_price.labels(tag=label).set(prices.get(label, shadow_price))


@dataclass(frozen=True)
class PipelineMetrics:
    shadow_price: Gauge
    queries: Counter
    tokens: Counter
    solve_seconds: Histogram
    window_seconds: Histogram
    window_budget: Gauge
    window_spent: Gauge
    windows: Counter
    solver_fallbacks: Counter
    dead_letters: Counter
    window_errors: Counter
    queue_depth: Gauge
    in_flight: Gauge
    budget_share: Gauge
    budget_carry: Gauge
    budget_debt: Gauge
    budget_earned: Counter
    lag: Gauge
    tags: TagMetrics
    feedback: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, tag_labels: Sequence[str] = ()) -> PipelineMetrics:
        """`tag_labels`: the per-tag metrics' label set (`TagBudgets.label_keys`)."""
        metrics = cls(
            shadow_price=Gauge(
                "clear_shadow_price",
                "Shadow price λ of the last window (value per token).",
                registry=registry,
            ),
            queries=Counter(
                "clear_queries", "Queries by terminal status.", ["status"], registry=registry
            ),
            tokens=Counter(
                "clear_tokens",
                "Generated tokens by phase (probe, dispatch).",
                ["phase"],
                registry=registry,
            ),
            solve_seconds=Histogram(
                "clear_solve_seconds",
                "Allocation solve time per window.",
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            window_seconds=Histogram(
                "clear_window_seconds",
                "Wall time from window close to all results out.",
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            window_budget=Gauge(
                "clear_window_budget_tokens", "Token budget of the last window.", registry=registry
            ),
            window_spent=Gauge(
                "clear_window_spent_tokens",
                "Tokens generated in the last window.",
                registry=registry,
            ),
            windows=Counter("clear_windows", "Windows processed.", registry=registry),
            solver_fallbacks=Counter(
                "clear_solver_fallbacks",
                "Windows where cvxpy failed and the closed form answered.",
                registry=registry,
            ),
            dead_letters=Counter(
                "clear_dead_letters", "Messages copied to the DLQ topic.", registry=registry
            ),
            window_errors=Counter(
                "clear_window_errors",
                "Windows that raised; their queries ended failed.",
                registry=registry,
            ),
            queue_depth=Gauge(
                "clear_queue_depth",
                "Admitted queries waiting for their window.",
                registry=registry,
            ),
            in_flight=Gauge(
                "clear_in_flight_queries",
                "Consumed queries without a published result.",
                registry=registry,
            ),
            budget_share=Gauge(
                "clear_budget_share",
                "This replica's share of the global token rate.",
                registry=registry,
            ),
            budget_carry=Gauge(
                "clear_budget_carry_tokens",
                "Unspent budget held for the next windows (the bucket level between windows).",
                registry=registry,
            ),
            budget_debt=Gauge(
                "clear_budget_debt_tokens",
                "Overspend (retried garbled answers charged on top of allocations) the next "
                "windows' budgets still have to repay.",
                registry=registry,
            ),
            budget_earned=Counter(
                "clear_budget_earned_tokens",
                "Tokens this replica's budget earned (its share of the rate, over time); "
                "compare with clear_tokens_total.",
                registry=registry,
            ),
            lag=Gauge(
                "clear_consumer_lag",
                "Records in the assigned partitions not yet consumed (work waiting in Kafka).",
                registry=registry,
            ),
            tags=TagMetrics.create(registry, tag_labels),
            feedback=Counter(
                "clear_feedback",
                "Graded feedback records by outcome: applied (the query's grade corrected "
                "what it taught), unknown_id (not held by this replica), rejected (to the DLQ).",
                ["outcome"],
                registry=registry,
            ),
        )
        for status in Status:
            metrics.queries.labels(status=status.value)
        for phase in ("probe", "dispatch"):
            metrics.tokens.labels(phase=phase)
        for outcome in FEEDBACK_OUTCOMES:
            metrics.feedback.labels(outcome=outcome)
        return metrics
