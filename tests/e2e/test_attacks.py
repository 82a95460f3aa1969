"""Attacks: hostile callers against a real mitmdump running the addon, each with what must hold.

Every case checks the right 4xx, that nothing reached the fake Google where nothing was due,
that no pool key or client token shows up anywhere (answers, log, flow dump, database: the
`make_proxy` fixture checks after each test), and that the proxy still serves afterwards with
nothing left counted as in flight.

Tables run every row and fail at the end with all the rows that broke (`Table`), so one bug
does not hide the next. Odd bytes go over raw sockets: httpx refuses to send them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import (
    ALL_SECRETS,
    Fake,
    Proxy,
    free_port,
    gen_body,
    key_entry,
    new_secret,
    wait_for,
)
from .test_hardening import rss_kib
from .test_proxy import FLASH

GEN = f"/v1beta/models/{FLASH}:generateContent".encode()
BODY = json.dumps(gen_body()).encode()
CHAT = json.dumps({"model": FLASH, "messages": [{"role": "user", "content": "hi"}]}).encode()
MIB = 1 << 20


# ---------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    status: int  # 0: no answer at all
    headers: dict[str, str]  # lower-case names
    body: bytes
    raw: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.raw[:400]!r})"


def parse_answer(buf: bytes, eof: bool = False) -> Answer | None:
    """The first final answer in `buf` once it is whole (1xx answers skipped); at `eof`,
    whatever there is."""
    rest = buf
    while True:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            return Answer(0, {}, b"", buf) if eof else None
        lines = rest[:end].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ")[1])
        except (IndexError, ValueError):
            return Answer(0, {}, b"", buf) if eof else None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = rest[end + 4 :]
        if 100 <= status < 200:
            continue
        length = headers.get("content-length")
        if length is not None and length.isdigit() and len(rest) >= int(length):
            return Answer(status, headers, rest[: int(length)], buf)
        return Answer(status, headers, rest, buf) if eof else None


def exchange(port: int, data: bytes, timeout: float = 5.0) -> Answer:
    """Send raw bytes, read one answer (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the proxy may answer and close before reading all
            s.sendall(data)
        while (answer := parse_answer(buf)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
    return answer or parse_answer(buf, eof=True) or Answer(0, {}, b"", buf)


def req(
    target: bytes,
    *lines: bytes,
    method: bytes = b"POST",
    body: bytes = BODY,
    host: bytes | None = b"127.0.0.1",
    close: bool = True,
) -> bytes:
    """A raw HTTP/1.1 request; `lines` are raw header lines (no CRLF)."""
    head = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        head.append(b"Host: " + host)
    head += lines
    if method in (b"POST", b"PUT", b"PATCH") or body:
        head.append(b"Content-Length: %d" % len(body))
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# ---------------------------------------------------------------- checks


class Table:
    """Runs every row; fails at the end naming each row that broke and how."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    @contextlib.contextmanager
    def row(self, name: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            self.failures.append(f"[{name}] {type(e).__name__}: {e}")

    def verify(self) -> None:
        assert not self.failures, "\n".join(["rows that broke:", *self.failures])


def since(fake: Fake, mark: int) -> list[dict[str, Any]]:
    return fake.log()[mark:]


def proxy_error(a: Answer, status: int, reason: str | None = None, api: str = "native") -> None:
    """A proxy-made error: status, `x-gemini-proxy-reason`, the body in the SDK's shape."""
    assert a.status == status, f"expected {status}, got {a!r}"
    if reason is not None:
        assert a.headers.get("x-gemini-proxy-reason") == reason, a
    doc = a.json()["error"]
    if api == "native":
        assert doc["code"] == status and isinstance(doc["message"], str), a
        assert reason is None or doc["details"][0]["reason"] == reason, a
    else:
        assert isinstance(doc["message"], str) and doc["type"], a
        assert reason is None or doc["code"] == reason, a


def refused(
    proxy: Proxy,
    fake: Fake,
    port: int,
    data: bytes,
    status: int | set[int],
    reason: str | None = None,
    api: str = "native",
    timeout: float = 5.0,
) -> Answer:
    """Send; the answer has `status` (a set: any of them, mitmproxy's own included), and nothing
    reached the fake."""
    mark = len(fake.log())
    a = exchange(port, data, timeout)
    proxy.remember(a.raw)
    if isinstance(status, set):
        assert a.status in status, f"expected one of {sorted(status)}, got {a!r}"
        if a.headers.get("x-gemini-proxy-reason"):
            proxy_error(a, a.status, reason, api)
    else:
        proxy_error(a, status, reason, api)
    assert since(fake, mark) == [], f"went upstream: {since(fake, mark)}"
    return a


def served(proxy: Proxy, fake: Fake, pool: set[str], data: bytes, port: int = 0) -> dict[str, Any]:
    """Send; the answer is Google's 200 and exactly one call with one pool key reached it."""
    mark = len(fake.log())
    a = exchange(port or proxy.port, data)
    proxy.remember(a.raw)
    assert a.status == 200, a
    calls = since(fake, mark)
    assert len(calls) == 1 and calls[0]["key"] in pool and calls[0]["status"] == 200, calls
    return calls[0]


def fake_saw_only_pool_keys(fake: Fake, pool: set[str], tokens: list[str]) -> None:
    """Everything that reached Google carried one pool key (upload bytes: none, as with Google)
    and no client token anywhere."""
    for e in fake.log(checks=True):
        assert e["key"] in pool or (e.get("upload") and e["key"] is None), e
        seen = json.dumps(e)
        assert not any(t in seen for t in tokens), f"a client token reached Google: {e}"


def in_flight(proxy: Proxy) -> float:
    for family in text_string_to_metric_families(proxy.metrics()):
        for s in family.samples:
            if s.name == "gemini_proxy_requests_in_flight":
                return s.value
    raise AssertionError("no gemini_proxy_requests_in_flight")


def still_serving(proxy: Proxy, fake: Fake, pool: set[str], *lines: bytes) -> None:
    """A plain request is served, and afterwards nothing is left counted as in flight (a
    graceful shutdown waits for what is in flight)."""
    served(proxy, fake, pool, req(GEN, *lines))
    try:
        wait_for(lambda: in_flight(proxy) == 0, timeout=3)
    except AssertionError:
        raise AssertionError(
            f"gemini_proxy_requests_in_flight stays at {in_flight(proxy):.0f} after every "
            "answer went out: a graceful shutdown waits for it (gemini_drain_timeout_ms)"
        ) from None


# ---------------------------------------------------------------- bodies and memory


@dataclass
class Blast:
    answer: Answer | None
    sent: int  # body bytes written
    rss_before_kib: int
    rss_peak_kib: int
    how_it_ended: str

    @property
    def growth_mib(self) -> float:
        return (self.rss_peak_kib - self.rss_before_kib) / 1024


def blast(port: int, pid: int, head: bytes, chunk: bytes, limit: int, stall: float = 3.0) -> Blast:
    """Write `head`, then `chunk` again and again up to `limit` bytes, reading all the while.

    Stops once a whole answer is in, the proxy closes, it stops reading for `stall` seconds or
    30 s have passed. Samples the proxy's RSS every 20 ms throughout.
    """
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_kib(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    buf, sent, ended = b"", 0, "limit"
    pending = memoryview(head)
    in_head = True
    t0 = last = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setblocking(False)
    try:
        while True:
            if not pending and sent < limit:
                pending, in_head = memoryview(chunk), False
            readable, writable, _ = select.select([s], [s] if pending else [], [], 0.1)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    ended = "reset"
                    break
                if not data:
                    ended = "closed"
                    break
                buf += data
                if parse_answer(buf) is not None:
                    ended = "answered"
                    break
            if writable:
                try:
                    n = s.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    ended = "reset while writing"
                    break
                pending = pending[n:]
                sent += 0 if in_head else n
                last = time.monotonic()
            now = time.monotonic()
            if not pending and sent >= limit and now - last > stall:
                break  # everything written: waited `stall` for the answer
            if now - last > stall:
                ended = "proxy stopped reading"
                break
            if now - t0 > 30:
                ended = "30 s"
                break
    finally:
        s.close()
        done.set()
        watcher.join()
    answer = parse_answer(buf) or (parse_answer(buf, eof=True) if buf else None)
    return Blast(answer, sent, before, peak[0], ended)


def chunked(size: int) -> bytes:
    data = b"x" * size
    return b"%x\r\n" % size + data + b"\r\n"


# ================================================================ 1. odd bytes in credentials


def test_odd_bytes_in_every_credential_slot_are_refused_with_401(
    fake: Fake, make_proxy: Any
) -> None:
    pool_key, token = new_secret(), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    proxy = make_proxy([key_entry("a", pool_key)], clients=[{"name": "app", "token": token}])
    t = token.encode()
    basic = base64.b64encode(t + b":").decode().encode()
    rows: list[tuple[str, bytes, str]] = [
        ("x-goog-api-key \\xff", req(GEN, b"x-goog-api-key: \xff"), "invalid_token"),
        ("Bearer \\xfe\\xff", req(GEN, b"Authorization: Bearer \xfe\xff"), "invalid_token"),
        ("token + \\xff header", req(GEN, b"x-goog-api-key: " + t + b"\xff"), "invalid_token"),
        (
            "token + \\xff bearer",
            req(GEN, b"Authorization: Bearer " + t + b"\xff"),
            "invalid_token",
        ),
        ("\\xff + token header", req(GEN, b"x-goog-api-key: \xff" + t), "invalid_token"),
        ("key=%FF", req(GEN + b"?key=%FF"), "invalid_token"),
        ("key=token%FF", req(GEN + b"?key=" + t + b"%FF"), "invalid_token"),
        ("key=token + raw latin-1", req(GEN + b"?key=" + t + b"\xe9"), "invalid_token"),
        ("key=raw \\xff", req(GEN + b"?key=\xff&alt=json"), "invalid_token"),
        ("token + NUL header", req(GEN, b"x-goog-api-key: " + t + b"\x00"), "bad_request"),
        ("NUL header", req(GEN, b"x-goog-api-key: \x00"), "bad_request"),
        ("key=token%00", req(GEN + b"?key=" + t + b"%00"), "invalid_token"),
        ("10 KB header token", req(GEN, b"x-goog-api-key: " + t + b"a" * 10_000), "invalid_token"),
        ("10 KB bearer", req(GEN, b"Authorization: Bearer " + t + b"b" * 10_000), "invalid_token"),
        ("10 KB key=", req(GEN + b"?key=" + t + b"c" * 10_000), "invalid_token"),
        ("Basic", req(GEN, b"Authorization: Basic " + basic), "invalid_token"),
        ("Authorization without scheme", req(GEN, b"Authorization: " + t), "invalid_token"),
        ("empty Bearer", req(GEN, b"Authorization: Bearer"), "invalid_token"),
        ("no token at all", req(GEN), "missing_token"),
        ("upload_id of no session", req(b"/upload/v1beta/files?upload_id=abc"), "upload_not_found"),
    ]
    table = Table()
    for name, data, reason in rows:
        with table.row(name):
            status = {"bad_request": 400, "upload_not_found": 404}.get(reason, 401)
            refused(proxy, fake, proxy.port, data, status, reason)
    with table.row("OpenAI path, Bearer \\xff"):
        data = req(b"/v1/chat/completions", b"Authorization: Bearer \xff", body=CHAT)
        refused(proxy, fake, proxy.port, data, 401, "invalid_token", api="openai")
    with table.row("header name with a space (mitmproxy refuses it)"):
        data = req(GEN, b"x-goog-api-key: " + t, b"x-goog-api-key : " + t)
        refused(proxy, fake, proxy.port, data, {400})
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {pool_key}, b"x-goog-api-key: " + t)
    table.verify()
    fake_saw_only_pool_keys(fake, {pool_key}, [token])
    assert proxy.proc is not None and proxy.proc.poll() is None


def test_odd_bytes_as_the_very_first_request_do_not_stop_mitmdump(
    fake: Fake, make_proxy: Any
) -> None:
    pool_key, token = new_secret(), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    proxy = make_proxy(
        [key_entry("a", pool_key)], clients=[{"name": "app", "token": token}], start=False
    )
    proxy.start(wait=False)
    assert proxy.proc is not None
    hostile = req(GEN, b"x-goog-api-key: " + token.encode() + b"\xff")
    deadline = time.monotonic() + 30
    first: Answer | None = None
    while first is None:  # hammer the port: the first connection it accepts gets odd bytes
        assert proxy.proc.poll() is None, f"mitmdump exited:\n{proxy.logs()}"
        assert time.monotonic() < deadline, "the listener never opened"
        try:
            first = exchange(proxy.port, hostile, timeout=10)
        except ConnectionRefusedError:
            time.sleep(0.005)
    proxy.remember(first.raw)
    proxy_error(first, 401, "invalid_token")
    for data in (hostile, req(GEN, b"Authorization: Bearer \xfe\xff"), req(GEN + b"?key=%FF")):
        proxy_error(exchange(proxy.port, data), 401, "invalid_token")
    proxy.wait_ready()
    assert proxy.proc.poll() is None, f"mitmdump exited:\n{proxy.logs()}"
    assert "Error logged during startup" not in proxy.logs()
    assert "Traceback" not in proxy.logs()
    assert fake.log() == []
    still_serving(proxy, fake, {pool_key}, b"x-goog-api-key: " + token.encode())


# ================================================================ 2. duplicate credentials


def test_duplicate_conflicting_and_smuggled_credentials(fake: Fake, make_proxy: Any) -> None:
    pool_key, tok_a, tok_b = new_secret(), new_secret("sk-"), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    proxy = make_proxy(
        [key_entry("a", pool_key)],
        clients=[{"name": "app", "token": tok_a}, {"name": "other", "token": tok_b}],
    )
    pool = {pool_key}
    a, b = tok_a.encode(), tok_b.encode()
    xa, xb = b"x-goog-api-key: " + a, b"x-goog-api-key: " + b
    table = Table()
    conflicts: list[tuple[str, bytes]] = [
        ("two x-goog-api-key headers", req(GEN, xa, xb)),
        ("header + other key=", req(GEN + b"?key=" + b, xa)),
        ("header + %6Bey= (encoded name)", req(GEN + b"?%6Bey=" + b, xa)),
        ("header + KEY= (upper case)", req(GEN + b"?alt=json&KEY=" + b, xa)),
        ("header + k%65y+= (encoded, padded)", req(GEN + b"?k%65y+=" + b, xa)),
        ("Bearer + other header", req(GEN, b"Authorization: Bearer " + a, xb)),
        ("key= twice, different", req(GEN + b"?key=" + a + b"&key=" + b)),
        ("valid + unknown token", req(GEN, xa, b"x-goog-api-key: sk-not-a-client")),
    ]
    for name, data in conflicts:
        with table.row(name):
            refused(proxy, fake, proxy.port, data, 401, "conflicting_tokens")
    with table.row("valid header + malformed key="):
        refused(proxy, fake, proxy.port, req(GEN + b"?key=%FF", xa), 401, "invalid_token")
    with table.row("folded header carrying a second credential"):
        # obs-fold: mitmproxy joins the continuation into x-other's value (CR LF included)
        data = req(GEN, xa, b"x-other: a", b"  x-goog-api-key: folded-credential")
        refused(proxy, fake, proxy.port, data, {400, 401})
    with table.row("folded header, harmless continuation"):
        refused(proxy, fake, proxy.port, req(GEN, xa, b"x-other: a", b"  b"), {400, 401})

    admitted: list[tuple[str, bytes, str]] = [
        (
            "same token in all three slots",
            req(GEN + b"?key=" + a, xa, b"Authorization: Bearer " + a),
            "",
        ),
        ("same token, %6Bey= + header", req(GEN + b"?%6Bey=" + a + b"&alt=json", xa), "alt=json"),
        ("k%65y= alone", req(GEN + b"?k%65y=" + a), ""),
        (
            "access_token= and oauth_token=",
            req(GEN + b"?access_token=" + b + b"&oauth_token=" + b, xa),
            "",
        ),
        (
            "Proxy-Authorization + Cookie",
            req(GEN, xa, b"Proxy-Authorization: Bearer " + b, b"Cookie: t=" + b),
            "",
        ),
    ]
    for name, data, query in admitted:
        with table.row(name):
            call = served(proxy, fake, pool, data)
            assert call["query"] == query, call
    with table.row("OpenAI path, Bearer"):
        data = req(b"/v1/chat/completions", b"Authorization: Bearer " + a, body=CHAT)
        served(proxy, fake, pool, data)
    with table.row("authenticated, then a request without a token on the same connection"):
        mark = len(fake.log())
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(req(GEN, xa, close=False))
            buf = b""
            while (first := parse_answer(buf)) is None:
                chunk = s.recv(65536)
                assert chunk, "closed"
                buf += chunk
            s.sendall(req(GEN, close=False))
            buf2 = b""
            while (second := parse_answer(buf2)) is None:
                chunk = s.recv(65536)
                assert chunk, "closed"
                buf2 += chunk
        proxy.remember(buf + buf2)
        assert first.status == 200, first
        proxy_error(second, 401, "missing_token")
        assert len(since(fake, mark)) == 1

    # an upload_id opens the gate for its own session only: method and path bound
    start = req(
        b"/upload/v1beta/files",
        xa,
        b"X-Goog-Upload-Protocol: resumable",
        b"X-Goog-Upload-Command: start",
        b"Content-Type: application/json",
        body=b'{"file": {"display_name": "x"}}',
        host=f"127.0.0.1:{proxy.port}".encode(),
    )
    up = exchange(proxy.port, start)
    proxy.remember(up.raw)
    assert up.status == 200, up
    url = up.headers["x-goog-upload-url"]
    assert url.startswith(proxy.url), url
    upload_id = url.split("upload_id=")[1].split("&")[0].encode()
    for name, data in [
        ("upload_id on generateContent", req(GEN + b"?upload_id=" + upload_id)),
        ("upload_id on files list", req(b"/v1beta/files?upload_id=" + upload_id, method=b"GET")),
        (
            "upload_id, GET on its own path",
            req(b"/upload/v1beta/files?upload_id=" + upload_id, method=b"GET"),
        ),
        ("upload_id on another upload path", req(b"/upload/v1/files?upload_id=" + upload_id)),
    ]:
        with table.row(name):
            # on an upload path the id is what the caller presents: not this session's, so no
            # session at all (404); elsewhere it is no credential (401)
            upload_path = b" /upload/" in data.split(b"\r\n", 1)[0]
            status, reason = (404, "upload_not_found") if upload_path else (401, "missing_token")
            refused(proxy, fake, proxy.port, data, status, reason)
    with table.row("upload_id with a wrong token"):
        data = req(b"/upload/v1beta/files?upload_id=" + upload_id, b"x-goog-api-key: sk-wrong")
        refused(proxy, fake, proxy.port, data, 401, "invalid_token")
    with table.row("upload_id on its own session goes through"):
        mark = len(fake.log())
        data = req(
            b"/upload/v1beta/files?upload_id=" + upload_id + b"&upload_protocol=resumable",
            b"X-Goog-Upload-Command: upload",
            b"X-Goog-Upload-Offset: 0",
            body=b"hello",
        )
        a_ = exchange(proxy.port, data)
        proxy.remember(a_.raw)
        assert a_.status == 200, a_
        assert [e.get("upload") for e in since(fake, mark)] == [True]
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, pool, xb)
    table.verify()
    for e in fake.log():
        assert e["status"] == 200, f"Google saw a bad credential set: {e}"
    fake_saw_only_pool_keys(fake, pool, [tok_a, tok_b])


# ================================================================ 3. paths and query tricks


def test_paths_query_tricks_and_foreign_hosts_in_loopback_mode(fake: Fake, make_proxy: Any) -> None:
    pool_key, token = new_secret(), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    proxy = make_proxy(  # no clients: loopback only
        [key_entry("a", pool_key)], options={"gemini_drain_timeout_ms": 2000}
    )
    pool = {pool_key}
    t = token.encode()
    table = Table()
    for name, target, query in [
        ("%6Bey=", GEN + b"?%6Bey=" + t + b"&alt=json", "alt=json"),
        ("KEY=", GEN + b"?KEY=" + t, ""),
        ("k%65y+=", GEN + b"?k%65y+=" + t, ""),
        ("%6b%65%79=", GEN + b"?alt=json&%6b%65%79=" + t, "alt=json"),
        ("key= twice", GEN + b"?key=" + t + b"&key=" + t, ""),
    ]:
        with table.row(name):
            call = served(proxy, fake, pool, req(target, b"x-goog-api-key: " + t))
            assert call["query"] == query, call

    bad_paths: list[tuple[str, bytes, bytes]] = [
        ("encoded ../", b"GET", b"/v1beta/models/%2e%2e%2f%2e%2e%2f_fake/log"),
        ("encoded ..", b"GET", b"/v1beta/models/%2e%2e"),
        ("mixed-case encoded ..", b"GET", b"/v1beta/%2E%2e/%2E%2E/_fake/log"),
        ("raw ..", b"GET", b"/v1beta/../../_fake/log"),
        ("raw .. after a model", b"POST", b"/v1beta/models/gemini-2.5-flash/../../files"),
        ("single dot", b"GET", b"/v1beta/./models"),
        ("backslashes", b"GET", b"/v1beta/models\\..\\..\\_fake\\log"),
        ("encoded backslashes", b"GET", b"/v1beta/models/%5c..%5c_fake"),
        ("upload ..", b"POST", b"/upload/../_fake/config"),
        ("download encoded ..", b"GET", b"/download/%2e%2e/_fake/log"),
    ]
    for name, method, target in bad_paths:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(target, method=method), 400, "bad_path")
    for name, method, target in [
        ("the fake's control API", b"POST", b"/_fake/config"),
        ("root", b"GET", b"/"),
        ("admin path on the proxy port", b"GET", b"/admin/keys"),
        ("prefix look-alike", b"GET", b"/v1betaX/models"),
        ("no trailing slash", b"GET", b"/v1beta"),
        ("etc/passwd", b"GET", b"/etc/passwd"),
    ]:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(target, method=method), 404, "unknown_path")
    hosts: list[tuple[str, bytes]] = [
        ("Host evil.example", req(GEN, host=b"evil.example")),
        ("Host 127.0.0.1.evil.example", req(GEN, host=b"127.0.0.1.evil.example")),
        ("Host localhost.evil.example:80", req(GEN, host=b"localhost.evil.example:80")),
        (
            "absolute-form to evil.example",
            req(b"http://evil.example" + GEN, host=b"evil.example"),
        ),
        ("absolute-form, loopback Host", req(b"http://evil.example" + GEN)),
    ]
    for name, data in hosts:
        with table.row(name):
            refused(proxy, fake, proxy.port, data, 403, "foreign_host")
    for name, host in [
        ("Host [::1]:port", b"[::1]:8080"),
        ("Host localhost. (trailing dot)", b"localhost."),
        ("Host LOCALHOST", b"LOCALHOST:1"),
    ]:
        with table.row(name):
            served(proxy, fake, pool, req(GEN, host=host))
    for name, host in [
        ("Host 0.0.0.0", b"0.0.0.0"),
        ("Host 127.1 (not an address)", b"127.1"),
        ("Host with userinfo", b"127.0.0.1:80@evil.example"),
        ("empty Host", b""),
    ]:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(GEN, host=host), {400, 403}, "foreign_host")
    with table.row("two Host headers"):
        data = req(GEN, b"Host: evil.example")
        refused(proxy, fake, proxy.port, data, {400, 403}, "foreign_host")
    with table.row("CONNECT evil.example:443"):
        data = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n"
        refused(proxy, fake, proxy.port, data, {400, 403, 405})
    with table.row("chunked body with a trailer carrying a credential"):
        # mitmproxy 12.3 cannot read request trailers: it logs "mitmproxy has crashed!" and
        # holds the connection until its idle timeout (10 min) without an answer. Nothing goes
        # upstream and the flow is settled when the caller goes (0: no answer, by mitmproxy)
        data = (
            b"POST " + GEN + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n%x\r\n"
            % len(BODY)
            + BODY
            + b"\r\n0\r\nx-goog-api-key: "
            + t
            + b"\r\n\r\n"
        )
        refused(proxy, fake, proxy.port, data, {0, 400, 401, 403}, timeout=3)
    with table.row("Content-Length and Transfer-Encoding (smuggling)"):
        data = (
            b"POST " + GEN + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /_fake/log HTTP/1.1\r\n\r\n"
        )
        refused(proxy, fake, proxy.port, data, {400})
    with table.row("two different Content-Lengths"):
        data = req(GEN, b"Content-Length: 3")
        refused(proxy, fake, proxy.port, data, {400})
    with table.row("70 KB model name"):
        refused(proxy, fake, proxy.port, req(b"/v1beta/models/" + b"a" * 70_000), 400)
    with table.row("300 KB path"):
        refused(
            proxy, fake, proxy.port, req(b"/v1beta/files/" + b"a" * 300_000), {0, 400, 414, 431}
        )
    with table.row("60 KB of segments (Google may answer, with the caller's 4xx)"):
        a = exchange(proxy.port, req(b"/v1beta/" + b"a/" * 30_000, method=b"GET"))
        proxy.remember(a.raw)
        assert 400 <= a.status < 500, a
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, pool)
    table.verify()
    fake_saw_only_pool_keys(fake, pool, [token])
    assert all(".." not in e["path"] and "_fake" not in e["path"] for e in fake.log())


