#!/usr/bin/env python3
"""The container image, run for real: `scripts/check_container` builds it and runs this.

Starts the fake Gemini on a free loopback port and the image with podman (`--network host`, so
everything stays on 127.0.0.1), then checks, PASS/FAIL each:

* keys from a mounted key file: a request served past a dead key (the fake saw both keys), the
  admin API with the token, /metrics, the image's HEALTHCHECK (`podman healthcheck run`), a
  non-root user, mitmdump as PID 1 (it gets SIGTERM itself);
* SIGTERM drains: `podman stop` while a stream is in flight; the stream arrives whole, the
  container exits 0, and the SQLite file on the state volume holds both requests;
* keys from GEMINI_API_KEYS, no file: served by env-1; an argument's --set gemini_db replaces the
  entrypoint's default;
* neither: a clear error and exit status 2, before anything listens;
* no key secret in any container log.

Exits non-zero on any FAIL. Options: --image, --podman-arg (repeatable, e.g. --runtime=runc),
--keep (keep the work dir and the containers).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FLASH = "gemini-2.5-flash"
BODY = json.dumps({"contents": [{"role": "user", "parts": [{"text": "Say hi"}]}]}).encode()
UID = 10001  # the image's user (scripts/deploy/Containerfile)
STREAM_EVENTS = 8


class Check:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}{'' if ok else f': {detail}'}", flush=True)
        return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    return None


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if body is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


class Podman:
    def __init__(self, image: str, extra: list[str], keep: bool) -> None:
        self.image = image
        self.extra = extra
        self.keep = keep
        self.names: list[str] = []

    def run(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout, check=check
        )

    def start(self, name: str, env: dict[str, str], mounts: list[str], args: list[str]) -> None:
        cmd = ["run", "-d", "--name", name, "--network", "host", *self.extra]
        for k, v in env.items():
            cmd += ["-e", f"{k}={v}"]
        for m in mounts:
            cmd += ["-v", m]
        self.names.append(name)
        self.run(*cmd, self.image, *args, check=True)

    def state(self, name: str) -> dict[str, Any]:
        out = self.run("inspect", name, "--format", "{{json .State}}", check=True).stdout
        return dict(json.loads(out))

    def logs(self, name: str) -> str:
        r = self.run("logs", name)
        return r.stdout + r.stderr

    def cleanup(self) -> None:
        if not self.keep:
            for name in self.names:
                self.run("rm", "-f", "-t", "0", name)


def start_fake(work: Path, keys: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port_file = work / "fake.port"
    spec = ",".join(f"{k}={v}" for k, v in keys.items())
    proc = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "scripts" / "fake_gemini.py"), "--port", "0"),
            *("--port-file", str(port_file), "--keys", spec),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "fake.log").open("wb"),
    )
    if not wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 15):
        raise RuntimeError("the fake Gemini did not start (see fake.log)")
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def fake_log(fake_url: str) -> list[dict[str, Any]]:
    entries = json.loads(call("GET", f"{fake_url}/_fake/log")[1])
    return [e for e in entries if e.get("query") != "pageSize=1"]  # without the key checks


def stream_in_thread(url: str, out: dict[str, Any], started: threading.Event) -> threading.Thread:
    def run() -> None:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "POST",
                f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
                body=BODY,
                headers={
                    "content-type": "application/json",
                    "x-fake-events": str(STREAM_EVENTS),
                    "x-fake-delay-ms": "300",
                },
            )
            r = conn.getresponse()
            out["status"] = r.status
            data = b""
            while chunk := r.read1(65536):
                data += chunk
                started.set()
            out["body"] = data
        except Exception as e:
            out["error"] = repr(e)
        finally:
            started.set()
            conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def ready(admin: str) -> bool:
    return call("GET", f"{admin}/healthz")[0] == 200


def scenario_key_file(pod: Podman, check: Check, work: Path, tag: str) -> list[str]:
    good, dead = "AIzaSy" + secrets.token_urlsafe(24), "AIzaSy" + secrets.token_urlsafe(24)
    token = "admin-" + secrets.token_hex(8)
    fake, fake_url = start_fake(work, {good: "ok", dead: "dead"})
    try:
        keys = work / "keys.yaml"
        keys.write_text(
            f"keys:\n  - {{name: dead, key: {dead}, weight: 10}}\n  - {{name: good, key: {good}}}\n"
        )
        keys.chmod(0o644)
        state = work / "state"
        state.mkdir()
        os.chown(state, UID, UID)
        port, admin_port = free_port(), free_port()
        proxy, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        name = f"gemini-proxy-check-{tag}-file"
        t0 = time.monotonic()
        pod.start(
            name,
            {"GEMINI_ADMIN": f"127.0.0.1:{admin_port}", "GEMINI_ADMIN_TOKEN": token},
            [f"{keys}:/etc/gemini-proxy/keys.yaml:ro", f"{state}:/var/lib/gemini-proxy"],
            ["--mode", f"reverse:{fake_url}", "--listen-host", "127.0.0.1", "-p", str(port)],
        )
        up = wait_for(lambda: ready(admin), 60)
        if not check(
            "key file: the container starts and /healthz answers", bool(up), pod.logs(name)
        ):
            return [good, dead, token]
        print(f"      (ready {time.monotonic() - t0:.1f} s after podman run)", flush=True)

        status, body = call("POST", f"{proxy}/v1beta/models/{FLASH}:generateContent", BODY)
        seen = [e.get("key") for e in fake_log(fake_url)]
        check(
            "key file: a request is served past a dead key",
            status == 200 and b"Hello from fake Gemini" in body and seen == [dead, good],
            f"status {status}, body {body[:200]!r}, the fake saw {len(seen)} requests",
        )
        s, b = call("GET", f"{admin}/admin/keys", headers={"Authorization": f"Bearer {token}"})
        names = sorted(k["name"] for k in json.loads(b)["keys"]) if s == 200 else []
        check(
            "key file: the admin API answers with the token",
            names == ["dead", "good"],
            f"{s} {b[:200]!r}",
        )
        s, b = call("GET", f"{admin}/metrics")
        check(
            "key file: /metrics counts the request",
            s == 200
            and b'gemini_proxy_requests_total{api="native",client="local",status="200"} 1.0' in b,
            f"{s}",
        )
        hc = pod.run("healthcheck", "run", name)
        check(
            "HEALTHCHECK (podman healthcheck run) is healthy",
            hc.returncode == 0,
            hc.stdout + hc.stderr,
        )
        uid = pod.run("exec", name, "id", "-u").stdout.strip()
        check(f"runs as a non-root user (uid {UID})", uid == str(UID), f"uid {uid!r}")
        cmdline = pod.run("exec", name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ")
        check(
            "mitmdump is PID 1 (SIGTERM reaches it)",
            "/.venv/bin/mitmdump" in cmdline,
            cmdline[:200],
        )

        out: dict[str, Any] = {}
        started = threading.Event()
        t = stream_in_thread(proxy, out, started)
        started.wait(15)
        t0 = time.monotonic()
        stop = pod.run("stop", "-t", "40", name, timeout=60)
        stop_s = time.monotonic() - t0
        t.join(30)
        events = out.get("body", b"").count(b"data: ")
        check(
            "SIGTERM (podman stop) while a stream is in flight: the stream arrives whole",
            out.get("status") == 200 and events == STREAM_EVENTS and "error" not in out,
            f"status {out.get('status')}, {events}/{STREAM_EVENTS} events, {out.get('error', '')}",
        )
        st = pod.state(name)
        logs = pod.logs(name)
        check(
            "... and the container drained and exited 0",
            stop.returncode == 0 and st.get("ExitCode") == 0 and "draining 1 requests" in logs,
            f"podman stop {stop.returncode}, exit code {st.get('ExitCode')}, log tail {logs[-400:]!r}",
        )
        print(f"      (podman stop took {stop_s:.1f} s: the drain of the stream)", flush=True)
        db = state / "gemini-proxy.db"
        rows: list[tuple[Any, ...]] = []
        if db.exists():
            with sqlite3.connect(db) as c:
                rows = c.execute("SELECT status, key FROM outcomes ORDER BY id").fetchall()
        check(
            "the state volume holds the SQLite file with both requests",
            [r[0] for r in rows] == [200, 200] and all(r[1] == "good" for r in rows),
            f"rows {rows}",
        )
        return [good, dead, token]
    finally:
        fake.terminate()
        fake.wait(10)


def scenario_env_keys(pod: Podman, check: Check, work: Path, tag: str) -> list[str]:
    key = "AIzaSy" + secrets.token_urlsafe(24)
    envdir = work / "env"
    envdir.mkdir()
    fake, fake_url = start_fake(envdir, {key: "ok"})
    try:
        port, admin_port = free_port(), free_port()
        name = f"gemini-proxy-check-{tag}-env"
        pod.start(
            name,
            {"GEMINI_ADMIN": f"127.0.0.1:{admin_port}", "GEMINI_API_KEYS": key},
            [],
            [
                *("--mode", f"reverse:{fake_url}", "--listen-host", "127.0.0.1", "-p", str(port)),
                *("--set", "gemini_db=/var/lib/gemini-proxy/env.db"),  # not the entrypoint's
            ],
        )
        up = wait_for(lambda: ready(f"http://127.0.0.1:{admin_port}"), 60)
        status, _ = (
            call("POST", f"http://127.0.0.1:{port}/v1beta/models/{FLASH}:generateContent", BODY)
            if up
            else (0, b"")
        )
        seen = [e.get("key") for e in fake_log(fake_url)]
        check(
            "GEMINI_API_KEYS without a key file: served by that key",
            status == 200 and seen == [key] and "keys from GEMINI_API_KEYS" in pod.logs(name),
            f"status {status}, fake saw {len(seen)}; log {pod.logs(name)[-400:]!r}",
        )
        check(
            "an option given as an argument replaces the entrypoint's (--set gemini_db=...)",
            "database /var/lib/gemini-proxy/env.db" in pod.logs(name),
            pod.logs(name)[-400:],
        )
        stop = pod.run("stop", "-t", "40", name, timeout=60)
        code = pod.state(name).get("ExitCode")
        check("... and it stops with status 0", stop.returncode == 0 and code == 0, f"exit {code}")
        return [key]
    finally:
        fake.terminate()
        fake.wait(10)


def scenario_no_keys(pod: Podman, check: Check, tag: str) -> None:
    name = f"gemini-proxy-check-{tag}-nokeys"
    pod.names.append(name)
    r = pod.run("run", "--name", name, "--network", "host", *pod.extra, pod.image, timeout=60)
    check(
        "no key file and no GEMINI_API_KEYS: a clear error, exit status 2",
        r.returncode == 2 and "no key file at /etc/gemini-proxy/keys.yaml" in r.stderr,
        f"exit {r.returncode}, stderr {r.stderr[-300:]!r}",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image", default="localhost/gemini-proxy:check")
    parser.add_argument("--podman-arg", action="append", default=[], help="e.g. --runtime=runc")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and the containers")
    args = parser.parse_args()
    if shutil.which("podman") is None:
        print("podman is missing (scripts/check_container installs it)", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gemini-proxy-check-container-"))
    work.chmod(0o755)  # the container's user reads the mounted key file through it
    pod = Podman(args.image, args.podman_arg, args.keep)
    check = Check()
    tag = f"{os.getpid()}"
    secrets_used: list[str] = []
    try:
        secrets_used += scenario_key_file(pod, check, work, tag)
        secrets_used += scenario_env_keys(pod, check, work, tag)
        scenario_no_keys(pod, check, tag)
        leaked = [n for n in pod.names if any(s in pod.logs(n) for s in secrets_used)]
        check("no key secret or admin token in any container log", not leaked, f"in {leaked}")
    except Exception as e:
        check("the check ran to its end", False, repr(e))
    finally:
        pod.cleanup()
        if args.keep:
            print(f"kept: {work} and the containers {', '.join(pod.names)}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in check.results if not r[1]]
    print(
        f"{len(check.results) - len(failed)} passed, {len(failed)} failed"
        f" ({time.monotonic() - t0:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
