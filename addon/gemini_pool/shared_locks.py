"""Work one worker does for the whole pool (several workers on Redis): the half-open probe of a
breaker (one across the pool) and the no-quota check of a key that answered dead (one across the
pool). Each is a Redis lock (SET NX PX) named by the key's fingerprint, never its secret.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from .selector import KeyState

if TYPE_CHECKING:
    from .shared import SharedState

PROBE_LOCK_MS = 10_000  # a probe grant; renewed while the breaker still waits for its probe
CHECK_LOCK_MS = 30_000


class SharedLocks:
    def __init__(self, shared: SharedState) -> None:
        self.shared = shared

    async def grant_probes(self, now: float) -> None:
        """Breakers waiting for their half-open probe: one worker across the pool gets it."""
        for state in self.shared.pool.keys.values():
            state.breaker.shared = self.shared.up  # keys a reload added, too
        if not self.shared.up or self.shared._redis is None:
            return
        for state in self.shared.pool.keys.values():
            if state.breaker.wants_probe(now):
                with contextlib.suppress(RedisError, OSError):
                    got = await self.shared._redis.set(
                        self.shared._k(f"probe:{state.spec.fingerprint}"),
                        self.shared.worker,
                        nx=True,
                        px=PROBE_LOCK_MS,
                    )
                    state.breaker.probe_granted = bool(got)

    async def claim_check(self, state: KeyState) -> bool:
        """May this worker run the no-quota check of `state` now? (One worker across the pool.)"""
        if not self.shared.up or self.shared._redis is None:
            return True
        try:
            got = await self.shared._redis.set(
                self.shared._k(f"check:{state.spec.fingerprint}"),
                self.shared.worker,
                nx=True,
                px=CHECK_LOCK_MS,
            )
        except (RedisError, OSError):
            return True  # Redis just went away: checking twice beats not checking
        return bool(got)
