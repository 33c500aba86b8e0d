"""Tag budgets: shares of each window's budget reserved for the queries of one tag value.

`CLEAR_TAG_BUDGETS=tenant=acme:0.3,tenant=beta:0.2` reserves 30% of every window's budget for
the queries tagged `tenant: acme` and 20% for `tenant: beta`; the rest (here 50%) is a common
pool that every query may draw on, those of acme and beta included. A share is counted on the
tokens a tag's queries generate, probes included. Work is never stranded: a tag with no query
in a window leaves its share to the pool, where the others absorb it.

The window problem expresses this with the solver's tag rows (Σ over a tag ≤ its row):

- each present entry t gets the row `reserve_t + pool`, where `reserve_t` is its share of the
  window's budget less what its queries already spent on probes;
- the queries of no entry (`other`) get the row `pool`, so they cannot eat into a reserve;
- the window budget row bounds the total as always.

With two groups in a window (two tenants whose shares add up to 1, or one tenant and the rest)
these rows are exactly "a reserve each, the pool shared". With more groups the pool could be
claimed twice over and a reserve invaded; and a reserve can be left partly idle when what is
left of it is less than any of its queries needs to be worth a token (rounding funds or
abandons a query whole). `TagRows.rebalance` then gives an invaded group its reserve, lends an
idle reserve to the groups that want more, and splits what is spare among the groups that
drew on the pool (a second solve on those rows, which add up to the window budget).

Shares are of what each window allots: a chain that stops before its allotment hands the rest
to its group's chains cut at theirs, within the group's row (`WindowPipeline._recycle`), then
back to the shared carry. Tagged windows are solved by cvxpy (`solve_window`, method "auto",
with tag rows) on the policy's long-lived allocator; probe selection uses the same rows, solved
in closed form (which honours tag rows: each query pays max(λ, its tag's price)).

A query belongs to the first entry whose tag it carries with that value; no entry: `other`.
Metric labels are the entries' `TAG=VALUE` keys and `other`, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

OTHER = "other"
_TOLERANCE = 1e-9  # shares that add up to 1 in decimal may add up to 1 + 1e-16 in binary
_REBALANCE_SLACK = 1.0  # tokens: a group this close to its reserve or row is at it


@dataclass(frozen=True, slots=True)
class TagShare:
    """One `TAG=VALUE:SHARE` entry."""

    tag: str
    value: str
    share: float

    @property
    def key(self) -> str:
        """`TAG=VALUE`: the group's name in tag rows, metrics and logs."""
        return f"{self.tag}={self.value}"

    def __str__(self) -> str:
        return f"{self.key}:{self.share:g}"


@dataclass(frozen=True, slots=True)
class TagBudgets:
    """The configured entries; `parse` reads `CLEAR_TAG_BUDGETS`."""

    entries: tuple[TagShare, ...]

    @classmethod
    def parse(cls, text: str) -> TagBudgets:
        """`TAG=VALUE:SHARE,...`; raises ValueError naming the first bad entry."""
        entries: list[TagShare] = []
        seen: set[str] = set()
        for raw in (part.strip() for part in text.split(",")):
            if not raw:
                continue
            entry = _parse_entry(raw)
            if entry.key in seen:
                raise ValueError(f"entry {raw!r}: {entry.key} is listed twice")
            seen.add(entry.key)
            entries.append(entry)
        if not entries:
            raise ValueError("expected TAG=VALUE:SHARE entries, comma-separated")
        total = math.fsum(e.share for e in entries)
        if total > 1.0 + _TOLERANCE:
            raise ValueError(f"the shares add up to {total:g}, more than the whole budget (1)")
        return cls(tuple(entries))

    def __str__(self) -> str:
        return ",".join(map(str, self.entries))

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def label_keys(self) -> tuple[str, ...]:
        """Every label a per-tag metric may carry: the entries and `other`."""
        return (*self.keys, OTHER)

    def group_of(self, tags: Mapping[str, str]) -> str:
        for entry in self.entries:
            if tags.get(entry.tag) == entry.value:
                return entry.key
        return OTHER

    def rows(
        self,
        groups: Sequence[str],
        budget: float,
        probes: Mapping[str, float] | None = None,
    ) -> TagRows | None:
        """The window's tag rows for the queries to allocate (`groups`: one per query), with
        `budget` tokens left after the probes, of which `probes` says how many each group spent
        (they count against its share). None when no entry has a query to allocate: it is an
        ordinary window then."""
        spent = dict(probes or {})
        present = set(groups)
        shares = {e.key: e.share for e in self.entries if e.key in present}
        if not shares:
            return None
        budget = max(budget, 0.0)
        whole = budget + math.fsum(spent.values())  # the window's budget before its probes
        fair = {key: share * whole for key, share in shares.items()}
        reserves = {key: max(fair[key] - spent.get(key, 0.0), 0.0) for key in fair}
        reserved = math.fsum(reserves.values())
        if reserved > budget:  # the others' probes ate into the reserves: shrink them alike
            reserves = {key: r * budget / reserved for key, r in reserves.items()}
            reserved = budget
        pool = max(budget - reserved, 0.0)
        if OTHER in present:
            reserves[OTHER] = 0.0
        return TagRows(budget, reserves, pool, fair)