# ================================================================ 4. destinations


def test_listeners_where_callers_choose_the_destination_never_get_a_key(
    fake: Fake, make_proxy: Any
) -> None:
    pool_key = new_secret()
    fake.configure({pool_key: "ok"})
    proxy = make_proxy([key_entry("a", pool_key)], start=False)
    regular, socks = free_port(), free_port()
    base: Callable[[], list[str]] = proxy.command
    proxy.command = lambda: [  # type: ignore[method-assign]
        *base(),
        "--mode",
        f"regular@{regular}",
        "--mode",
        f"socks5@{socks}",
    ]
    proxy.start()
    warnings = [line for line in proxy.logs().splitlines() if "choose the destination" in line]
    assert any(f"regular@{regular}" in line for line in warnings), proxy.logs()
    assert any(f"socks5@{socks}" in line for line in warnings), proxy.logs()

    fake_host = f"127.0.0.1:{fake.port}".encode()
    table = Table()
    for name, data in [
        ("absolute-form to the upstream", req(b"http://" + fake_host + GEN, host=fake_host)),
        (
            "absolute-form to the fake's log",
            req(b"http://" + fake_host + b"/_fake/log", method=b"GET", host=fake_host),
        ),
        ("origin-form with the upstream's Host", req(GEN, host=fake_host)),
        (
            "absolute-form, OpenAI path",
            req(
                b"http://" + fake_host + b"/v1/chat/completions",
                b"Authorization: Bearer u",
                body=CHAT,
                host=fake_host,
            ),
        ),
    ]:
        with table.row(name):
            api = "openai" if b"chat" in data.split(b"\r\n")[0] else "native"
            refused(proxy, fake, regular, data, 403, "destination_not_allowed", api)
    with table.row("CONNECT to the upstream"):
        data = b"CONNECT " + fake_host + b" HTTP/1.1\r\nHost: " + fake_host + b"\r\n\r\n"
        mark = len(fake.log())
        a = exchange(regular, data)
        assert a.status == 403, a
        assert since(fake, mark) == []
    with table.row("SOCKS5 to the upstream"):
        mark = len(fake.log())
        with socket.create_connection(("127.0.0.1", socks), timeout=5) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + fake.port.to_bytes(2))
            assert s.recv(10)[:2] == b"\x05\x00"
            s.sendall(req(GEN, host=fake_host))
            buf = b""
            while parse_answer(buf) is None and (chunk := s.recv(65536)):
                buf += chunk
        a = parse_answer(buf, eof=True)
        assert a is not None
        proxy.remember(a.raw)
        proxy_error(a, 403, "destination_not_allowed")
        assert since(fake, mark) == []
    with table.row("the fake saw nothing at all, key checks included"):
        assert fake.log(checks=True) == []
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {pool_key})
    table.verify()


