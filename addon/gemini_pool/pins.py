"""Project-bound resources: uploads, files, cached contents belong to the project that made them.

Remembers which key started an upload (the upload URL carries no key) and which project owns a
file, cached content, batch or operation, so follow-up calls go to a key of the same project.
Bounded LRU maps with an expiry per entry; pure logic (no mitmproxy, no SQLite).

Persistence: every pin added or changed is handed to `ResourcePins.on_pin` (the service points it
at `Store.save_pin`), and `ResourcePins.restore` takes the rows of `Store.load_pins` at start.
An upload session is kept under a digest of the proxy's own upload token, with Google's upload_id
sealed under that token (`upload_tokens`): Google's id is a credential for the upload at Google,
and neither it nor the token is ever kept in the clear.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

MAX_ENTRIES = 100_000  # per map (uploads, resources)
HOUR = 3600.0
UPLOAD_TTL = 24 * HOUR  # a resumable upload session
RESOURCE_TTL = {  # how long Google keeps each kind unless the answer says otherwise
    "files/": 48 * HOUR,
    "cachedContents/": 48 * HOUR,  # the answer's expireTime wins when present
    "batches/": 48 * HOUR,
    "operations/": 48 * HOUR,
}
KIND_UPLOAD = "upload"  # Pin.name = digest of the upload token, owner = key name
KIND_RESOURCE = "resource"  # Pin.name = "files/abc", owner = project
UPLOAD_METHODS = frozenset({"POST", "PUT"})  # what the resumable protocol's follow-ups use

MAX_MATCHES = 64  # request bodies: at most this many candidate keys are examined
MAX_VALUE = 2048  # bytes of a JSON string value read after such a key
MAX_ANSWER_SCAN = 4 * 1024 * 1024  # larger answers are not scanned for names
MAX_ANSWER_NAMES = 4096  # names taken from one answer (a listing page has at most ~1000)

_PREFIXES = tuple(p.encode() for p in RESOURCE_TTL)
_ID = re.compile(rb"[A-Za-z0-9_-]{1,128}")
# the JSON keys a request body names a resource under, and the name their value must end in
_FILE_VALUE = re.compile(rb"(?:^|/)(files/[A-Za-z0-9_-]{1,128})/?\Z")
_CACHE_VALUE = re.compile(rb"(?:^|/)(cachedContents/[A-Za-z0-9_-]{1,128})/?\Z")
# the JSON keys a request body names a resource under: one pattern, so a body is scanned once
# (in any letter case: a parser that folds case must not read a name the scan missed)
_BODY_KEY = re.compile(
    rb'"(fileUri|file_uri|fileName|file_name|cachedContent|cached_content)"', re.IGNORECASE
)
_VALUE_OF = {
    b"fileUri": _FILE_VALUE,
    b"file_uri": _FILE_VALUE,
    b"fileName": _FILE_VALUE,  # a batch's input file (inputConfig.fileName)
    b"file_name": _FILE_VALUE,
    b"cachedContent": _CACHE_VALUE,
    b"cached_content": _CACHE_VALUE,
}
_VALUE_OF_FOLDED = {k.lower(): v for k, v in _VALUE_OF.items()}


def value_pattern(key: bytes) -> re.Pattern[bytes]:
    """The name a body key's value must end in, for the key in any letter case."""
    return _VALUE_OF_FOLDED[key.lower()]


# after the key: a colon and the opening quote of a string value, then the string (bounded)
_STRING_VALUE = re.compile(
    rb'[ \t\r\n]{0,64}:[ \t\r\n]{0,64}"((?:[^"\\]|\\.){0,%d})"' % MAX_VALUE, re.DOTALL
)
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(\.\d{1,12})?(?:([Zz])|([+-])(\d\d):(\d\d))\Z"
)


@dataclass(frozen=True, slots=True)
class Pin:
    """One persisted pin: a row of the store's `pins` table. Never holds a secret."""

    kind: str  # KIND_UPLOAD | KIND_RESOURCE
    name: str  # upload: digest of the upload token; resource: "files/abc", "cachedContents/x", ...
    owner: str  # upload: the key name that started it; resource: the owning project
    path: str  # upload: the path its follow-ups must use ("/upload/v1beta/files"); else ""
    expires: float  # epoch seconds
    sealed: str = ""  # upload: Google's upload_id sealed under the token (upload_tokens); else ""


@dataclass(frozen=True, slots=True)
class UploadPin:
    key: str  # the key name that started the upload
    path: str  # the upload URL's path
    expires: float
    sealed: str = ""  # Google's upload_id, sealed under the session's token


def upload_digest(upload_id: str) -> str:
    """What an upload session is kept (and persisted) under instead of its upload token."""
    return hashlib.sha256(b"gemini-proxy upload\0" + upload_id.encode()).hexdigest()


