"""Clients as tenants and budgets through `./scripts/run --workers 2`, as an operator runs it: HAProxy in front
of two mitmdump workers sharing one pool on Redis. Requests alternate between the workers, so
every check here holds across them: owners, a group's list, client limits, a project's budget
and the gate.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from ..conftest import Fake, free_port, new_secret, wait_for
from .test_first_run import Run

pytestmark = pytest.mark.timeout(180)

FLASH = "gemini-2.5-flash"
PRO = "gemini-2.5-pro"
GENERATE = f"/v1beta/models/{FLASH}:generateContent"
ALICE, CAROL, BOB = "tok-run-alice-1", "tok-run-carol-1", "tok-run-bob-1"


def upload(proxy: str, token: str, data: bytes) -> str:
    """A resumable upload through the proxy: start, then the bytes (both via HAProxy)."""
    start = httpx.post(
        f"{proxy}/upload/v1beta/files",
        headers={
            "x-goog-api-key": token,
            "x-goog-upload-protocol": "resumable",
            "x-goog-upload-command": "start",
        },
        json={"file": {"display_name": "report"}},
        timeout=30,
    )
    assert start.status_code == 200, start.text
    url = start.headers["x-goog-upload-url"]
    assert url.startswith(proxy)
    done = httpx.post(
        url,
        headers={"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
        content=data,
        timeout=30,
    )
    assert done.status_code == 200, done.text
    return str(done.json()["file"]["name"])


def free_run(n: int) -> int:
    """The first of `n` consecutive free ports (the workers and their admin ports are numbered
    from one), none of them the fake's or another's."""
    while True:
        first = free_port()
        ports = range(first, first + n)
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def ready(r: Run, url: str) -> bool:
    assert r.proc.poll() is None, r.output()[-4000:]
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def answers(r: Run, url: str) -> int:
    assert r.proc.poll() is None, r.output()[-4000:]
    try:
        return httpx.post(url, json={}, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_tenants_limits_and_budgets_hold_across_two_workers_behind_haproxy(
    tmp_path: Path, fake: Fake
) -> None:
    a, b = new_secret(), new_secret()
    fake.configure({a: "ok", b: "ok"}, projects={a: "p1", b: "p2"})
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "a", "key": a, "project": "p1"},
                    {"name": "b", "key": b, "project": "p2"},
                ],
                # a tiny daily budget for pro on each project, spent across both workers
                "projects": [
                    {"name": "p1", "limits": {PRO: {"rpd": 2}}},
                    {"name": "p2", "limits": {PRO: {"rpd": 2}}},
                ],
                "clients": [
                    {"name": "alice", "token": ALICE, "group": "team-a", "limits": {"rpm": 12}},
                    {"name": "carol", "token": CAROL, "group": "team-a"},
                    {"name": "bob", "token": BOB},
                ],
            }
        )
    )
    port, workers_at, admin = free_port(), free_run(2), free_run(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMINI_")}
    env |= {
        "GEMINI_KEYS_FILE": str(keys),
        "GEMINI_UPSTREAM": fake.url,
        "GEMINI_PROXY_PORT": str(port),
        "GEMINI_WORKER_PORT": str(workers_at),
        "GEMINI_ADMIN": f"127.0.0.1:{admin}",
        "GEMINI_ADMIN_TOKEN": "admin-run-workers",
        "GEMINI_RUN_DIR": str(tmp_path / "run"),
    }
    r = Run(tmp_path, env, ["--workers", "2"])
    try:
        proxy = f"http://127.0.0.1:{port}"
        admins = [f"127.0.0.1:{admin}", f"127.0.0.1:{admin + 1}"]
        for adm in admins:  # both workers ready, each on the shared pool
            wait_for(lambda adm=adm: ready(r, f"http://{adm}/readyz"), timeout=90)
        # the gate, through HAProxy (which starts once the workers are ready)
        wait_for(lambda: answers(r, proxy + GENERATE) == 401, timeout=60)

        # alice's file: her group sees it on both workers; bob never, and nothing goes upstream
        name = upload(proxy, ALICE, b"quarterly numbers")
        for token in (ALICE, CAROL, ALICE, CAROL):
            got = httpx.get(f"{proxy}/v1beta/{name}", headers={"x-goog-api-key": token}, timeout=30)
            assert got.status_code == 200, got.text
        before = len(fake.log())
        for _ in range(4):  # both workers
            refused = httpx.get(
                f"{proxy}/v1beta/{name}", headers={"x-goog-api-key": BOB}, timeout=30
            )
            assert refused.status_code == 404
            assert refused.json()["error"]["status"] == "NOT_FOUND"
            used = httpx.post(
                proxy + GENERATE,
                headers={"x-goog-api-key": BOB},
                json={
                    "contents": [{"parts": [{"fileData": {"fileUri": f"https://x/v1beta/{name}"}}]}]
                },
                timeout=30,
            )
            assert used.status_code == 404
        assert len(fake.log()) == before
        listed = httpx.get(f"{proxy}/v1beta/files", headers={"x-goog-api-key": BOB}, timeout=30)
        assert listed.status_code == 200 and listed.json().get("files", []) == []
        mine = httpx.get(f"{proxy}/v1beta/files", headers={"x-goog-api-key": CAROL}, timeout=30)
        assert [f["name"] for f in mine.json()["files"]] == [name]

        # alice's rpm 12 holds across the workers (each worker holds a share of it; the few
        # requests above stay well inside any split): past it, 429 with Retry-After, nothing upstream
        statuses = []
        for _ in range(30):
            g = httpx.post(
                proxy + GENERATE,
                headers={"x-goog-api-key": ALICE},
                json={"contents": [{"parts": [{"text": "hi"}]}]},
                timeout=30,
            )
            statuses.append(g.status_code)
            if g.status_code == 429:
                assert int(g.headers["retry-after"]) >= 1
                assert "client limit rpm 12" in json.dumps(g.json())
        # she already spent some of her minute above (gets, a list, an upload)
        assert 429 in statuses and set(statuses) <= {200, 429}
        # bob is not slowed by alice's limit
        ok = httpx.post(
            proxy + GENERATE,
            headers={"x-goog-api-key": BOB},
            json={"contents": [{"parts": [{"text": "hi"}]}]},
            timeout=30,
        )
        assert ok.status_code == 200

        # pro's budget (2 a day on each project) is spent across both workers: 4 served, then the
        # proxy answers 429 itself, with nothing upstream (each worker hears the other's spends)
        def spent(adm: str) -> int:
            rows = httpx.get(
                f"http://{adm}/admin/budgets",
                headers={"authorization": "Bearer admin-run-workers"},
                timeout=10,
            ).json()["budgets"]
            return sum(r["requests_today"] for r in rows if r["model"] == PRO)

        pro = f"/v1beta/models/{PRO}:generateContent"
        for n in range(1, 5):
            served = httpx.post(
                proxy + pro,
                headers={"x-goog-api-key": BOB},
                json={"contents": [{"parts": [{"text": "hi"}]}]},
                timeout=30,
            )
            assert served.status_code == 200, served.text
            for adm in admins:
                wait_for(lambda adm=adm, n=n: spent(adm) == n, timeout=10)
        before = len(fake.log())
        for _ in range(2):  # both workers
            out = httpx.post(
                proxy + pro,
                headers={"x-goog-api-key": BOB},
                json={"contents": [{"parts": [{"text": "hi"}]}]},
                timeout=30,
            )
            assert out.status_code == 429 and int(out.headers["retry-after"]) >= 1
        assert len(fake.log()) == before
        clients = httpx.get(
            f"http://{admins[0]}/admin/clients",
            headers={"authorization": "Bearer admin-run-workers"},
            timeout=10,
        ).json()
        assert clients["workers"] == 2 and clients["shared"] is True
    finally:
        status = r.stop()
    assert status == 0, r.output()[-4000:]
