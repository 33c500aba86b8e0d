"""Prometheus metrics of the pipeline, registered on an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from schemas.messages import Status

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


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
    lag: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry) -> PipelineMetrics:
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
            lag=Gauge(
                "clear_consumer_lag",
                "Records in the assigned partitions not yet consumed (work waiting in Kafka).",
                registry=registry,
            ),
        )
        for status in Status:
            metrics.queries.labels(status=status.value)
        for phase in ("probe", "dispatch"):
            metrics.tokens.labels(phase=phase)
        return metrics