# ================================================================ 5. huge and slow bodies


def test_refused_huge_bodies_are_drained_in_constant_memory(fake: Fake, make_proxy: Any) -> None:
    pool_key, token = new_secret(), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    # a limit above the bodies' size: what refuses them is the missing client token alone
    proxy = make_proxy(
        [key_entry("a", pool_key)],
        clients=[{"name": "app", "token": token}],
        options={"gemini_max_body": 1536 * MIB, "gemini_db": ""},
    )
    assert proxy.proc is not None
    pid = proxy.proc.pid
    for _ in range(5):
        still_serving(proxy, fake, {pool_key}, b"x-goog-api-key: " + token.encode())
    gib = 1 << 30
    head = b"POST " + GEN + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    rows: list[tuple[str, bytes, bytes, str]] = [
        (
            "1 GiB Content-Length, wrong token",
            head + b"x-goog-api-key: sk-wrong\r\nContent-Length: %d\r\n\r\n" % gib,
            b"x" * MIB,
            "native",
        ),
        (
            "1 GiB chunked, wrong token",
            head + b"x-goog-api-key: sk-wrong\r\nTransfer-Encoding: chunked\r\n\r\n",
            chunked(MIB),
            "native",
        ),
        (
            "1 GiB Content-Length, no token, OpenAI path",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n" % gib,
            b"x" * MIB,
            "openai",
        ),
    ]
    table = Table()
    report = []
    for name, data, chunk, api in rows:
        with table.row(name):
            mark = len(fake.log())
            b = blast(proxy.port, pid, data, chunk, 320 * MIB)
            report.append(
                f"{name}: sent {b.sent / MIB:.0f} MiB, RSS {b.rss_before_kib / 1024:.0f} -> "
                f"peak {b.rss_peak_kib / 1024:.0f} MiB (+{b.growth_mib:.1f}), {b.how_it_ended}"
            )
            assert b.answer is not None, (
                f"no answer after {b.sent / MIB:.0f} MiB ({b.how_it_ended})"
            )
            proxy.remember(b.answer.raw)
            reason = "missing_token" if "no token" in name else "invalid_token"
            proxy_error(b.answer, 401, reason, api)
            assert b.growth_mib < 100, f"RSS grew by {b.growth_mib:.0f} MiB"
            assert since(fake, mark) == []
    print("\n".join(report))
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {pool_key}, b"x-goog-api-key: " + token.encode())
    table.verify()


