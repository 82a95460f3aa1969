"""Project-bound resources: uploads, files, cached contents belong to the project that made them.

Remembers which key started an upload (the upload URL carries no key) and which project owns a
file, so follow-up calls go to a key of the same project. Bounded LRU maps; pure logic.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from urllib.parse import parse_qsl, urlsplit

MAX_ENTRIES = 100_000
UPLOAD_URL_HEADERS = frozenset({"x-goog-upload-url", "x-goog-upload-control-url", "location"})
_RESOURCE_RE = re.compile(rb"\b(files|cachedContents)/([A-Za-z0-9_-]{1,128})")


class _Lru(OrderedDict[str, str]):
    def put(self, k: str, v: str) -> None:
        self[k] = v
        self.move_to_end(k)
        while len(self) > MAX_ENTRIES:
            self.popitem(last=False)


class ResourcePins:
    def __init__(self) -> None:
        self.uploads = _Lru()  # upload_id -> key name
        self.resources = _Lru()  # "files/abc" -> project

    def remember_upload(self, upload_id: str, key: str) -> None:
        self.uploads.put(upload_id, key)

    def upload_key(self, upload_id: str) -> str | None:
        return self.uploads.get(upload_id)

    def remember_resources(self, body: bytes, project: str) -> None:
        """Note every files/ID and cachedContents/ID named in a successful answer."""
        for kind, rid in _RESOURCE_RE.findall(body[:65536]):
            self.resources.put(f"{kind.decode()}/{rid.decode()}", project)

    def project_for(self, path: str, body: bytes) -> str | None:
        """The project owning a resource the request names (in its path or its body)."""
        for kind, rid in _RESOURCE_RE.findall(path.encode() + b" " + body[:65536]):
            project = self.resources.get(f"{kind.decode()}/{rid.decode()}")
            if project is not None:
                return project
        return None


def rewrite_upload_urls(
    headers: list[tuple[str, str]], upstream_host: str, proxy_origin: str
) -> tuple[list[tuple[str, str]], list[str]]:
    """Point upload / redirect URLs at Google back at this proxy.

    Returns the new headers and the upload_ids they carried (the caller remembers which key
    started each upload: the follow-up requests carry only the upload_id).
    """
    out: list[tuple[str, str]] = []
    upload_ids: list[str] = []
    for k, v in headers:
        if k.lower() in UPLOAD_URL_HEADERS and v.startswith(("http://", "https://")):
            u = urlsplit(v)
            if u.hostname == upstream_host:
                upload_id = dict(parse_qsl(u.query)).get("upload_id")
                if upload_id:
                    upload_ids.append(upload_id)
                v = proxy_origin + u.path + (f"?{u.query}" if u.query else "")
        out.append((k, v))
    return out, upload_ids
