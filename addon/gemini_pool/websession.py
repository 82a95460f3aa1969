"""Admin sign-in: the token compare, page sessions and cross-site request checks (no aiohttp).

A session is a random id (the cookie), never the admin token nor anything derived from it; the
server keeps each id with its own random CSRF token and an expiry, in memory: a restart signs
everyone out. A state-changing POST needs the session's CSRF token in the form, and, when the
browser says where the request comes from (Origin, Sec-Fetch-Site), the page's own origin.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "gemini_proxy_session"
COOKIE_PATH = "/page/"
LIFETIME = 12 * 3600.0  # a session lasts this long after sign-in, then the form asks again
MAX_SESSIONS = 64  # past this the oldest session is dropped (a bound, not a feature)
# the fetch/script/style of the page itself, nothing else; forms post only to the page
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form POST send `Origin: null`
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass
class Session:
    sid: str
    csrf: str
    expires: float


class Sessions:
    """The signed-in browsers of one process."""

    def __init__(self, lifetime: float = LIFETIME, limit: int = MAX_SESSIONS) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, now: float) -> Session:
        self._prune(now)
        while len(self._by_id) >= self.limit:
            oldest = min(self._by_id.values(), key=lambda s: s.expires)
            del self._by_id[oldest.sid]
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.lifetime)
        self._by_id[s.sid] = s
        return s

    def get(self, sid: str | None, now: float) -> Session | None:
        if not sid or len(sid) > 100:
            return None
        # a dict lookup by a guessed id: 256 random bits leave nothing to learn from timing
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires <= now:
            del self._by_id[sid]
            return None
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)

    def clear(self) -> None:
        self._by_id.clear()

    def _prune(self, now: float) -> None:
        for sid in [sid for sid, s in self._by_id.items() if s.expires <= now]:
            del self._by_id[sid]


class SignInThrottle:
    """Wrong admin tokens per remote address: past `limit` within `window` seconds that address
    is answered 429 until the window has passed (a form invites guessing; the token still
    decides)."""

    def __init__(self, limit: int = 10, window: float = 60.0, addresses: int = 1024) -> None:
        self.limit, self.window, self.addresses = limit, window, addresses
        self._failures: dict[str, list[float]] = {}

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until `address` may try again (0: now)."""
        recent = [t for t in self._failures.get(address, []) if t > now - self.window]
        if not recent:
            self._failures.pop(address, None)
            return 0.0
        self._failures[address] = recent
        return recent[0] + self.window - now if len(recent) >= self.limit else 0.0

    def failed(self, address: str, now: float) -> None:
        if address not in self._failures and len(self._failures) >= self.addresses:
            self._failures.pop(next(iter(self._failures)))  # a bound, oldest first
        self._failures.setdefault(address, []).append(now)


def csrf_ok(session: Session, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(
        session.csrf.encode(), (given or "").encode("utf-8", "surrogateescape")
    )


def same_origin(origin: str | None, fetch_site: str | None, scheme: str, host: str) -> bool:
    """Whether a POST may come from this page: a foreign Origin or a cross-site Sec-Fetch-Site
    refuses it. Browsers send both on every POST; a client without them (curl) still needs the
    CSRF token, which only the page carries."""
    if fetch_site is not None and fetch_site.lower() not in ("same-origin", "none"):
        return False
    if origin is None:
        return True
    if origin == "null":  # sandboxed frames, data: URLs, some redirects: never the page
        return False
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}".lower() == f"{scheme}://{host}".lower()


def cookie_header(sid: str, secure: bool, max_age: int) -> str:
    """Set-Cookie value: HttpOnly (no script reads it), SameSite=Strict (no cross-site request
    carries it), only sent to the page's paths, never to /admin/ or /metrics."""
    flags = f"; Path={COOKIE_PATH}; Max-Age={max_age}; HttpOnly; SameSite=Strict"
    return f"{COOKIE}={sid}{flags}{'; Secure' if secure else ''}"


def constant_time_equal(a: str, b: str) -> bool:
    """Compare secrets in constant time; any text (odd bytes arrive surrogate-escaped) is fine."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape")
    )
