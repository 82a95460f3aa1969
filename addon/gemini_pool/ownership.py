"""The pipeline's steps for project-bound resources: who may name one, which project serves it,
and what an answer created, listed, changed or deleted.

Step 3 (before any upstream call): with clients configured, every resource a request names (path
or body, `resources.named`) must be owned by the caller's group, else the proxy answers 404
NOT_FOUND in Google's shape and nothing goes upstream; the request then goes to the project that
holds the resource (`pins`). Without clients (loopback mode) there is one owner: no checks.
Step 7 (after a 2xx answer): a creation's own names are pinned to the project that answered and
owned by the caller's group; a list's or a get's own names are pinned to the project; a deletion
forgets both. Pure: no mitmproxy.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import resources
from .gate import Admit
from .owners import KIND_OWNER, UPLOAD
from .pins import KIND_RESOURCE, UPLOAD_TTL, upload_digest
from .routing import Route

if TYPE_CHECKING:
    from .service import ProxyService

NOT_FOUND = "Requested entity was not found."
SHARED_WAIT = 1.0  # seconds a worker waits on Redis to write, or read, what a creation made


class Ownership:
    def __init__(self, service: ProxyService) -> None:
        self.service = service

    def group(self, admit: Admit, now: float) -> str | None:
        """The caller's group; None in loopback mode (no clients configured: one owner)."""
        service = self.service
        if not service.config.clients:
            return None
        if admit.client == "upload" and admit.upload_id is not None:
            return service.owners.upload_group(admit.upload_id, now) or ""
        return service.groups.get(admit.client, "")  # "" owns nothing

    def foreign(self, r: Route, body: bytes, group: str | None, now: float) -> str | None:
        """The first resource the request names that `group` does not own, if any."""
        if group is None:
            return None
        if r.path.startswith("/upload/"):
            body = b""  # a file's own bytes (or its metadata): content, never a reference
        owners = self.service.owners
        for name in resources.named(r.path, body):
            if owners.group_of(name, now) != group:
                return name
        return None

    async def catch_up(self, name: str) -> bool:
        """A resource this worker does not know may have been created through another worker a
        moment ago: read its owner and project from Redis (once, bounded). True if learnt."""
        shared = self.service.shared
        if shared is None or not shared.up:
            return False
        return await shared.learn_pins([(KIND_OWNER, name), (KIND_RESOURCE, name)], SHARED_WAIT) > 0

    async def shared_written(self) -> None:
        """After a creation: wait (bounded) until Redis holds it, so the caller's next request,
        through whichever worker, finds it."""
        shared = self.service.shared
        if shared is not None and shared.up:
            await shared.written(SHARED_WAIT)

    def project(self, admit: Admit, r: Route, body: bytes, now: float) -> str | None:
        """The project a request must go to: an upload session's own key's, or the one holding
        a resource it names (path or body); None: any."""
        service = self.service
        if admit.upload_key is not None:
            spec = service.config.key(admit.upload_key)
            return spec.project if spec else None
        return service.pins.project_for(r.path, body, now)

    def upload_started(self, upload_id: str, group: str | None, now: float) -> None:
        if group is not None:
            self.service.owners.upload_started(upload_id, group, now + UPLOAD_TTL)

    def upload_ended(self, upload_id: str, now: float) -> None:
        """A finalized (or failed) upload: its upload_id lets nothing through any more."""
        self.service.pins.forget_upload(upload_id, now)
        self.service.owners.forget(UPLOAD + upload_digest(upload_id), now)

    def answered(
        self, method: str, r: Route, plain: bytes, project: str, group: str | None, now: float
    ) -> bool:
        """A 2xx answer from `project` (decoded): remember what it created, listed or changed,
        forget what it deleted. True if it created or deleted something."""
        pins, owners = self.service.pins, self.service.owners
        named = resources.path_name(r.path)
        if method == "DELETE":
            if named is not None:
                pins.forget(named, now)
                owners.forget(named, now)
            return named is not None
        kind = resources.list_kind(method, r.path)
        if kind is not None:
            pins.remember(resources.listed(plain, kind), project, now)
            return False
        own = resources.created(plain)
        if method == "POST" and not r.repeatable:  # a creation: the caller's group owns it
            pins.remember(own, project, now)
            if group is not None:
                for name, expires in own.items():
                    owners.set(name, group, expires)
            return bool(own)
        if named is None:
            return False
        # a get or an update of one resource: it lives in `project`, maybe with a new expiry
        expires = own.get(named)
        pins.remember({named: expires}, project, now)
        current = owners.group_of(named, now)
        if current is not None and expires is not None:
            owners.set(named, current, expires)
        return False

    def hand_over(
        self, name: str, group: str, project: str | None, now: float | None = None
    ) -> str:
        """An operator gives a resource the proxy never saw created to a group (and, if known,
        its project). Returns the resource's canonical name."""
        canonical = resources.root(name.strip().strip("/"))
        if canonical is None or canonical != name.strip().strip("/"):
            raise ValueError(f"{name!r} is not a resource name (files/ID, cachedContents/ID, ...)")
        now = time.time() if now is None else now
        if project:
            self.service.pins.remember({canonical: None}, project, now)
        self.service.owners.set(canonical, group)
        return canonical