def test_oversized_bodies_get_413_and_slow_heads_block_no_one(fake: Fake, make_proxy: Any) -> None:
    pool_key, token = new_secret(), new_secret("sk-")
    fake.configure({pool_key: "ok"})
    proxy = make_proxy(
        [key_entry("a", pool_key)],
        clients=[{"name": "app", "token": token}],
        options={"gemini_max_body": MIB, "gemini_db": ""},
    )
    assert proxy.proc is not None
    pid = proxy.proc.pid
    t = token.encode()
    auth = b"x-goog-api-key: " + t
    for _ in range(5):
        still_serving(proxy, fake, {pool_key}, auth)
    head = b"POST " + GEN + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"\r\n"
    table = Table()
    report = []
    with table.row("authenticated chunked body far over the limit"):
        mark = len(fake.log())
        b = blast(
            proxy.port, pid, head + b"Transfer-Encoding: chunked\r\n\r\n", chunked(MIB), 200 * MIB
        )
        report.append(
            f"chunked over the limit: sent {b.sent / MIB:.0f} MiB, RSS "
            f"{b.rss_before_kib / 1024:.0f} -> peak {b.rss_peak_kib / 1024:.0f} MiB "
            f"(+{b.growth_mib:.1f}), {b.how_it_ended}"
        )
        assert b.answer is not None and b.answer.status == 413, b.answer
        proxy.remember(b.answer.raw)
        assert b.growth_mib < 100, f"RSS grew by {b.growth_mib:.0f} MiB"
        assert since(fake, mark) == []
    with table.row("Content-Length just over the limit, body sent"):
        data = head + b"Content-Length: %d\r\n\r\n" % (MIB + 1) + b"x" * (MIB + 1)
        refused(proxy, fake, proxy.port, data, 413, "request_too_large")
    with table.row("OpenAI path, Content-Length over the limit, body sent"):
        data = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
            + t
            + b"\r\nContent-Length: %d\r\n\r\n" % (MIB + 1)
            + b"x" * (MIB + 1)
        )
        refused(proxy, fake, proxy.port, data, 413, "request_too_large", "openai")
    with table.row("50 MiB Content-Length, head only: 413 at once"):
        data = head + b"Content-Length: %d\r\n\r\n" % (50 * MIB)
        refused(proxy, fake, proxy.port, data, {413}, "request_too_large", timeout=3)
    with table.row("Content-Length just over the limit, head only: JSON 413 at the head"):
        data = head + b"Content-Length: %d\r\n\r\n" % (MIB + 1)
        refused(proxy, fake, proxy.port, data, 413, "request_too_large", timeout=3)
    with table.row("Expect: 100-continue, Content-Length over the limit: 413, no invitation"):
        data = head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (MIB + 1)
        a = refused(proxy, fake, proxy.port, data, 413, "request_too_large", timeout=3)
        assert not a.raw.startswith(b"HTTP/1.1 100"), "100 Continue invites a refused body"

    with table.row("slow-loris heads do not block other callers"):
        loris = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(30)]
        trickle = b"POST " + GEN + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nx-goog-api-key: "
        stop = threading.Event()

        def drip() -> None:
            for i in range(len(trickle)):
                for s in loris:
                    with contextlib.suppress(OSError):
                        s.send(trickle[i : i + 1])
                if stop.wait(0.05):
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            latencies = []
            for _ in range(5):
                t0 = time.monotonic()
                r = proxy.http.post(GEN.decode(), content=BODY, headers={"x-goog-api-key": token})
                latencies.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
            assert dripper.is_alive(), "the heads were complete before the requests ran"
            assert max(latencies) < 2, latencies
        finally:
            stop.set()
            dripper.join()
            for s in loris:
                s.close()
    print("\n".join(report))
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {pool_key}, auth)
    table.verify()
    assert proxy.proc.poll() is None


