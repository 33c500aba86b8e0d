"""Publishing faults: re-send only what failed, cut what is too large, stop on a refusing topic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from clearbudget.daemon.kafka.sinks import (
    CUT_TEXT_REASON,
    BrokerHealth,
    FatalPublishError,
    KafkaResultSink,
    RetryingSink,
)
from clearbudget.daemon.settings import load_settings
from clearbudget.schemas.messages import QueryResult, ReasonCode, Status, WindowReport

SETTINGS = load_settings(
    {"CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1", "CLEAR_WINDOW_TOPIC": "clear.windows"},
    env_file=None,
)


class FakeProducer:
    """Acknowledges sends, except: values over `max_bytes` are refused at once, topics in
    `refused` fail authorization, and the first `drops` sends are lost to a broken connection."""

    def __init__(self, *, max_bytes: int = 10_000, refused: set[str] | None = None,
                 drops: int = 0) -> None:  # fmt: skip
        self.max_bytes, self.refused, self.drops = max_bytes, refused or set(), drops
        self.acked: list[tuple[str, bytes]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> Any:
        if len(value) > self.max_bytes:
            raise MessageSizeTooLargeError(f"{len(value)} bytes")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self.refused:
            future.set_exception(TopicAuthorizationFailedError(topic))
        elif self.drops:
            self.drops -= 1
            future.set_exception(KafkaConnectionError("connection reset"))
        else:
            self.acked.append((topic, value))
            future.set_result(None)
        return future


def result(i: int, text: str = "") -> QueryResult:
    return QueryResult(
        id=f"q{i}", status=Status.ANSWERED, answer="7", text=text or None, tokens_used=10,
        tokens_probe=0, allocated_tokens=10, shadow_price=0.1, window_id="w-1",
        reason_code=ReasonCode.CHAIN_FINISHED,
    )  # fmt: skip


def sink(producer: FakeProducer) -> RetryingSink:
    async def no_sleep(_: float) -> None:
        return None

    inner = KafkaResultSink(producer, SETTINGS)  # type: ignore[arg-type]
    return RetryingSink(inner, BrokerHealth(), sleep=no_sleep)


def acked_ids(producer: FakeProducer) -> list[str]:
    results = [v for t, v in producer.acked if t == "clear.results"]
    return [QueryResult.model_validate_json(v).id for v in results]


async def test_a_retry_resends_only_the_records_that_failed() -> None:
    producer = FakeProducer(drops=2)
    await sink(producer).publish_results([result(i) for i in range(5)])
    assert sorted(acked_ids(producer)) == [f"q{i}" for i in range(5)]  # each exactly once


async def test_an_oversized_result_is_published_once_without_its_text() -> None:
    producer = FakeProducer(max_bytes=2_000)
    await sink(producer).publish_results([result(1), result(2, text="x" * 5_000), result(3)])
    assert sorted(acked_ids(producer)) == ["q1", "q2", "q3"]
    cut = next(QueryResult.model_validate_json(v) for _, v in producer.acked if b'"q2"' in v)
    assert (cut.text, cut.answer, cut.reason) == (None, "7", CUT_TEXT_REASON)


async def test_a_refusing_results_topic_is_fatal_not_retried_forever() -> None:
    producer = FakeProducer(refused={"clear.results"})
    with pytest.raises(FatalPublishError, match="TopicAuthorizationFailedError"):
        await asyncio.wait_for(sink(producer).publish_results([result(1)]), 5)


async def test_a_refusing_window_topic_drops_the_report_and_blocks_nothing() -> None:
    producer = FakeProducer(refused={"clear.windows"})
    report = WindowReport.model_validate_json(
        '{"window_id": "w-1", "shadow_price": 0.0, "budget_tokens": 1.0, "spent_tokens": 0,'
        ' "probe_tokens": 0, "counts": {"answered": 0, "abandoned": 0, "expired": 0,'
        ' "failed": 0, "rejected": 0}, "solver": "none", "solve_ms": 0.0,'
        ' "started_at": "2026-12-01T00:00:00Z", "ended_at": "2026-12-01T00:00:00Z"}'
    )
    await asyncio.wait_for(sink(producer).publish_window(report), 5)
    assert producer.acked == []


async def test_configured_secrets_are_masked_in_every_record() -> None:
    key = 'k3y-"quoted"-é'  # JSON escapes the quotes; pydantic writes the é as is
    settings = load_settings(
        {
            "CLEAR_VLLM_ENDPOINTS": "http://127.0.0.1:1",
            "CLEAR_VLLM_API_KEY": key,
            "CLEAR_WINDOW_TOPIC": "clear.windows",
        },
        env_file=None,
    )
    producer = FakeProducer()
    echoed = result(1).model_copy(update={"reason": f"HTTP 500: key {key} refused"})
    await KafkaResultSink(producer, settings).publish_results([echoed])  # type: ignore[arg-type]
    ((_, value),) = producer.acked
    assert QueryResult.model_validate_json(value).reason == "HTTP 500: key *** refused"
