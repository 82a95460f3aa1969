"""Success ratio of a key over its last N attempts that said something about the key."""

from __future__ import annotations

from collections import deque

from .classify import Outcome

# Answers that count against a key's health: Google refused the key itself, or its connection
# failed. A quota answer (429, a capped project, a model at capacity) says the key is spent for
# now, which its cooldown handles; it is no failure of the key and leaves health alone, as do
# Google's own errors and the caller's.
HEALTH_FAILURES = frozenset({Outcome.DEAD_KEY, Outcome.NETWORK})


def hurts_health(outcome: Outcome) -> bool:
    return outcome in HEALTH_FAILURES


class HealthWindow:
    def __init__(self, size: int = 20, min_samples: int = 5) -> None:
        self.results: deque[bool] = deque(maxlen=size)
        self.min_samples = min_samples
        self._ok = 0  # successes in `results`, kept as they come and go (read on every pick)

    def add(self, ok: bool) -> None:
        if len(self.results) == self.results.maxlen:
            self._ok -= self.results[0]
        self.results.append(ok)
        self._ok += ok

    def clear(self) -> None:
        self.results.clear()
        self._ok = 0

    @property
    def ratio(self) -> float:
        if not self.results:
            return 1.0
        return self._ok / len(self.results)

    def healthy(self, threshold: float) -> bool:
        """Too few samples to judge counts as healthy."""
        return len(self.results) < self.min_samples or self.ratio >= threshold

    def snapshot(self) -> list[int]:
        return [int(r) for r in self.results]

    def restore(self, data: list[int]) -> None:
        self.results.clear()
        self.results.extend(bool(x) for x in data)
        self._ok = sum(self.results)