# ================================================================ 6. made-up models


def test_made_up_models_stay_out_of_metrics_and_invalid_names_never_leave(
    fake: Fake, make_proxy: Any
) -> None:
    pool_key = new_secret()
    fake.configure({pool_key: "ok"})
    proxy = make_proxy([key_entry("a", pool_key)])
    still_serving(proxy, fake, {pool_key})
    mark = len(fake.log())
    statuses = set()
    for i in range(300):
        r = proxy.http.post(
            f"/v1beta/models/gemini-fake-{i}:generateContent",
            content=BODY,
            headers={"x-goog-api-key": "u"},
        )
        statuses.add((r.status_code, r.json()["error"]["status"]))
    assert statuses == {(404, "NOT_FOUND")}  # Google's own answer, passed through
    assert len(since(fake, mark)) == 300  # one call each: a caller's mistake is not retried
    still_serving(proxy, fake, {pool_key})
    models: set[str] = set()
    for family in text_string_to_metric_families(proxy.metrics()):
        for s in family.samples:
            if "model" in s.labels:
                models.add(s.labels["model"])
    assert models <= {FLASH, "other", "*"}, sorted(models)[:20]
    assert "gemini-fake" not in proxy.metrics()
    assert {k["status"] for k in proxy.keys_state().values()} == {"active"}

    table = Table()
    for name, target in [
        ("space", b"/v1beta/models/gemini%20pro:generateContent"),
        ("encoded slash", b"/v1beta/models/gemini%2F2.5:generateContent"),
        ("200 chars", b"/v1beta/models/" + b"g" * 200 + b":generateContent"),
        ("unicode, encoded", b"/v1beta/models/g%C3%A9mini:generateContent"),
        ("unicode, raw UTF-8", b"/v1beta/models/g\xc3\xa9mini:generateContent"),
        ("raw latin-1", b"/v1beta/models/g\xe9mini:generateContent"),
        ("NUL", b"/v1beta/models/gemini%00:generateContent"),
        ("leading dash", b"/v1beta/models/-gemini:generateContent"),
        ("newline", b"/v1beta/models/gemini%0d%0aX-Injected:%201:generateContent"),
        ("tuned model, bad id", b"/v1beta/tunedModels/a%20b:generateContent"),
        ("streaming, bad id", b"/v1beta/models/a%2Cb:streamGenerateContent?alt=sse"),
    ]:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(target), 400, "invalid_model")
    for name, model in [
        ("space", "gemini 2.5"),
        ("slash", "gemini/2.5"),
        ("200 chars", "g" * 200),
        ("unicode", "gémini"),
        ("a number", 5),
        ("a list", ["gemini-2.5-flash"]),
    ]:
        with table.row(f"OpenAI body model: {name}"):
            body = json.dumps({"model": model, "messages": []}).encode()
            data = req(b"/v1/chat/completions", b"Authorization: Bearer u", body=body)
            refused(proxy, fake, proxy.port, data, 400, "invalid_model", "openai")
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {pool_key})
    table.verify()


