"""Which client group owns each resource created through the proxy (with clients configured).

Google cannot tell a pool's callers apart (one project, one key, one list), so the proxy keeps
who created what: name -> (group, expires). A resource nobody created through the proxy has no
owner and is nobody's: with clients configured it is refused like another group's, until an
operator hands it to a group (`POST /admin/resources`, `gemini.own`). An upload session belongs
to the group that started it (kept under "upload:" + the digest of its upload token), and the file
it creates goes to that group.

Persisted and shared as pins of kind "owner" (through `pins.ResourcePins`: the store's pins table,
Redis' pins hash), expiring with the resource; a deletion through the proxy forgets the owner
everywhere. Bounded like every pin map. Pure: no mitmproxy.
"""

from __future__ import annotations

import time

from .pins import HOUR, Lru, Pin, ResourcePins, upload_digest

KIND_OWNER = "owner"
UPLOAD = "upload:"
DEFAULT_TTL = 48 * HOUR  # files live 48 h at Google; the others say when they expire


class Owners:
    def __init__(self, pins: ResourcePins) -> None:
        self.resource_pins = pins
        self.groups: Lru[tuple[str, float]] = Lru()  # name -> (group, expires)
        pins.kinds[KIND_OWNER] = self

    # --- who owns what

    def set(self, name: str, group: str, expires: float | None = None) -> None:
        expires = time.time() + DEFAULT_TTL if expires is None else expires
        if self.groups.get(name) == (group, expires):
            return
        self.groups.put(name, (group, expires))
        self.resource_pins.emit(Pin(KIND_OWNER, name, group, "", expires))

    def group_of(self, name: str, now: float) -> str | None:
        entry = self.groups.get(name)
        if entry is None:
            return None
        if entry[1] <= now:
            del self.groups[name]
            return None
        return entry[0]

    def forget(self, name: str, now: float | None = None) -> None:
        entry = self.groups.pop(name, None)
        if entry is not None:
            now = time.time() if now is None else now
            self.resource_pins.emit(Pin(KIND_OWNER, name, entry[0], "", now))

    def names_of(self, group: str, prefix: str, now: float) -> list[str]:
        """The names `group` owns that start with `prefix` ("files/"), oldest first."""
        return [
            name
            for name, (g, expires) in self.groups.items()
            if g == group and expires > now and name.startswith(prefix)
        ]

    # --- upload sessions

    def upload_started(self, upload_id: str, group: str, expires: float) -> None:
        self.set(UPLOAD + upload_digest(upload_id), group, expires)

    def upload_group(self, upload_id: str, now: float) -> str | None:
        return self.group_of(UPLOAD + upload_digest(upload_id), now)

    # --- persistence and sharing (pins.PinKind)

    def restore_pin(self, pin: Pin, now: float) -> bool:
        if pin.expires <= now:
            self.groups.pop(pin.name, None)
            return False
        self.groups.put(pin.name, (pin.owner, pin.expires))
        return True

    def pins(self, now: float) -> list[Pin]:
        return [
            Pin(KIND_OWNER, name, group, "", expires)
            for name, (group, expires) in self.groups.items()
            if expires > now
        ]

    def prune(self, now: float) -> None:
        for name in [n for n, (_, expires) in self.groups.items() if expires <= now]:
            del self.groups[name]
