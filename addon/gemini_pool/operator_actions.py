"""What an operator does to the pool (admin API, page, commands): enable, disable, reset, weight,
hand a resource to a group, export and import key state. Each is logged and persisted;
ProxyService binds them as its methods.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .store import read_state_document, state_document

if TYPE_CHECKING:
    from .service import ProxyService

log = logging.getLogger("gemini_proxy")


def operator(
    service: ProxyService, name: str, action: str, weight: int | None = None
) -> dict[str, Any]:
    if name not in service.pool.keys:
        raise KeyError(name)
    if action == "enable":
        service.pool.set_enabled(name, True)
    elif action == "disable":
        service.pool.set_enabled(name, False)
    elif action == "reset":
        service.pool.reset(name)
    elif action == "weight":
        service.pool.set_weight(name, weight)
    else:
        raise ValueError(action)
    log.info("gemini-proxy: operator %s key %s%s", action, name, f" = {weight}" if weight else "")
    service.save_state()
    return service.pool.describe(service.pool.keys[name], time.time())


def hand_over(
    service: ProxyService,
    name: str,
    client: str | None = None,
    group: str | None = None,
    project: str = "",
) -> dict[str, str]:
    """An operator gives a resource the proxy never saw created (or another group's) to a
    client's group: from then on that group sees and uses it. Raises ValueError."""
    groups = set(service.groups.values())
    if (client is None) == (group is None):
        raise ValueError("name exactly one of client or group")
    if client is not None:
        if client not in service.groups:
            raise ValueError(f"no client named {client!r}")
        group = service.groups[client]
    assert group is not None
    if group not in groups:
        raise ValueError(f"no client has the group {group!r}")
    if project and project not in {k.project for k in service.config.keys}:
        raise ValueError(f"no key of project {project!r} is configured")
    canonical = service.ownership.hand_over(name, group, project or None)
    log.info("gemini-proxy: operator handed %s to group %s", canonical, group)
    service.state_dirty = True
    return {"name": canonical, "group": group, "project": project}


def export_state(service: ProxyService) -> dict[str, Any]:
    keys = {n: service.pool.snapshot_key(s) for n, s in service.pool.keys.items()}
    return state_document(keys, service.pool.snapshot_cooldowns())


def import_state(service: ProxyService, doc: Any) -> int:
    keys, cooldowns = read_state_document(doc)
    matched = [
        n
        for n, s in keys.items()
        if n in service.pool.keys
        and isinstance(s, dict)
        and s.get("fingerprint") == service.pool.keys[n].spec.fingerprint
    ]
    service.pool.restore({n: keys[n] for n in matched}, cooldowns, time.time())
    service.save_state()
    return len(matched)
