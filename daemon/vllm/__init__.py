"""The vLLM edge: the OpenAI completions wire format (`protocol`, shared by the pool and the
simulator's server), circuit breakers (`breaker`) and the pod pool (`pool`) behind the
`daemon.core.ports.CompletionBackend` port, with its HTTP transport injected.

May import `daemon.core.ports`, pydantic, orjson, structlog, prometheus_client, yarl and
aiohttp (the default transport only); never aiokafka, `daemon.kafka`, `daemon.replay` or
`daemon.cli`.
"""
