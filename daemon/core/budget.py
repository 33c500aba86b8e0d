"""Token budget per window: earned at a rate, shared across replicas, with bounded carry-over.

Windows may overlap (several run at once), so a window *reserves* its budget when it starts:
what its span earned plus the whole carry-over, which it takes. At its end it *settles*: the
unspent part returns to the carry, capped. No two windows can spend the same tokens, so the
tokens reserved never exceed the tokens earned, in any interleaving.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BudgetLedger:
    """Turns a window's time span into a token budget and settles what was actually spent.

    `share` is this replica's fraction of the global rate (its assigned partitions over all
    partitions); unspent tokens carry to later windows, capped at `carry_over_cap_tokens`
    (times the share) so an idle spell cannot build an unbounded burst. A window that spent
    more than it reserved (the tokens of garbled answers the vLLM pool retried are charged on
    top of an allocation) leaves a debt the next reservations repay first.
    """

    tokens_per_second: float
    carry_over_cap_tokens: float
    share: float = 1.0
    carry: float = 0.0
    debt: float = 0.0  # overspend not yet taken out of a later window's budget
    # Running totals, for the invariant (reserved − returned ≤ earned) and for metrics.
    earned_total: float = 0.0
    reserved_total: float = 0.0
    returned_total: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens_per_second <= 0:
            raise ValueError("tokens_per_second: must be > 0")
        if self.carry_over_cap_tokens < 0:
            raise ValueError("carry_over_cap_tokens: must be >= 0")
        self.set_share(self.share)

    def set_share(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share: must be in [0, 1], got {share}")
        self.share = share
        self.carry = min(self.carry, self.carry_cap)

    @property
    def carry_cap(self) -> float:
        return self.carry_over_cap_tokens * self.share

    def carry_room(self) -> float:
        """How many more unspent tokens the carry-over can take now, a debt's repayment
        included (the rest is lost)."""
        return max(self.carry_cap - self.carry, 0.0) + self.debt

    def earned(self, seconds: float) -> float:
        return self.tokens_per_second * self.share * max(seconds, 0.0)

    def reserve(self, seconds: float) -> float:
        """A window spanning `seconds` starts: it gets what that span earned plus the carry,
        which it takes (a window starting next sees none of it until this one settles)."""
        earned = self.earned(seconds)
        budget = earned + self.carry
        repaid = min(self.debt, budget)
        self.debt -= repaid
        budget -= repaid
        self.carry = 0.0
        self.earned_total += earned
        self.reserved_total += budget + repaid  # the repaid part was spent earlier
        return budget

    def settle(self, reserved: float, spent: float) -> float:
        """A window that reserved `reserved` spent `spent`: the rest repays any debt, then
        returns to the carry, up to the cap; spend beyond `reserved` becomes debt. Returns the
        carry now held."""
        self.debt += max(spent - reserved, 0.0)
        unspent = max(reserved - spent, 0.0)
        repaid = min(self.debt, unspent)  # consumed: paid for an earlier overspend
        self.debt -= repaid
        kept = min(self.carry + unspent - repaid, self.carry_cap)
        self.returned_total += kept - self.carry
        self.carry = kept
        return self.carry

    def paced_size(self, window_seconds: float, min_tokens_per_query: float, max_items: int) -> int:
        """The most queries a window may hold so that one window's earnings pay
        `min_tokens_per_query` each (0: no pacing)."""
        if min_tokens_per_query <= 0:
            return max_items
        most = self.earned(window_seconds)
        return max(1, min(max_items, int(most // min_tokens_per_query)))

    def seconds_until(self, tokens: float, accrued_seconds: float) -> float:
        """How much longer a window that has accrued `accrued_seconds` must wait before its
        reservation holds `tokens` (inf while this replica earns nothing)."""
        short = tokens + self.debt - self.carry - self.earned(accrued_seconds)
        if short <= 0:
            return 0.0
        rate = self.tokens_per_second * self.share
        return short / rate if rate > 0 else float("inf")

    @property
    def outstanding(self) -> float:
        """Tokens reserved by windows and not returned (spent, running, or forfeited)."""
        return self.reserved_total - self.returned_total
