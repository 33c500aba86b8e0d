"""Completion backends for tests: the simulator behind a slow pod."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from clearbudget.daemon.core.ports import Completion, CompletionBackend


class SlowBackend:
    """Another backend behind a pod that takes `delay_s` per request."""

    def __init__(self, inner: CompletionBackend, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s

    async def complete(self, prompt: str | Sequence[int], **request: Any) -> Completion:
        await asyncio.sleep(self.delay_s)
        return await self._inner.complete(prompt, **request)

    def ready(self) -> bool:
        return self._inner.ready()
