"""Per-tag stage curves (end rate and answer rate by length), learned online and pooled.

Keys nest in a fixed tag order (task, then task+model, then +tenant, then +hint bucket); each
level's stage curve is the parent's curve updated with that key's chains (see
`StageCurve.shrunk`), the root is a weak generic default. Keys are bounded (least recently
observed goes first, never the global pool), so producers cannot grow memory by inventing tags.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from clearbudget.solver.stages import STAGES, StageCounts, StageCurve

__all__ = ["DEFAULT_LEVELS", "HazardBook", "default_curve"]

DEFAULT_LEVELS: tuple[str, ...] = ("task", "model", "tenant", "hint")
_GLOBAL = "*"


def default_curve() -> StageCurve:
    """Generic start: chains end at 1/1500 per token (mean ~1.5k), 80% with an answer."""
    return StageCurve(np.full(STAGES, 1.0 / 1500.0), np.full(STAGES, 0.8))


class HazardBook:
    """Stage curves per tag key; `curve(tags)` is the most specific pooled curve."""

    def __init__(
        self,
        *,
        levels: Sequence[str] = DEFAULT_LEVELS,
        default: StageCurve | None = None,
        events0: float = 1.0,
        answers0: float = 4.0,
        max_keys: int = 4096,
    ) -> None:
        if events0 <= 0 or answers0 <= 0:
            raise ValueError("events0 and answers0 must be > 0")
        if max_keys < 1:
            raise ValueError(f"max_keys: must be >= 1, got {max_keys!r}")
        self.levels = tuple(levels)
        self.default = default or default_curve()
        self.events0 = float(events0)
        self.answers0 = float(answers0)
        self._max_keys = max_keys
        self._counts: OrderedDict[str, StageCounts] = OrderedDict()
        self._versions: dict[str, int] = {}
        self._cache: dict[tuple[str, ...], tuple[tuple[int, ...], StageCurve]] = {}

    def keys_for(self, tags: Mapping[str, str]) -> tuple[str, ...]:
        """Pool keys from the root to the most specific (levels absent from `tags` skipped)."""
        keys, parts = [_GLOBAL], []
        for level in self.levels:
            if level in tags:
                parts.append(f"{level}={tags[level]}")
                keys.append("|".join(parts))
        return tuple(keys)

    def observe(
        self, tags: Mapping[str, str], tokens: int, *, finished: bool, answered: bool
    ) -> None:
        """Record one chain's final state under every key of its tags."""
        if tokens < 0:
            raise ValueError(f"tokens: must be >= 0, got {tokens!r}")
        for key in self.keys_for(tags):
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = StageCounts.empty()
                self._evict_beyond_cap()
            else:
                self._counts.move_to_end(key)
            counts.add(int(tokens), bool(finished), bool(finished and answered))
            self._versions[key] = self._versions.get(key, 0) + 1

    def unanswer(self, tags: Mapping[str, str], tokens: int) -> int:
        """Under every key of `tags`, count one answered chain that finished at `tokens` as
        finished without an answer (`StageCounts.unanswer`; a key that no longer holds such a
        chain is left alone). Returns how many keys changed."""
        changed = 0
        for key in self.keys_for(tags):
            counts = self._counts.get(key)
            if counts is not None and counts.unanswer(int(tokens)):
                self._versions[key] = self._versions.get(key, 0) + 1
                changed += 1
        return changed

    def _evict_beyond_cap(self) -> None:
        while len(self._counts) > self._max_keys + 1:  # + the global pool, never evicted
            oldest = next(k for k in self._counts if k != _GLOBAL)
            del self._counts[oldest]
            self._versions.pop(oldest, None)
        if len(self._cache) > 4 * self._max_keys:
            self._cache.clear()

    @property
    def keys(self) -> int:
        return len(self._counts)

    def chains_seen(self, tags: Mapping[str, str] | None = None) -> int:
        counts = self._counts.get(self.keys_for(tags or {})[-1])
        return counts.chains if counts else 0

    def curve(self, tags: Mapping[str, str]) -> StageCurve:
        """The pooled curve of the most specific key (cached until one of its keys learns)."""
        keys = self.keys_for(tags)
        versions = tuple(self._versions.get(k, 0) for k in keys)
        cached = self._cache.get(keys)
        if cached is not None and cached[0] == versions:
            return cached[1]
        curve = self.default
        for key in keys:
            counts = self._counts.get(key)
            if counts is not None and counts.chains:
                curve = curve.shrunk(counts, self.events0, self.answers0)
        self._cache[keys] = (versions, curve)
        return curve
