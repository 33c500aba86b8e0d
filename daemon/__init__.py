"""The asyncio service around the solver: Kafka, vLLM pool, windows, CLI."""
