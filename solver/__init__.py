"""Pure, synchronous numerics: utility model, fitting and windowed allocation.

Nothing in this package may import asyncio, Kafka or HTTP clients.
"""
