"""The Kafka edge: the service loop (consume → admit → window → pipeline → publish → commit),
record intake, offset bookkeeping, result sinks and the client factories (TLS/SASL in one place).

May import `daemon.core`, `daemon.settings`, `schemas`, `solver` and aiokafka; never aiohttp,
`daemon.vllm`, `daemon.replay` or `daemon.cli`.
"""
