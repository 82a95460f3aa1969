"""Budget attempts a worker charged while Redis was away, told to the other workers once it is back.

Spends normally travel as events only (`shared.py`). Events sent while Redis is away are lost, and
one sent when a worker comes back reaches only the workers already listening. So, at its first
sync after being away, a worker:
1. reads the list `<prefix>:away` and counts every entry of another worker it has not counted yet;
2. appends its own (id, worker, items) and publishes it with that id.
A worker that comes back later reads it from the list; one already listening hears the event; an
id counted once (either way) is never counted again. The list is bounded: at most MAX_ENTRIES
entries of at most MAX_ITEMS spends each, and it expires AWAY_TTL seconds after the last write.
Names and numbers only, no secrets.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gemini_proxy")

MAX_ENTRIES = 200  # entries kept in the list (one per worker's return)
MAX_ITEMS = 10_000  # spends in one entry (the newest are kept)
AWAY_TTL_MS = 26 * 3600 * 1000  # longer than a Pacific day (the longest a count matters)
REMEMBERED = 10_000  # ids counted, remembered so that none is counted twice

Item = tuple[str, str, dict[str, Any] | None]


class AwaySpends:
    def __init__(self, prefix: str, worker: str) -> None:
        self.key = f"{prefix}:away"
        self.worker = worker
        self._counted: OrderedDict[str, None] = OrderedDict()

    def first_time(self, entry_id: str) -> bool:
        """Has the entry `entry_id` not been counted yet? (It is from now on.)"""
        if entry_id in self._counted:
            return False
        self._counted[entry_id] = None
        while len(self._counted) > REMEMBERED:
            self._counted.popitem(last=False)
        return True

    async def exchange(
        self, redis: Any, mine: list[Item], apply: Callable[[str, str, dict[str, Any]], Any]
    ) -> dict[str, Any] | None:
        """Count the other workers' entries; store this worker's. Returns the event to publish
        (None: nothing spent while away). Redis errors propagate (the sync is retried)."""
        for raw in await redis.lrange(self.key, 0, -1):
            try:
                doc = json.loads(raw)
                if doc["w"] == self.worker or not self.first_time(str(doc["id"])):
                    continue
                for table, field, value in doc["items"]:
                    if table == "spends" and isinstance(value, dict):
                        apply(table, str(field), value)
            except Exception as e:  # an entry that does not parse: skipped, never a reconnect
                log.warning("gemini-proxy: skipping a malformed %s entry: %s", self.key, e)
        if not mine:
            return None
        entry_id = f"{self.worker}:{secrets.token_hex(8)}"
        self.first_time(entry_id)
        doc = {"w": self.worker, "id": entry_id, "items": [list(i) for i in mine[-MAX_ITEMS:]]}
        async with redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.key, json.dumps(doc))
            pipe.ltrim(self.key, -MAX_ENTRIES, -1)
            pipe.pexpire(self.key, AWAY_TTL_MS)
            await pipe.execute()
        return doc