@dataclass(frozen=True, slots=True)
class TagRows:
    """One window's reserves (tokens left to each present group after its probes) and the
    common pool; `budgets` are the rows the solver gets; `fair` is each present entry's share
    of the window before its probes."""

    budget: float
    reserves: Mapping[str, float]
    pool: float
    fair: Mapping[str, float]

    @property
    def budgets(self) -> dict[str, float]:
        return {key: reserve + self.pool for key, reserve in self.reserves.items()}

    def rebalance(
        self, allocated: Mapping[str, float], wants_more: Iterable[str]
    ) -> dict[str, float] | None:
        """Rows for a second solve when the first, on `budgets`, broke a reserve or left one
        idle while another group wanted more; None when it did neither. `allocated`: tokens each
        group got; `wants_more`: groups with a query that could have taken more.

        A group below its reserve was *invaded* if it wanted more and the others took more than
        the budget less its reserve (the pool claimed twice over): it gets its reserve. Below
        its reserve otherwise, it is *idle* (it wanted no more, or what is left of its reserve
        funds none of its queries, say less than the next query's threshold): it keeps what it
        got and lends the rest. The other groups get their reserves plus what is then spare, in
        proportion to what they took beyond their reserves (else to their reserves). The rows
        add up to the window budget."""
        wanting = set(wants_more)
        got = {key: float(allocated.get(key, 0.0)) for key in self.reserves}
        total = math.fsum(got.values())
        below = [key for key, r in self.reserves.items() if got[key] < r - _REBALANCE_SLACK]
        invaded = [
            key
            for key in below
            if key in wanting
            and total - got[key] > self.budget - self.reserves[key] + _REBALANCE_SLACK
        ]
        idle = [key for key in below if key not in invaded]
        rows = self.budgets
        takers = [
            key
            for key in self.reserves
            if key not in below and key in wanting and got[key] >= rows[key] - _REBALANCE_SLACK
        ]
        if not invaded and not (idle and takers):
            return None
        fixed = {key: self.reserves[key] for key in invaded} | {key: got[key] for key in idle}
        rest = [key for key in self.reserves if key not in fixed]
        spare = self.budget - math.fsum(fixed.values())
        spare -= math.fsum(self.reserves[key] for key in rest)
        weights = {key: max(got[key] - self.reserves[key], 0.0) for key in rest}
        if math.fsum(weights.values()) <= 0.0:
            weights = {key: self.reserves[key] for key in rest}
        if math.fsum(weights.values()) <= 0.0:
            weights = dict.fromkeys(rest, 1.0)
        scale = max(spare, 0.0) / math.fsum(weights.values()) if rest else 0.0
        return fixed | {key: self.reserves[key] + weights[key] * scale for key in rest}


def _parse_entry(raw: str) -> TagShare:
    left, colon, share_text = raw.rpartition(":")
    tag, equals, value = left.partition("=")
    tag, value = tag.strip(), value.strip()
    if not colon or not equals or not tag or not value:
        raise ValueError(f"entry {raw!r} is not TAG=VALUE:SHARE")
    try:
        share = float(share_text)
    except ValueError:
        raise ValueError(f"entry {raw!r}: share {share_text.strip()!r} is not a number") from None
    if not (math.isfinite(share) and 0.0 < share <= 1.0):
        raise ValueError(f"entry {raw!r}: the share must be in (0, 1]")
    return TagShare(tag, value, share)
