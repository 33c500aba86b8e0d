"""Waiting in async tests for something that takes a few loop turns over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Return once `condition()` holds; fail the test if it does not within `within_s`."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