# ================================================================ 7. cross-site


def test_cross_site_requests_are_refused_in_loopback_mode(fake: Fake, make_proxy: Any) -> None:
    pool_key = new_secret()
    fake.configure({pool_key: "ok"})
    proxy = make_proxy([key_entry("a", pool_key)])
    pool = {pool_key}
    table = Table()
    for name, lines in [
        ("Origin evil.example", [b"Origin: https://evil.example"]),
        ("Origin null", [b"Origin: null"]),
        ("Origin look-alike", [b"Origin: http://127.0.0.1.evil.example"]),
        ("Origin localhost look-alike", [b"Origin: http://localhost.evil.example:8080"]),
        ("Sec-Fetch-Site cross-site", [b"Sec-Fetch-Site: cross-site"]),
        (
            "loopback Origin + cross-site",
            [b"Origin: http://localhost:3000", b"Sec-Fetch-Site: cross-site"],
        ),
        (
            "two Origins, one evil",
            [b"Origin: http://localhost:3000", b"Origin: https://evil.example"],
        ),
    ]:
        with table.row(name):
            refused(proxy, fake, proxy.port, req(GEN, *lines), 403, "cross_site_request")
    with table.row("OpenAI path, Origin evil.example"):
        data = req(b"/v1/chat/completions", b"Origin: https://evil.example", body=CHAT)
        refused(proxy, fake, proxy.port, data, 403, "cross_site_request", "openai")
    with table.row("a 1 MiB form post from evil.example"):
        data = req(GEN, b"Origin: https://evil.example", body=b"x" * MIB)
        refused(proxy, fake, proxy.port, data, 403, "cross_site_request")
    for name, lines in [
        ("Origin localhost:3000", [b"Origin: http://localhost:3000"]),
        ("Origin [::1]", [b"Origin: http://[::1]:8080"]),
        ("Origin 127.0.0.1", [b"Origin: http://127.0.0.1:5173"]),
        ("Sec-Fetch-Site none", [b"Sec-Fetch-Site: none"]),
        ("Sec-Fetch-Site same-origin", [b"Sec-Fetch-Site: same-origin"]),
    ]:
        with table.row(name):
            served(proxy, fake, pool, req(GEN, *lines))
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, pool)
    table.verify()


