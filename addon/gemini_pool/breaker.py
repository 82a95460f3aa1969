"""A per-key circuit breaker: closed -> open -> half-open (exactly one probe) -> closed/open.

Pure logic; time is passed in (seconds, any monotonic-or-wall clock used consistently).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 3
    base_cooldown: float = 5.0
    max_cooldown: float = 300.0
    probe_timeout: float = 120.0  # a probe that never reports back stops blocking after this


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self.policy = policy or BreakerPolicy()
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive failures while closed
        self.trips = 0  # consecutive trips without a success: drives the exponential cooldown
        self.open_until = 0.0
        self.probe_started: float | None = None
        # shared by several workers: the half-open probe is taken only with this worker's grant
        # (one worker across the pool wins it); without one the breaker stays open here
        self.shared = False
        self.probe_granted = False

    def _probe_busy(self, now: float) -> bool:
        return (
            self.probe_started is not None and now - self.probe_started < self.policy.probe_timeout
        )

    def available(self, now: float) -> bool:
        """Could a request be admitted now? Does not change state."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now >= self.open_until and self._may_probe()
        return not self._probe_busy(now)

    def _may_probe(self) -> bool:
        return not self.shared or self.probe_granted

    def wants_probe(self, now: float) -> bool:
        """Open, its cooldown over, waiting for a probe grant (shared mode)."""
        return (
            self.shared
            and self.state is BreakerState.OPEN
            and now >= self.open_until
            and not self.probe_granted
        )

    def acquire(self, now: float) -> bool:
        """Admit one request. In half-open state only one probe is admitted at a time."""
        if self.state is BreakerState.OPEN and now >= self.open_until and self._may_probe():
            self.state = BreakerState.HALF_OPEN
            self.probe_started = None
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN or self._probe_busy(now):
            return False
        self.probe_started = now
        return True

    def record_success(self) -> None:
        self.failures = 0
        self.trips = 0
        self.state = BreakerState.CLOSED
        self.probe_started = None
        self.probe_granted = False

    def record_failure(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._trip(now)
            return
        if self.state is BreakerState.OPEN:
            return
        self.failures += 1
        if self.failures >= self.policy.failure_threshold:
            self._trip(now)

    def record_neutral(self) -> None:
        """An outcome that says nothing about the key (e.g. model overloaded): free the probe slot."""
        if self.state is BreakerState.HALF_OPEN:
            self.probe_started = None

    def _trip(self, now: float) -> None:
        self.trips += 1
        cooldown = min(self.policy.max_cooldown, self.policy.base_cooldown * 2 ** (self.trips - 1))
        self.state = BreakerState.OPEN
        self.open_until = now + cooldown
        self.failures = 0
        self.probe_started = None
        self.probe_granted = False

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.open_until - now) if self.state is BreakerState.OPEN else 0.0

    # --- persistence
    def snapshot(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "failures": self.failures,
            "trips": self.trips,
            "open_until": self.open_until,
        }

    def restore(self, data: dict[str, Any]) -> None:
        state = BreakerState(data.get("state", "closed"))
        # a probe in flight did not survive the restart: half-open starts over without one
        self.state = state
        self.failures = int(data.get("failures", 0))
        self.trips = int(data.get("trips", 0))
        self.open_until = float(data.get("open_until", 0.0))
        self.probe_started = None
