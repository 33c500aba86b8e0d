"""The real Tansu broker speaks enough Kafka for the daemon: groups, manual commits, resume."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from clearbudget.daemon.replay.embedded import EmbeddedBroker

pytestmark = pytest.mark.kafka


async def produce(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(count):
            await producer.send(topic, f"value-{i}".encode(), key=f"query-{i}".encode())
        await producer.flush()
    finally:
        await producer.stop()


async def consume(consumer: AIOKafkaConsumer, count: int) -> list[ConsumerRecord]:
    records: list[ConsumerRecord] = []
    async with asyncio.timeout(20.0):
        while len(records) < count:
            batch = await consumer.getmany(timeout_ms=200)
            for partition_records in batch.values():
                records.extend(partition_records)
    return records


def group_consumer(bootstrap: str, topic: str | None, group: str) -> AIOKafkaConsumer:
    # Tansu waits out a departed member's session before rebalancing, so keep sessions short.
    return AIOKafkaConsumer(
        *([topic] if topic else []),
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        rebalance_timeout_ms=2000,
    )


async def test_group_consumer_resumes_after_manual_commit(
    kafka_broker: EmbeddedBroker, kafka_topic
) -> None:
    topic = await kafka_topic("queries", partitions=3)
    await produce(kafka_broker.bootstrap, topic, 30)

    first = group_consumer(kafka_broker.bootstrap, topic, "g-resume")
    await first.start()
    try:
        records = await consume(first, 30)
        assert sorted(r.value for r in records) == sorted(f"value-{i}".encode() for i in range(30))
        assert {r.partition for r in records} == {0, 1, 2}, "keys should spread over partitions"
        # Commit only the first half of each partition, as the daemon does for unfinished work.
        commit_to: dict[TopicPartition, int] = {}
        for partition in range(3):
            offsets = sorted(r.offset for r in records if r.partition == partition)
            commit_to[TopicPartition(topic, partition)] = offsets[len(offsets) // 2]
        await first.commit(commit_to)
        for tp, offset in commit_to.items():
            assert await first.committed(tp) == offset
    finally:
        await first.stop()

    # A restarted reader of the same group starts from the committed offsets. It takes the
    # partitions by assignment, so the test does not wait out the first member's session.
    second = group_consumer(kafka_broker.bootstrap, None, "g-resume")
    await second.start()
    second.assign([TopicPartition(topic, p) for p in range(3)])
    try:
        expected = sum(
            1 for r in records if r.offset >= commit_to[TopicPartition(topic, r.partition)]
        )
        redelivered = await consume(second, expected)
        assert len(redelivered) == expected
        for record in redelivered:
            assert record.offset >= commit_to[TopicPartition(topic, record.partition)]
        # Nothing beyond the uncommitted tail arrives.
        assert await second.getmany(timeout_ms=500) == {}
    finally:
        await second.stop()


async def test_keys_and_headers_round_trip(kafka_broker: EmbeddedBroker, kafka_topic) -> None:
    topic = await kafka_topic("results")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            topic, b'{"id": "q1"}', key=b"q1", headers=[("schema_version", b"1")]
        )
        assert meta.offset == 0
    finally:
        await producer.stop()
    consumer = group_consumer(kafka_broker.bootstrap, topic, "g-headers")
    await consumer.start()
    try:
        (record,) = await consume(consumer, 1)
        assert (record.key, record.value) == (b"q1", b'{"id": "q1"}')
        assert list(record.headers) == [("schema_version", b"1")]
    finally:
        await consumer.stop()