# ================================================================ 8. admin API abuse


def test_admin_api_abuse_gets_4xx_json_and_changes_nothing(fake: Fake, make_proxy: Any) -> None:
    a_key, b_key = new_secret(), new_secret()
    fake.configure({a_key: "ok", b_key: "ok"})
    proxy = make_proxy([key_entry("a", a_key), key_entry("b", b_key)])
    ALL_SECRETS.add(proxy.admin_token)  # checked in the log, dump, database and every body
    token = proxy.admin_token.encode()

    def state() -> tuple[Any, Any]:
        doc = proxy.admin.get("/admin/state").json()
        doc.pop("exported_at", None)
        keys = {n: (k["status"], k["weight"], k["enabled"]) for n, k in proxy.keys_state().items()}
        return doc, keys

    before = state()
    anon = httpx.Client(base_url=proxy.admin_url, timeout=10)
    table = Table()

    def admin_error(
        status: int | set[int], r: Answer | httpx.Response, parser: bool = False
    ) -> None:
        """A 4xx in JSON without the admin token; `parser`: aiohttp's HTTP parser may refuse the
        request before the app sees it, with a 400 in plain text."""
        if isinstance(r, Answer):
            code, body, ctype = r.status, r.body, r.headers.get("content-type", "")
            proxy.remember(r.raw)
        else:
            code, body, ctype = r.status_code, r.content, r.headers.get("content-type", "")
            proxy.remember(r.content)
        allowed = status if isinstance(status, set) else {status}
        assert code in allowed, f"expected {sorted(allowed)}, got {code}: {body[:300]!r}"
        assert token not in body, f"the admin token is in the answer: {body[:300]!r}"
        if parser and code == 400 and "json" not in ctype:
            return
        assert "json" in ctype, f"not JSON ({ctype}): {body[:300]!r}"
        assert json.loads(body)["error"]["code"] == code

    def raw_admin(method: bytes, path: bytes, *lines: bytes, body: bytes = b"") -> Answer:
        return exchange(proxy.admin_port, req(path, *lines, method=method, body=body))

    for name, lines in [
        ("no token", []),
        ("wrong token", [b"Authorization: Bearer wrong"]),
        ("token as Basic", [b"Authorization: Basic " + base64.b64encode(token)]),
        ("token without scheme", [b"Authorization: " + token]),
        ("token prefix", [b"Authorization: Bearer " + token[:-1]]),
        ("token + space junk", [b"Authorization: Bearer " + token + b" x"]),
        ("Bearer \\xff\\xfe", [b"Authorization: Bearer \xff\xfe"]),
        ("token + \\xff", [b"Authorization: Bearer " + token + b"\xff"]),
        ("token in the query", []),
    ]:
        with table.row(f"auth: {name}"):
            path = b"/admin/keys?token=" + token if "query" in name else b"/admin/keys"
            admin_error(401, raw_admin(b"GET", path, *lines))
    for name, lines in [
        ("wrong token + NUL", [b"Authorization: Bearer wrong\x00"]),
        ("10 KB token", [b"Authorization: Bearer " + b"t" * 10_000]),
    ]:
        with table.row(f"auth: {name}"):
            admin_error({400, 401}, raw_admin(b"GET", b"/admin/keys", *lines), parser=True)
    with table.row("auth: token + NUL"):
        # The right token with a stray byte: aiohttp's parser refuses the line before the app
        # sees it and repeats it in its 400, to the one who sent it (who holds the token);
        # the proxy's log must not repeat it.
        r = raw_admin(b"GET", b"/admin/keys", b"Authorization: Bearer " + token + b"\x00")
        assert r.status == 400
        assert token.decode() not in proxy.logs()
    with table.row("unauthenticated disable"):
        admin_error(401, anon.post("/admin/keys/a/disable"))
    with table.row("unauthenticated 2 MiB state import"):
        admin_error(401, anon.post("/admin/state", content=b"{" + b" " * (2 * MIB) + b"}"))

    for name, method, path in [
        ("..%2F..", "GET", "/admin/keys/..%2F.."),
        ("..%2F..%2Fmetrics", "GET", "/admin/keys/..%2F..%2Fmetrics"),
        ("%2e%2e", "GET", "/admin/keys/%2e%2e"),
        ("NUL", "GET", "/admin/keys/a%00"),
        ("traversal disable", "POST", "/admin/keys/..%2Fa/disable"),
        ("traversal patch", "PATCH", "/admin/keys/..%2Fb"),
        ("unknown key", "POST", "/admin/keys/nobody/disable"),
        ("unknown action", "POST", "/admin/keys/a/delete"),
        ("DELETE", "DELETE", "/admin/keys/a"),
    ]:
        with table.row(f"path: {name}"):
            admin_error({400, 404, 405}, proxy.admin.request(method, path, json={"weight": 5}))
    with table.row("path: 64 KB key name"):
        path = b"/admin/keys/" + b"a" * 65_536
        a = raw_admin(b"GET", path, b"Authorization: Bearer " + token)
        admin_error({400, 404, 414, 431}, a, parser=True)

    for name, method, path, body in [
        (
            "2 MiB state import",
            "POST",
            "/admin/state",
            b'{"keys": {}, "x": "' + b"y" * (2 * MIB) + b'"}',
        ),
        ("2 MiB patch", "PATCH", "/admin/keys/a", b'{"weight": ' + b"9" * (2 * MIB) + b"}"),
        ("5000-digit weight", "PATCH", "/admin/keys/a", b'{"weight": ' + b"9" * 5000 + b"}"),
        ("weight as a string", "PATCH", "/admin/keys/a", b'{"weight": "5"}'),
        ("weight as a float", "PATCH", "/admin/keys/a", b'{"weight": 5.0}'),
        ("weight true", "PATCH", "/admin/keys/a", b'{"weight": true}'),
        ("weight 0", "PATCH", "/admin/keys/a", b'{"weight": 0}'),
        ("weight 1001", "PATCH", "/admin/keys/a", b'{"weight": 1001}'),
        ("weight NaN", "PATCH", "/admin/keys/a", b'{"weight": NaN}'),
        ("extra field", "PATCH", "/admin/keys/a", b'{"weight": 5, "key": "x"}'),
        ("a list", "PATCH", "/admin/keys/a", b"[5]"),
        ("not JSON", "PATCH", "/admin/keys/a", b"weight=5"),
        ("not UTF-8", "PATCH", "/admin/keys/a", b'{"weight": "\xff"}'),
        ("state: a list", "POST", "/admin/state", b"[1]"),
        ("state: keys a string", "POST", "/admin/state", b'{"version": 1, "keys": "x"}'),
        (
            "state: cooldowns garbage",
            "POST",
            "/admin/state",
            b'{"version": 1, "keys": {}, "cooldowns": [[1, 2]]}',
        ),
        ("state: deeply nested", "POST", "/admin/state", b"[" * 100_000 + b"]" * 100_000),
        ("state: not UTF-8", "POST", "/admin/state", b"\xff\xfe{}"),
    ]:
        with table.row(f"body: {name}"):
            r = proxy.admin.request(
                method, path, content=body, headers={"content-type": "application/json"}
            )
            admin_error({400, 413, 422}, r)
    with table.row("state: fingerprint a number (ignored or refused)"):
        body = b'{"version": 1, "keys": {"a": {"fingerprint": 5, "operator_enabled": false}}}'
        r = proxy.admin.post("/admin/state", content=body)
        proxy.remember(r.content)
        if r.status_code == 200:
            assert r.json() == {"imported": 0}, r.text
        else:
            admin_error({400, 422}, r)
    with table.row("state unchanged"):
        assert state() == before
    with table.row("the admin token is nowhere in /metrics"):
        text = proxy.metrics()
        proxy.remember(text.encode())
        assert proxy.admin_token not in text
    with table.row("still serving, nothing left in flight"):
        still_serving(proxy, fake, {a_key, b_key})
    table.verify()


