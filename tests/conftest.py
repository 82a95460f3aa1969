"""Shared fixtures: the fake Gemini upstream and real mitmdump processes running the addon."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addon"))
VENV_BIN = Path(sys.executable).parent
MITMDUMP = str(VENV_BIN / "mitmdump")

# Every secret a test hands to a proxy: no log, dump or body may ever contain one.
ALL_SECRETS: set[str] = set()


def new_secret(kind: str = "AIza") -> str:
    s = kind + "Sy" + secrets.token_urlsafe(26)[:33]
    ALL_SECRETS.add(s)
    return s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc})")


def is_key_check(entry: dict[str, Any]) -> bool:
    return entry.get("path") == "/v1beta/models" and entry.get("query") == "pageSize=1"


class Fake:
    """Handle on the fake Gemini subprocess (one per test session)."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def configure(self, keys: dict[str, str], **extra: Any) -> None:
        self.http.post("/_fake/config", json={"keys": keys, **extra}).raise_for_status()
        self.http.post("/_fake/reset").raise_for_status()

    def log(self, checks: bool = False) -> list[dict[str, Any]]:
        """What reached the fake; without the proxy's key checks unless `checks`."""
        entries = list(self.http.get("/_fake/log").json())
        return entries if checks else [e for e in entries if not is_key_check(e)]

    def checks(self) -> list[dict[str, Any]]:
        """The proxy's key checks (GET /v1beta/models?pageSize=1: no generation quota)."""
        return [e for e in self.log(checks=True) if is_key_check(e)]

    def keys_seen(self) -> list[str | None]:
        return [e["key"] for e in self.log()]

    def counts(self) -> dict[str, int]:
        return dict(self.http.get("/_fake/counts").json())


@pytest.fixture(scope="session")
def fake() -> Iterator[Fake]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "fake_gemini.py"), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    f = Fake(port, proc)
    wait_for(lambda: f.http.get("/_fake/log").status_code == 200)
    yield f
    proc.terminate()
    proc.wait(5)


class Proxy:
    """A real mitmdump running the addon in reverse mode in front of the fake."""

    def __init__(
        self,
        workdir: Path,
        upstream: str,
        keys: list[dict[str, Any]],
        clients: list[dict[str, Any]] | None = None,
        options: dict[str, Any] | None = None,
        tool: str = "mitmdump",
        admin_token: str | None = None,
    ) -> None:
        self.dir = workdir
        self.upstream = upstream
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:  # the kernel may hand the same free port out twice
            self.admin_port = free_port()
        self.admin_token = "admin-" + secrets.token_hex(8) if admin_token is None else admin_token
        self.keys_file = workdir / "keys.yaml"
        self.db = workdir / "state.db"
        self.dump = workdir / "flows.mitm"
        self.log_file = workdir / "proxy.log"
        self.options = options or {}
        self.tool = tool
        self.write_keys(keys, clients)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.admin = httpx.Client(
            base_url=self.admin_url,
            timeout=10,
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.bodies: list[bytes] = []

    def write_keys(
        self, keys: list[dict[str, Any]], clients: list[dict[str, Any]] | None = None
    ) -> None:
        doc: dict[str, Any] = {"keys": keys}
        if clients:
            doc["clients"] = clients
        tmp = self.keys_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.keys_file)

    def command(self) -> list[str]:
        opts = {
            "gemini_keys": str(self.keys_file),
            "gemini_db": str(self.db),
            "gemini_admin": f"127.0.0.1:{self.admin_port}",
            "gemini_watch_ms": 200,
            **self.options,
        }
        cmd = [
            str(VENV_BIN / self.tool),
            "-s",
            str(ROOT / "addon" / "gemini_proxy.py"),
            "--mode",
            f"reverse:{self.upstream}",
            "--listen-host",
            "127.0.0.1",
            "-p",
            str(self.port),
        ]
        if self.tool == "mitmdump":
            cmd += ["-w", f"+{self.dump}"]
        for k, v in opts.items():
            cmd += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        return cmd

    def start(self, wait: bool = True) -> Proxy:
        self.log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            env={**os.environ, "GEMINI_ADMIN_TOKEN": self.admin_token},
            stdout=self.log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited early:\n{self.logs()}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                pass
            return httpx.get(f"{self.admin_url}/healthz", timeout=0.5).status_code == 200

        wait_for(up, timeout=30)

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        self.proc = None
        self.log_handle.close()
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Proxy:
        self.stop()
        return self.start()

    def remember(self, body: bytes) -> bytes:
        self.bodies.append(body)
        return body

    def assert_no_secrets(self) -> None:
        """No key string in the log, the flow dump, the database or any body a test saw."""
        places: dict[str, bytes] = {
            "log": self.log_file.read_bytes() if self.log_file.exists() else b""
        }
        if self.dump.exists():
            places["flow dump"] = self.dump.read_bytes()
        for suffix in ("", "-wal"):
            p = Path(f"{self.db}{suffix}")
            if p.exists():
                places[p.name] = p.read_bytes()
        places["bodies"] = b"\n".join(self.bodies)
        for secret in ALL_SECRETS:
            for where, data in places.items():
                assert secret.encode() not in data, f"a key leaked into the {where}"

    def metrics(self) -> str:
        return httpx.get(f"{self.admin_url}/metrics", timeout=5).text

    def keys_state(self) -> dict[str, dict[str, Any]]:
        return {k["name"]: k for k in self.admin.get("/admin/keys").json()["keys"]}

    def wait_key(self, name: str, status: str, timeout: float = 10) -> dict[str, Any]:
        """A dead-key answer is confirmed by a check in the background: wait for the verdict."""
        return dict(
            wait_for(lambda: (k := self.keys_state()[name])["status"] == status and k, timeout)
        )


@pytest.fixture
def make_proxy(tmp_path: Path, fake: Fake) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(keys: list[dict[str, Any]], start: bool = True, **kw: Any) -> Proxy:
        d = tmp_path / f"proxy{len(made)}"
        d.mkdir()
        p = Proxy(d, fake.url, keys, **kw)
        made.append(p)
        return p.start() if start else p

    yield make
    for p in made:
        p.stop()
        p.assert_no_secrets()


def key_entry(name: str, secret: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "key": secret, **kw}


def gen_body(text: str = "hi") -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}]}


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.split(b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"):
        block = block.strip()
        if block.startswith(b"data:") and block[5:].strip() != b"[DONE]":
            out.append(json.loads(block[5:]))
    return out


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    os.environ.pop("GEMINI_API_KEYS", None)
