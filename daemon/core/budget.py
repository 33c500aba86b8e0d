"""Token budget per window: earned at a rate, shared across replicas, with bounded carry-over."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BudgetLedger:
    """Turns a window's time span into a token budget and settles what was actually spent.

    `share` is this replica's fraction of the global rate (its assigned partitions over all
    partitions); unspent tokens carry to the next window, capped at `carry_over_windows`
    windows' worth so an idle spell cannot build an unbounded burst.
    """

    tokens_per_second: float
    carry_over_cap_tokens: float
    share: float = 1.0
    carry: float = 0.0

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

    def earned(self, seconds: float) -> float:
        return self.tokens_per_second * self.share * max(seconds, 0.0)

    def window_budget(self, seconds: float) -> float:
        """Tokens available to a window spanning `seconds`: earned now plus carry-over."""
        return self.earned(seconds) + self.carry

    def settle(self, budget: float, spent: float) -> float:
        """Record the window's spend; returns the carry-over kept for the next window."""
        self.carry = min(max(budget - spent, 0.0), self.carry_over_cap_tokens * self.share)
        return self.carry
