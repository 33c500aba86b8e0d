"""A memory of recurring prompts: the chains earlier queries with the same problem produced.

A prompt is recognised by a fingerprint of its text with the values of the serving tags (model,
tenant) masked out, so the same problem asked of another model or by another tenant is the same
problem (routers often stamp such names into the prompt); the task stays part of what the
problem is. Case and runs of whitespace are ignored. The memory holds, per fingerprint, the last
few chains as integer rows (which record and tag curve they ran under, their length, whether
they finished and answered, and which answer), bounded in prompts and in chains per prompt, so
a window gathers them with one concatenation.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "COLUMNS",
    "MASKED_LEVELS",
    "Interner",
    "PromptMemory",
    "prompt_key",
    "tag_signature",
]

MASKED_LEVELS: tuple[str, ...] = ("model", "tenant")
TagSignature = tuple[tuple[str, str], ...]
# Columns of a remembered chain: record id, curve-tags id, tokens, finished, answered, answer id
# (−1: none).
COLUMNS = ("record", "curve", "tokens", "finished", "answered", "answer")
RECORD, CURVE, TOKENS, FINISHED, ANSWERED, ANSWER = range(len(COLUMNS))
NO_ANSWER = -1
_SPACE = re.compile(r"\s+")
_MASK = "\x00"
_MIN_MASKED = 2  # a one-character tag value would blank out ordinary letters
_EMPTY = np.zeros((0, len(COLUMNS)), dtype=np.int64)


def tag_signature(tags: Mapping[str, str]) -> TagSignature:
    """A hashable, order-free form of a tag mapping."""
    return tuple(sorted(tags.items()))


def prompt_key(prompt: str, tags: Mapping[str, str], masked: Sequence[str] = MASKED_LEVELS) -> int:
    """Fingerprint of the problem a prompt asks (see the module docstring)."""
    text = prompt
    # Longest first, so a value containing another is masked whole.
    values = sorted({tags[k] for k in masked if k in tags}, key=len, reverse=True)
    for value in values:
        if len(value) >= _MIN_MASKED:
            text = text.replace(value, _MASK)
    text = _SPACE.sub(" ", text).strip().lower()
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, signed=True)


class Interner:
    """Small integer ids for hashable values (tag signatures, answers), bounded: when full it
    starts over, and ids handed out before are simply no longer resolvable (`value` → None)."""

    def __init__(self, limit: int = 1 << 16) -> None:
        self._ids: dict[object, int] = {}
        self._values: dict[int, object] = {}
        self._next = 0
        self._limit = limit
        self.generation = 0  # bumped whenever earlier ids stop resolving

    def id(self, value: object) -> int:
        found = self._ids.get(value)
        if found is not None:
            return found
        if len(self._ids) >= self._limit:
            self._ids.clear()
            self._values.clear()
            self.generation += 1
        self._ids[value] = self._next
        self._values[self._next] = value
        self._next += 1
        return self._next - 1

    def value(self, ident: int) -> object | None:
        return self._values.get(ident)


class _Ring:
    """One prompt's chains: a fixed block of rows written round-robin."""

    __slots__ = ("count", "rows")

    def __init__(self, size: int) -> None:
        self.rows = np.zeros((size, len(COLUMNS)), np.int64)
        self.count = 0


class PromptMemory:
    """Bounded map from prompt fingerprint to its most recent chains (the least recently seen
    prompt goes first when full)."""

    def __init__(self, *, max_prompts: int = 65536, max_chains: int = 64) -> None:
        if max_prompts < 1 or max_chains < 1:
            raise ValueError("max_prompts and max_chains must be >= 1")
        self._max_prompts = max_prompts
        self._max_chains = max_chains
        self._rings: OrderedDict[int, _Ring] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rings)

    def add(self, key: int, row: Sequence[int]) -> None:
        """Remember one chain (a row of `COLUMNS`) under a prompt fingerprint."""
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(self._max_chains)
            while len(self._rings) > self._max_prompts:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(key)
        ring.rows[ring.count % self._max_chains] = row
        ring.count += 1

    def unanswer(self, key: int, row: Sequence[int]) -> bool:
        """Rewrite one remembered answered chain equal to `row` as finished without an answer
        (answered 0, no answer id): what a grade of "wrong" makes of it. False when no such
        row is remembered (the prompt or the chain was forgotten, or it was already graded)."""
        rows = self.chains(key)  # a view: writes go to the ring
        if not rows.size or row[ANSWERED] == 0:
            return False
        hits = np.flatnonzero(np.all(rows == np.asarray(row, dtype=np.int64), axis=1))
        if hits.size == 0:
            return False
        rows[hits[0], ANSWERED] = 0
        rows[hits[0], ANSWER] = NO_ANSWER
        return True

    def chains(self, key: int) -> NDArray[np.int64]:
        """The prompt's remembered chains as rows of `COLUMNS` (no rows for an unseen prompt)."""
        ring = self._rings.get(key)
        if ring is None:
            return _EMPTY
        return ring.rows[: min(ring.count, self._max_chains)]
