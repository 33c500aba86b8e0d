"""Per-endpoint circuit breakers for the vLLM pool.

A breaker opens after `failure_threshold` consecutive failures, lets a single trial request
through once `cooldown_s` has passed on the injected clock (or at once, after `allow_trial()`,
when a health probe says the endpoint is back), and closes on that trial's success. Each state
change is reported to an optional listener (the pool logs it).

May import only the standard library: it knows nothing of HTTP, metrics or the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["BreakerListener", "BreakerSettings", "BreakerState", "CircuitBreaker", "Verdict"]

BreakerState = Literal["closed", "half_open", "open"]
# What one finished request says about the endpoint's health; "neutral" (a 4xx, a cancelled
# request) says nothing and only frees the half-open trial slot.
Verdict = Literal["success", "failure", "neutral"]
# Called with (old, new) on every state change, synchronously, inside the breaker's call.
BreakerListener = Callable[[BreakerState, BreakerState], None]


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Circuit breaker policy, the same for every endpoint."""

    failure_threshold: int = 5
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {self.failure_threshold}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")


class CircuitBreaker:
    """Closed → open after N consecutive failures → half-open (one trial) after the cooldown."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Callable[[], float],
        on_change: BreakerListener | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        return self._state

    def available(self) -> bool:
        """Whether a request may be sent now."""
        if self._state == "closed":
            return True
        if self._state == "half_open":
            return not self._trial_in_flight
        return self.cooldown_left() == 0.0

    def cooldown_left(self) -> float:
        """Seconds until an open breaker lets its trial through; 0 when not open."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._settings.cooldown_s - (self._clock() - self._opened_at))

    def allow_trial(self) -> bool:
        """Half-open an open breaker now, cooldown or not (its endpoint answered a health check):
        the next request is the trial. False, and nothing changes, when it was not open."""
        if self._state != "open":
            return False
        self._trial_in_flight = False
        self._set("half_open")
        return True

    def begin(self) -> bool:
        """A request is being sent (after `available()`); True when it is the half-open trial."""
        if self._state == "closed":
            return False
        self._trial_in_flight = True
        self._set("half_open")
        return True

    def finish(self, verdict: Verdict, *, trial: bool) -> None:
        if trial:
            self._trial_in_flight = False
        if verdict == "success":
            self._failures = 0
            self._set("closed")
        elif verdict == "failure":
            self._failures += 1
            if self._state == "half_open" or self._failures >= self._settings.failure_threshold:
                self._open()

    def _open(self) -> None:
        if self._state != "open":
            self._opened_at = self._clock()
            self._failures = 0  # count anew: a failed half-open trial reopens on its own
        self._set("open")

    def _set(self, state: BreakerState) -> None:
        old, self._state = self._state, state
        if old != state and self._on_change is not None:
            self._on_change(old, state)