def parse_rfc3339(value: str) -> float | None:
    """Epoch seconds of an RFC 3339 time ("2026-01-02T03:04:05.123456789Z"), else None."""
    m = _RFC3339.match(value.strip())
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31 and int(h) <= 23 and int(mi) <= 59):
        return None
    try:
        t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s), 0, 0, 0))
    except (ValueError, OverflowError):  # year 0, and the like
        return None
    offset = 0 if z else (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    return t - offset + (float(frac) if frac else 0.0)


def resource_names(data: bytes, limit: int = MAX_ANSWER_NAMES) -> Iterator[str]:
    """Every files/ID, cachedContents/ID, batches/ID and operations/ID that `data` names.

    Tolerant: finds them anywhere (a path, an answer), at most `limit` of them. Scans with
    bytes.find; a name needs a word boundary before its kind ("myfiles/x" is not "files/x").
    """
    found_count = 0
    for prefix in _PREFIXES:
        i = data.find(prefix)
        while i >= 0 and found_count < limit:
            start = i + len(prefix)
            before = data[i - 1 : i]
            found = _ID.match(data, start)
            if found and not (before.isalnum() or before == b"_"):
                found_count += 1
                yield prefix.decode() + found.group().decode()
            i = data.find(prefix, start)


def body_resource_names(body: bytes, limit: int = MAX_MATCHES) -> Iterator[str]:
    """The files/ID and cachedContents/ID a JSON request body names where Gemini reads them.

    Only the string values of `fileUri` / `file_uri` (ending in files/ID, often a full URL) and
    `cachedContent` / `cached_content` (cachedContents/ID). Found with one regular expression, never
    a JSON parse: linear in the body, at most `limit` keys examined, at most MAX_VALUE bytes read per
    value, the body scanned once. Never raises on hostile input (unterminated strings, escapes,
    non-UTF-8).
    """
    budget, pos = limit, 0
    while budget > 0:
        key = _BODY_KEY.search(body, pos)
        if key is None:
            return
        budget -= 1
        pos = key.end()
        m = _STRING_VALUE.match(body, pos)
        if m is not None:
            name = _name_in_value(m.group(1), value_pattern(key.group(1)))
            if name is not None:
                yield name
            pos = m.end()


def _name_in_value(raw: bytes, value_re: re.Pattern[bytes]) -> str | None:
    if b"\\" in raw:  # an escaped value ("https:\/\/..."): decode it, strictly
        try:
            text = json.loads(b'"' + raw + b'"')
        except ValueError:
            return None
        try:
            raw = text.encode()
        except UnicodeEncodeError:  # a lone surrogate
            return None
    m = value_re.search(raw)
    return m.group(1).decode() if m else None


def _ttl(name: str) -> float:
    for prefix, ttl in RESOURCE_TTL.items():
        if name.startswith(prefix):
            return ttl
    return 48 * HOUR


class PinKind(Protocol):
    """Pins of another kind, persisted and shared with these (resource owners: owners.py)."""

    def restore_pin(self, pin: Pin, now: float) -> bool: ...

    def pins(self, now: float) -> list[Pin]: ...

    def prune(self, now: float) -> None: ...


class Lru[V](OrderedDict[str, V]):
    def put(self, k: str, v: V) -> None:
        self[k] = v
        self.move_to_end(k)
        while len(self) > MAX_ENTRIES:
            self.popitem(last=False)


class ResourcePins:
    def __init__(self, on_pin: Callable[[Pin], None] | None = None) -> None:
        self.uploads: Lru[UploadPin] = Lru()  # upload_digest(upload_id) -> session
        self.resources: Lru[tuple[str, float]] = Lru()  # "files/abc" -> (project, expires)
        self.on_pin = on_pin  # told of every pin added or changed (the store saves it)
        self.kinds: dict[str, PinKind] = {}  # pins kept elsewhere (owners.py), by kind

    def emit(self, pin: Pin) -> None:
        self._emit(pin)

    def _emit(self, pin: Pin) -> None:
        if self.on_pin is not None:
            self.on_pin(pin)

    # --- persistence

    def restore(self, rows: Iterable[Pin], now: float) -> int:
        """Take pins loaded from the store or told by another worker. An expired pin ends the
        entry it names (a deletion or a finished upload elsewhere). Does not call on_pin.
        Returns how many were taken."""
        n = 0
        for p in rows:
            other = self.kinds.get(p.kind)
            if other is not None:
                n += other.restore_pin(p, now)
                continue
            if p.expires <= now:
                ended: Lru[Any] = self.uploads if p.kind == KIND_UPLOAD else self.resources
                ended.pop(p.name, None)
                continue
            if p.kind == KIND_UPLOAD:
                self.uploads.put(p.name, UploadPin(p.owner, p.path, p.expires, p.sealed))
            elif p.kind == KIND_RESOURCE:
                self.resources.put(p.name, (p.owner, p.expires))
            else:
                continue
            n += 1
        return n

    def all_pins(self, now: float) -> list[Pin]:
        """Every pin still valid, as rows (for another worker or a fresh Redis)."""
        out = [
            Pin(KIND_UPLOAD, name, u.key, u.path, u.expires, u.sealed)
            for name, u in self.uploads.items()
            if u.expires > now
        ]
        out += [
            Pin(KIND_RESOURCE, name, owner, "", expires)
            for name, (owner, expires) in self.resources.items()
            if expires > now
        ]
        for other in self.kinds.values():
            out += other.pins(now)
        return out

    def prune(self, now: float) -> None:
        """Drop expired entries (lookups ignore them anyway; this frees the memory)."""
        for k in [k for k, u in self.uploads.items() if u.expires <= now]:
            del self.uploads[k]
        for k in [k for k, (_, exp) in self.resources.items() if exp <= now]:
            del self.resources[k]
        for other in self.kinds.values():
            other.prune(now)

    # --- upload sessions

    def remember_upload(
        self,
        upload_id: str,
        key: str,
        path: str = "",
        now: float | None = None,
        sealed: str = "",
    ) -> None:
        """An upload session `key` started, known to the caller as `upload_id` (the proxy's
        token); its follow-ups must use `path` (the upload URL's path, e.g.
        "/upload/v1beta/files"). Without a path, upload_session never matches it. `sealed`:
        Google's own upload_id, sealed under the token."""
        now = time.time() if now is None else now
        digest = upload_digest(upload_id)
        pin = UploadPin(key, path, now + UPLOAD_TTL, sealed)
        self.uploads.put(digest, pin)
        self._emit(Pin(KIND_UPLOAD, digest, key, path, pin.expires, sealed))

    def forget_upload(self, upload_id: str, now: float | None = None) -> None:
        """The session is over (finalized or cancelled): its token lets nothing through (the
        ended pin keeps no sealed id)."""
        now = time.time() if now is None else now
        pin = self.uploads.pop(upload_digest(upload_id), None)
        if pin is not None:
            self._emit(Pin(KIND_UPLOAD, upload_digest(upload_id), pin.key, pin.path, now))

    def upload_session(
        self, upload_id: str, method: str, path: str, now: float
    ) -> UploadPin | None:
        """The session a resumable-upload follow-up continues, or None.

        Only if the session is known and not expired, the method is one the protocol's
        follow-ups use (POST, PUT) and `path` (no query) is the session's own upload path.
        """
        if method.upper() not in UPLOAD_METHODS or not upload_id:
            return None
        digest = upload_digest(upload_id)
        pin = self.uploads.get(digest)
        if pin is None:
            return None
        if pin.expires <= now:
            del self.uploads[digest]
            return None
        if not pin.path or pin.path != path:
            return None
        return pin

    # --- files, cached contents, batches, operations

    def remember(
        self, names: Mapping[str, float | None], project: str, now: float | None = None
    ) -> None:
        """Note resources as `project`'s: name -> its own expiry if the answer said one.

        The names come from `resources.py` (an answer's own names, never any string in it).
        Without an expiry a new pin gets the kind's TTL and a known one keeps its expiry
        (seeing a file again does not extend its life at Google).
        """
        now = time.time() if now is None else now
        for name, explicit in names.items():
            old = self.resources.get(name)
            expires = explicit
            if expires is None:
                if old is not None and old[0] == project and old[1] > now:
                    self.resources.move_to_end(name)
                    continue
                expires = now + _ttl(name)
            elif old is not None and old == (project, expires):
                self.resources.move_to_end(name)
                continue
            self.resources.put(name, (project, expires))
            self._emit(Pin(KIND_RESOURCE, name, project, "", expires))

    def forget(self, name: str, now: float | None = None) -> None:
        """The resource was deleted: its pin ends here and, through the store and Redis, everywhere."""
        entry = self.resources.pop(name, None)
        if entry is not None:
            self._emit(Pin(KIND_RESOURCE, name, entry[0], "", time.time() if now is None else now))

    def project_of(self, name: str, now: float) -> str | None:
        """The project owning one resource name, if pinned and not expired."""
        entry = self.resources.get(name)
        if entry is None:
            return None
        if entry[1] <= now:
            del self.resources[name]
            return None
        return entry[0]

    def project_for(self, path: str, body: bytes, now: float | None = None) -> str | None:
        """The project owning a resource the request names: in its path (no query), or in a
        JSON body as fileUri / file_uri / cachedContent / cached_content."""
        if not self.resources:  # nothing pinned: no need to read the body
            return None
        now = time.time() if now is None else now
        for name in resource_names(path.encode(errors="replace"), limit=MAX_MATCHES):
            project = self.project_of(name, now)
            if project is not None:
                return project
        for name in body_resource_names(body):
            project = self.project_of(name, now)
            if project is not None:
                return project
        return None
