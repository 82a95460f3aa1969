"""The gate: who the caller is, and whether a flow may go upstream at all. One pure decision.

Every byte a caller sends is hostile until proven otherwise. Anything unexpected on the way to
deciding who the caller is (odd bytes, a parser that raises) ends in a refusal, never in a
forwarded flow: as in mitmproxy's own proxyauth addon, whatever raises leaves the credential
invalid. The hooks only ask `Gate.decide` and carry out its answer.

Pure logic: raw header fields and strings in, an `Admit` or a `Refuse` out; no mitmproxy.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .routing import Api, api_for_path, query_credentials, query_param

MAX_TOKEN = 4096
UPLOAD_NOT_FOUND = (
    "upload session not found: it ended, expired, or its URL is not one this proxy handed out"
)
# request headers that carry a credential Google would accept, name who is billed or counted
# (X-Goog-User-Project, X-Goog-Quota-User), or that Google checks against a key's restrictions
# (so a caller could make a key look dead): never forwarded
CREDENTIAL_FIELDS = frozenset({b"x-goog-api-key", b"authorization"})
STRIPPED_FIELDS = CREDENTIAL_FIELDS | {
    b"proxy-authorization",
    b"x-api-key",  # where other SDKs send a key (Anthropic's, Azure's): never read, never kept
    b"api-key",
    b"cookie",
    b"referer",
    b"origin",
    b"x-android-package",
    b"x-android-cert",
    b"x-ios-bundle-identifier",
    b"x-goog-user-project",
    b"x-goog-quota-user",
    b"x-forwarded-for",
}
# the methods Gemini's API has (the SDKs use no other); PUT only for an upload session's bytes
# (the resumable protocol's follow-ups). Anything else (HEAD, TRACE, OPTIONS, a made-up token)
# gets 405 from the proxy: an upstream or middlebox that answers HEAD with a body would poison
# the pooled connection.
API_METHODS = ("GET", "POST", "PATCH", "DELETE")
UPLOAD_METHODS = (*API_METHODS, "PUT")


def allowed_methods(path: str) -> tuple[str, ...]:
    return UPLOAD_METHODS if path.startswith("/upload/") else API_METHODS


# a header name as HTTP defines it (RFC 9110 token); anything else is refused, not guessed at
_TOKEN_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# what a browser sends with a request another site made it send
_SAME_SITE = frozenset({"same-origin", "same-site", "none"})  # same-site: another localhost port

# (upload_id, method, path, now) -> the key that started that upload session, if it may go on
UploadLookup = Callable[[str, str, str, float], str | None]


@dataclass(frozen=True)
class Target:
    """Where flows go: scheme, host and port of the configured upstream."""

    scheme: str
    host: str
    port: int

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Arrival:
    """What the gate looks at: the request head as the caller sent it."""

    method: str
    path: str  # without the query
    query: str
    fields: tuple[tuple[bytes, bytes], ...]  # raw header fields, as received
    peer: str  # the caller's IP address
    listener: Target | None  # the reverse-mode target of the listener; None: caller picks
    destination: Target  # where the flow is addressed
    authority: str = ""  # HTTP/2 :authority or an absolute-form target's authority


@dataclass(frozen=True)
class Admit:
    client: str
    api: Api
    bearer_only: bool  # authenticated the OpenAI way (decides what /v1/models means)
    query: str  # the query string without credentials
    upstream: Target
    upload_id: str | None = None
    upload_key: str | None = None  # the key that started this upload session
    body_expected: bool = False  # a body follows the head


@dataclass(frozen=True)
class Refuse:
    status: int
    message: str
    reason: str
    api: Api
    body_expected: bool = False
    error: str | None = None  # what raised, for the log (never shown to the caller)
    allow: str | None = None  # the Allow header of a 405
    retry_after: float | None = None  # seconds, for a refusal that passes (e.g. memory budget)


def content_length(fields: tuple[tuple[bytes, bytes], ...]) -> int:
    """The body size a request head announces (0: none, or chunked); the gate has checked it."""
    for name, value in fields:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value.strip())
    return 0


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def clean_token(raw: str | bytes) -> str | None:
    """A credential as sent, or None if it cannot be one: tokens are printable ASCII."""
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    text = text.strip(" \t")
    if not 0 < len(text) <= MAX_TOKEN or not all("!" <= c <= "~" for c in text):
        return None
    return text


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as a peer gives it (`fe80::1%eth0`, `::ffff:127.0.0.1`), IPv4-mapped unwrapped."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=1024)  # a handful of peers and Hosts; bounded whatever callers send
def is_loopback_ip(peer: str) -> bool:
    ip = parse_ip(peer)
    return ip is not None and ip.is_loopback


def host_of(authority: str) -> str:
    """The host part of `host[:port]` / `[v6]:port`, lower case, without a trailing dot."""
    a = authority.strip()
    if a.startswith("["):
        host = a[1 : a.find("]")] if "]" in a else a
    else:
        name, sep, port = a.rpartition(":")
        host = name if sep and port.isdigit() else a
    return host.lower().rstrip(".")


@functools.lru_cache(maxsize=1024)
def is_loopback_host(authority: str) -> bool:
    host = host_of(authority)
    return host == "localhost" or is_loopback_ip(host)


def is_loopback_origin(origin: str) -> bool:
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or "/" in rest:
        return False
    return is_loopback_host(rest)


_VERSIONLESS = ("/models", "/tunedModels", "/files", "/cachedContents", "/batches", "/operations")


def unknown_path_message(path: str) -> str:
    shown = repr(path[:200])
    if path.startswith(_VERSIONLESS):
        return (
            f"unknown path {shown}: Gemini's paths start with an API version; add /v1beta to "
            "the base URL (e.g. api_base=http://HOST:PORT/v1beta, or /v1)"
        )
    if path.startswith(("/chat/completions", "/embeddings", "/completions")):
        return (
            f"unknown path {shown}: OpenAI-style paths live under /v1/ or /v1beta/openai/; use "
            "base_url=http://HOST:PORT/v1"
        )
    return (
        f"unknown path {shown}: the proxy serves Gemini's /v1/, /v1beta/ and /v1beta/openai/ "
        "APIs (with an OpenAI-style client, use base_url=http://HOST:PORT/v1)"
    )


class Gate:
    def __init__(
        self,
        clients: Mapping[bytes, str] | None = None,
        max_body: int = 128 * 1024 * 1024,
        upload_lookup: UploadLookup | None = None,
    ) -> None:
        self.clients: Mapping[bytes, str] = clients or {}
        self.max_body = max_body
        self.upload_lookup: UploadLookup = upload_lookup or (lambda *_: None)

    def decide(self, a: Arrival, now: float) -> Admit | Refuse:
        api = Api.OPENAI if "/openai/" in a.path or a.path.startswith("/v1/chat/") else Api.NATIVE
        try:
            return self._decide(a, now, api)
        except Exception as e:  # fail closed: whatever raises leaves the caller unauthenticated
            return Refuse(
                401,
                "the request's credentials could not be read",
                "invalid_token",
                api,
                error=f"{type(e).__name__}: {e}",
            )

    def _decide(self, a: Arrival, now: float, api: Api) -> Admit | Refuse:
        # 0. path parameters (`;key=...`): not part of Gemini's API, and a credential could ride
        # in them past every check of the query
        if ";" in a.path or "%3b" in a.path.lower():
            return Refuse(400, "path parameters (;) are not part of Gemini's API", "bad_path", api)
        # 1. a key only ever goes to the configured upstream
        if a.listener is None:
            return Refuse(
                403,
                "this listener lets callers choose the destination host; gemini-proxy serves "
                "only flows of a reverse-mode listener (--mode reverse:https://"
                "generativelanguage.googleapis.com)",
                "destination_not_allowed",
                api,
            )
        if a.destination != a.listener:
            return Refuse(
                403,
                "requests may only go to the configured upstream",
                "destination_not_allowed",
                api,
            )

        # 2. one pass over the raw header fields
        api_keys: list[bytes] = []
        auths: list[bytes] = []
        hosts: list[str] = [a.authority] if a.authority else []
        origins: list[str] = []
        fetch_sites: list[str] = []
        lengths: set[bytes] = set()
        chunked = False
        for raw_name, raw_value in a.fields:
            if not _TOKEN_NAME.fullmatch(raw_name):
                return Refuse(400, "invalid header name", "bad_request", api, True)
            if b"\r" in raw_value or b"\n" in raw_value or b"\0" in raw_value:
                # a folded (obs-fold) or smuggled line: never passed on, never guessed at
                return Refuse(400, "invalid header value", "bad_request", api, True)
            lname = raw_name.lower()
            if lname == b"x-goog-api-key":
                api_keys.append(raw_value)
            elif lname == b"authorization":
                auths.append(raw_value)
            elif lname == b"host":
                hosts.append(raw_value.decode("latin-1"))
            elif lname == b"origin":
                origins.append(raw_value.decode("latin-1"))
            elif lname == b"sec-fetch-site":
                fetch_sites.append(raw_value.decode("latin-1").strip().lower())
            elif lname == b"content-length":
                lengths.add(raw_value.strip())
            elif lname == b"transfer-encoding":
                chunked = True

        # 3. credentials, in every slot a client may use
        qc = query_credentials(a.query)
        tokens: set[str] = set()
        malformed = qc.malformed
        for field in api_keys:
            t = clean_token(field)
            malformed |= t is None
            if t is not None:
                tokens.add(t)
        bearer = False
        for field in auths:
            scheme, _, rest = field.strip().partition(b" ")
            t = clean_token(rest) if scheme.lower() == b"bearer" else None
            malformed |= t is None
            if t is not None:
                tokens.add(t)
                bearer = True
        for value in qc.keys:
            t = clean_token(value)
            malformed |= t is None
            if t is not None:
                tokens.add(t)
        bearer_only = bearer and not api_keys and not qc.keys
        found = api_for_path(a.path, bearer_only)
        if found is not None:
            api = found[0]

        # 4. the body: refused at the head when it is too large
        body_expected = chunked or any(v != b"0" for v in lengths)
        if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
            return Refuse(400, "invalid Content-Length", "bad_request", api, body_expected)
        if lengths and int(next(iter(lengths))) > self.max_body:
            size = int(next(iter(lengths)))
            return Refuse(
                413,
                f"request body is {size} bytes; this proxy accepts at most {self.max_body} "
                "(gemini_max_body)",
                "request_too_large",
                api,
                body_expected,
            )

        # 5. who the caller is
        upload_id = query_param(a.query, "upload_id")
        upload_key = None
        if upload_id is not None:
            upload_key = self.upload_lookup(upload_id, a.method, a.path, now)
        if not self.clients:
            refusal = self._loopback_only(a, hosts, origins, fetch_sites, api, body_expected)
            if refusal is not None:
                return refusal
            client = "local"
        elif upload_key is not None and not tokens and not malformed:
            client = "upload"  # the upload_id we handed out is this session's credential
        elif upload_id is not None and a.path.startswith("/upload/") and not (tokens or malformed):
            # an upload URL that no longer opens anything (finalized, expired, made up): say so,
            # as the pipeline does for a caller with a token
            return Refuse(404, UPLOAD_NOT_FOUND, "upload_not_found", api, body_expected)
        else:
            if malformed:
                return Refuse(
                    401, "client token not recognised", "invalid_token", api, body_expected
                )
            if not tokens:
                return Refuse(
                    401,
                    "missing client token: send it where your SDK sends its API key "
                    "(x-goog-api-key, ?key= or Authorization: Bearer)",
                    "missing_token",
                    api,
                    body_expected,
                )
            if len(tokens) > 1:
                return Refuse(
                    401,
                    "more than one client token in one request: send exactly one",
                    "conflicting_tokens",
                    api,
                    body_expected,
                )
            name = self.clients.get(digest(next(iter(tokens))))
            if name is None:
                return Refuse(
                    401, "client token not recognised", "invalid_token", api, body_expected
                )
            client = name

        # 6. a path the proxy serves
        if found is None:
            return Refuse(404, unknown_path_message(a.path), "unknown_path", api, body_expected)

        # 7. a method the API has
        allowed = allowed_methods(a.path)
        if a.method not in allowed:
            return Refuse(
                405,
                f"method {a.method[:20]!r} is not allowed here; allowed: {', '.join(allowed)}",
                "method_not_allowed",
                api,
                body_expected,
                allow=", ".join(allowed),
            )
        return Admit(
            client,
            api,
            bearer_only,
            qc.query,
            a.listener,
            upload_id,
            upload_key,
            body_expected,
        )

    @staticmethod
    def _loopback_only(
        a: Arrival,
        hosts: list[str],
        origins: list[str],
        fetch_sites: list[str],
        api: Api,
        body_expected: bool,
    ) -> Refuse | None:
        """With no client tokens the proxy serves this machine only, and no web page on it."""
        if not is_loopback_ip(a.peer):
            return Refuse(
                403,
                "this gemini-proxy serves loopback callers only: add a client token under "
                "'clients:' in the key file to let other hosts in",
                "no_clients_configured",
                api,
                body_expected,
            )
        upstream = a.listener.host.lower() if a.listener else ""
        # the upstream's own name: what a flow replayed from mitmweb carries (no page can make
        # a browser send it to this machine)
        if not all(is_loopback_host(h) or host_of(h) == upstream for h in hosts):
            return Refuse(
                403,
                "Host is not a loopback address (DNS rebinding?): without client tokens this "
                "proxy answers only requests addressed to 127.0.0.1, [::1] or localhost",
                "foreign_host",
                api,
                body_expected,
            )
        if not all(is_loopback_origin(o) for o in origins) or not all(
            s in _SAME_SITE for s in fetch_sites
        ):
            return Refuse(
                403,
                "cross-site request refused: without client tokens a web page may not use "
                "this proxy",
                "cross_site_request",
                api,
                body_expected,
            )
        return None
