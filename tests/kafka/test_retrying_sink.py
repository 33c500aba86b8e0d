"""A broker outage delays publishing; it neither loses results nor raises into the window."""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaConnectionError

from clearbudget.daemon.kafka.sinks import BrokerHealth, RetryingSink
from clearbudget.schemas.messages import DeadLetter, QueryResult, ReasonCode, Status, WindowReport


class FlakySink:
    """Fails its first `failures` publishes (an error-path double for the Kafka sink)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[QueryResult] = []

    async def publish_results(self, results: list[QueryResult]) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaConnectionError("broker gone")
        self.published += results

    async def publish_dead_letters(self, records: list[DeadLetter]) -> None: ...

    async def publish_window(self, report: WindowReport) -> None: ...


async def test_publish_retries_with_backoff_until_the_broker_is_back() -> None:
    inner, health, sleeps = FlakySink(failures=5), BrokerHealth(), []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        assert not health.ok  # readiness is red while retrying

    sink = RetryingSink(inner, health, max_backoff_s=1.0, sleep=fake_sleep)
    result = QueryResult(
        id="q1", status=Status.ABANDONED, tokens_used=0, tokens_probe=0, allocated_tokens=0,
        shadow_price=0.5, window_id="w-1", reason_code=ReasonCode.INSOLVENT,
    )  # fmt: skip
    await sink.publish_results([result])
    assert inner.published == [result]
    assert sleeps == [0.1, 0.2, 0.4, 0.8, 1.0]  # doubling, capped
    assert health.ok
    assert health.last_error is None


async def test_a_window_report_that_gets_no_ack_is_dropped_after_its_timeout() -> None:
    class SilentSink(FlakySink):
        async def publish_window(self, report: WindowReport) -> None:
            await asyncio.Event().wait()  # a broker that neither acks nor refuses

    sink = RetryingSink(SilentSink(failures=0), BrokerHealth(), report_timeout_s=0.05)
    report = WindowReport.model_validate({
        "window_id": "w-1", "shadow_price": 0.0, "budget_tokens": 1.0, "spent_tokens": 0,
        "probe_tokens": 0, "solver": "none", "solve_ms": 0.0,
        "counts": {"answered": 0, "abandoned": 0, "expired": 0, "failed": 0, "rejected": 0},
        "started_at": "2026-12-01T00:00:00Z", "ended_at": "2026-12-01T00:00:00Z",
    })  # fmt: skip
    async with asyncio.timeout(2):  # before: held for the producer's whole request timeout
        await sink.publish_window(report)