# ================================================================ 9. benching keys


def test_callers_cannot_bench_keys_with_their_own_bad_requests(fake: Fake, make_proxy: Any) -> None:
    keys = [new_secret() for _ in range(3)]
    fake.configure(dict.fromkeys(keys, "ok"))
    proxy = make_proxy([key_entry(f"k{i}", s) for i, s in enumerate(keys)])
    n = 8
    table = Table()
    for name, target, status, text in [
        ("create a tuned model", b"/v1beta/tunedModels", 401, "API keys are not supported"),
        (
            "generate with a tuned model",
            b"/v1beta/tunedModels/x:generateContent",
            403,
            "You do not have permission to access tuned model",
        ),
        (
            "stream with a tuned model",
            b"/v1beta/tunedModels/y:streamGenerateContent?alt=sse",
            403,
            "You do not have permission to access tuned model",
        ),
    ]:
        with table.row(name):
            for _ in range(n):
                mark = len(fake.log())
                a = exchange(proxy.port, req(target, b"x-goog-api-key: u"))
                proxy.remember(a.raw)
                assert a.status == status, a
                assert text in a.json()["error"]["message"], a  # Google's own answer
                calls = since(fake, mark)
                assert len(calls) == 1, f"{len(calls)} upstream calls for one request: {calls}"
    # Google's messages repeat what the caller sent (a file id, an unknown JSON field's name):
    # "reported as leaked" in them is the caller's text, not Google's verdict on a key
    for name, target in [
        ("file id 'reported as leaked'", b"/v1beta/files/reported%20as%20leaked"),
        ("file id 'API key not valid'", b"/v1beta/files/API%20key%20not%20valid"),
    ]:
        with table.row(name):
            a = exchange(proxy.port, req(target, b"x-goog-api-key: u", method=b"GET"))
            proxy.remember(a.raw)
            assert a.status == 403, a  # Google's answer about the caller's file, passed through
            assert "permission to access the File" in a.json()["error"]["message"], a
            after = exchange(proxy.port, req(GEN, b"x-goog-api-key: u"))
            proxy.remember(after.raw)
            assert after.status == 200, f"the next caller got {after!r}"
            assert fake.checks() == [], f"keys were suspected: {len(fake.checks())} key checks"
    table.verify()
    assert fake.counts()["create:tunedModels"] == n
    assert fake.checks() == []  # nothing even looked suspicious
    assert {k["status"] for k in proxy.keys_state().values()} == {"active"}
    health = proxy.admin.get("/admin/health").json()
    assert health["dead"] == 0 and health["disabled"] == 0, health
    used = set()
    for _ in range(6):
        r = proxy.http.post(GEN.decode(), content=BODY, headers={"x-goog-api-key": "u"})
        assert r.status_code == 200
        used.add(r.headers["x-gemini-proxy-key"])
    assert used == {"k0", "k1", "k2"}
