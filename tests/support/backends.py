"""Completion backends for tests: the simulator behind a slow pod."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from clearbudget.daemon.core.ports import Completion, CompletionBackend


class SlowBackend:
    """Another backend behind a pod that takes `delay_s` per request."""

    def __init__(self, inner: CompletionBackend, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s

    async def complete(
        self,
        prompt: str | Sequence[int],
        *,
        n: int,
        max_tokens: int,
        seed: int | None = None,
        thinking_token_budget: int | None = None,
    ) -> Completion:
        await asyncio.sleep(self.delay_s)
        return await self._inner.complete(
            prompt, n=n, max_tokens=max_tokens, seed=seed,
            thinking_token_budget=thinking_token_budget,
        )  # fmt: skip

    def ready(self) -> bool:
        return self._inner.ready()
