"""The first five minutes: ./scripts/run as a new user drives it, and no request without the gate.

Real scripts/run and mitmdump processes in front of the fake Gemini; every process bounded in time.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from ..conftest import MITMDUMP, ROOT, Fake, free_port, new_secret, wait_for

RUN = str(ROOT / "scripts" / "run")
GENERATE = "/v1beta/models/gemini-2.5-flash:generateContent"
BODY = {"contents": [{"parts": [{"text": "hi"}]}]}


def keys_file(tmp_path: Path, fake: Fake) -> tuple[Path, str]:
    secret = new_secret()
    fake.configure({secret: "ok"})
    path = tmp_path / "keys.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "keys": [{"name": "k1", "key": secret}],
                "clients": [{"name": "app", "token": "tok-first-run-1"}],
            }
        )
    )
    return path, secret


def base_env(tmp_path: Path, keys: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMINI_")}
    env.update(
        GEMINI_PROXY_PORT=str(free_port()),
        GEMINI_ADMIN=f"127.0.0.1:{free_port()}",
        GEMINI_ADMIN_TOKEN="admin-first-run",
    )
    if keys is not None:
        env["GEMINI_KEYS_FILE"] = str(keys)
    env.update(extra)
    return env


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """./scripts/run in its own session, output to a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], args: list[str]) -> None:
        self.log = tmp_path / "run.log"
        self.env = env
        self.port = int(env["GEMINI_PROXY_PORT"])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [RUN, *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # as in a terminal: a suite started in the background (`cmd &` in a script) runs
                # with SIGINT ignored, and a shell cannot trap a signal ignored when it started
                preexec_fn=_interruptible,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, admin: str) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.output()
            return httpx.get(f"http://{admin}/healthz", timeout=0.5).status_code == 200

        wait_for(up, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # a Ctrl-C in its terminal
        try:
            return self.proc.wait(60)  # past the drain's own bound (30 s): a hang, not a drain
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for r in started:
        r.stop()


def finished(tmp_path: Path, env: dict[str, str], args: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ./scripts/run that is expected to stop by itself: its status and output."""
    p = subprocess.Popen(
        [RUN, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:  # it did not stop: nothing of it may outlive the test
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    return p.returncode, out.decode(errors="replace")


def test_run_takes_gemini_upstream_and_the_users_own_options(
    tmp_path: Path, fake: Fake, runs: list[Run]
) -> None:
    keys, secret = keys_file(tmp_path, fake)
    admin = f"127.0.0.1:{free_port()}"
    env = base_env(tmp_path, keys, GEMINI_UPSTREAM=fake.url)
    # options scripts/run sets itself: the user's value wins, nothing is given twice
    r = Run(
        tmp_path,
        env,
        ["--set", f"gemini_admin={admin}", "--set", f"gemini_db={tmp_path / 'state.db'}"],
    )
    runs.append(r)
    r.wait_listening(admin)
    assert "Received multiple values" not in r.output()
    proxy = f"http://127.0.0.1:{r.port}"
    before = len(fake.log())
    refused = httpx.post(
        proxy + GENERATE, json=BODY, headers={"x-goog-api-key": "nope"}, timeout=30
    )
    assert refused.status_code == 401 and len(fake.log()) == before  # the gate is there
    ok = httpx.post(
        proxy + GENERATE, json=BODY, headers={"x-goog-api-key": "tok-first-run-1"}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    assert fake.log()[-1]["key"] == secret  # GEMINI_UPSTREAM: the fake served it, with the pool key
    assert (tmp_path / "state.db").exists()
    assert r.stop() == 0, r.output()[-4000:]
    assert "still in flight" not in r.output()  # nothing the drain had to wait for


def test_run_takes_the_users_mode_instead_of_its_own(
    tmp_path: Path, fake: Fake, runs: list[Run]
) -> None:
    keys, _ = keys_file(tmp_path, fake)
    env = base_env(tmp_path, keys)
    port = free_port()
    r = Run(
        tmp_path,
        env,
        ["--mode", f"reverse:{fake.url}@{port}", "--set", f"gemini_db={tmp_path / 'state.db'}"],
    )
    runs.append(r)
    r.wait_listening(env["GEMINI_ADMIN"])
    ok = httpx.post(
        f"http://127.0.0.1:{port}{GENERATE}",
        json=BODY,
        headers={"x-goog-api-key": "tok-first-run-1"},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text
    assert "Cannot spawn multiple servers" not in r.output()
    assert r.stop() == 0, r.output()[-4000:]
    assert "still in flight" not in r.output()  # nothing the drain had to wait for


def test_busy_ports_name_the_variable_that_moves_them(tmp_path: Path, fake: Fake) -> None:
    keys, _ = keys_file(tmp_path, fake)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        code, out = finished(tmp_path, base_env(tmp_path, keys, GEMINI_PROXY_PORT=str(taken)))
        assert code == 2 and f"port {taken}" in out and "GEMINI_PROXY_PORT" in out, out
        assert "@" not in out  # not mitmproxy's --mode hint
        code, out = finished(tmp_path, base_env(tmp_path, keys, GEMINI_ADMIN=f"127.0.0.1:{taken}"))
        assert code == 2 and f"127.0.0.1:{taken}" in out and "GEMINI_ADMIN" in out, out


def test_a_keys_file_that_does_not_exist_is_an_error_not_the_demo(tmp_path: Path) -> None:
    missing = tmp_path / "my-keys.yaml"
    code, out = finished(tmp_path, base_env(tmp_path, missing))
    assert code == 2 and str(missing) in out and "does not exist" in out, out
    assert "DEMO" not in out


def test_a_yaml_error_is_one_line_before_anything_listens(tmp_path: Path) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - {name: a, key: AIzaSy\n")
    code, out = finished(tmp_path, base_env(tmp_path, bad))
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out
    assert "cannot start" in lines[0] and f"{bad}:3" in lines[0] and "YAML" in lines[0]
    assert "Traceback" not in out and "listening" not in out


def mitmdump(tmp_path: Path, fake: Fake, keys: Path, *sets: str) -> subprocess.Popen[bytes]:
    cmd = [MITMDUMP, "-s", str(ROOT / "addon" / "gemini_proxy.py")]
    cmd += ["--mode", f"reverse:{fake.url}", "--listen-host", "127.0.0.1"]
    cmd += ["-p", str(free_port()), "--set", f"gemini_keys={keys}"]
    cmd += ["--set", f"gemini_db={tmp_path / 'state.db'}"]
    if not any(s.startswith("gemini_admin=") for s in sets):
        cmd += ["--set", f"gemini_admin=127.0.0.1:{free_port()}"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)


@pytest.mark.parametrize(
    ("sets", "said"),
    [
        # given twice: mitmproxy's deferred options fail where nobody sees it
        (("gemini_admin=127.0.0.1:{a}", "gemini_admin=127.0.0.1:{b}"), "Received multiple values"),
        (("gemini_max_body=lots",), "--set gemini_max_body"),  # a value that does not parse
        (("gemini_admn=127.0.0.1:{a}",), "no such option: gemini_admn"),  # a typo
    ],
)
def test_an_option_that_cannot_apply_stops_mitmdump(
    tmp_path: Path, fake: Fake, sets: tuple[str, ...], said: str
) -> None:
    keys, _ = keys_file(tmp_path, fake)
    before = len(fake.log())
    ports: dict[str, Any] = {"a": free_port(), "b": free_port()}
    p = mitmdump(tmp_path, fake, keys, *(s.format(**ports) for s in sets))
    try:
        out = p.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert p.returncode == 1, out
    assert "gemini-proxy: cannot start:" in out and said in out, out
    assert len(fake.log()) == before


def test_a_key_file_that_does_not_load_stops_mitmdump_in_one_line(
    tmp_path: Path, fake: Fake
) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - {name: a, key: AIzaSy\n")
    p = mitmdump(tmp_path, fake, bad)
    try:
        out = p.communicate(timeout=60)[0].decode(errors="replace")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert p.returncode == 1, out
    assert "gemini-proxy: cannot start: gemini_keys:" in out and "Traceback" not in out, out


def test_just_web_stopped_by_ctrl_c_stops_cleanly(tmp_path: Path, fake: Fake) -> None:
    """In a terminal (a pty here), Ctrl-C stops `just web` with status 0 and no complaint."""
    keys, _ = keys_file(tmp_path, fake)
    env = base_env(tmp_path, keys, GEMINI_UPSTREAM=fake.url)
    admin = env["GEMINI_ADMIN"]
    args = ["--set", f"web_port={free_port()}", "--set", "web_open_browser=false"]
    args += ["--set", f"gemini_db={tmp_path / 'state.db'}"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: just in the pty's session, as from a terminal
        os.chdir(ROOT)
        _interruptible()
        os.execve(str(Path(MITMDUMP).parent / "just"), ["just", "web", *args], env)
    out = bytearray()

    def read(seconds: float) -> bool:
        """Collect output for `seconds`; False once the terminal closed."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([fd], [], [], 0.05)[0]:
                try:
                    out.extend(os.read(fd, 65536))
                except OSError:
                    return False
        return True

    def healthy() -> bool:
        read(0.1)
        return httpx.get(f"http://{admin}/healthz", timeout=0.5).status_code == 200

    try:
        wait_for(healthy, timeout=60)
        os.write(fd, b"\x03")  # Ctrl-C
        deadline = time.monotonic() + 40
        status = (0, 0)
        while time.monotonic() < deadline:
            if not read(0.2):
                time.sleep(0.05)  # the terminal closed: the process is ending
            status = os.waitpid(pid, os.WNOHANG)
            if status[0]:
                break
        if status[0] == 0:  # still running after 40 s: stop it, and fail
            os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.WIFEXITED(status[1]) and os.WEXITSTATUS(status[1]) == 0, text
    assert "interrupted" not in text and "terminated" not in text and "signal 2" not in text, text
    assert "stopped." in text  # mitmweb's listener closed: it really ran and stopped


def test_a_script_reload_that_fails_leaves_every_request_refused(
    tmp_path: Path, fake: Fake
) -> None:
    """mitmproxy reloads an edited entry script; if the new one fails to load it would serve on as
    a plain reverse proxy. The guard leaves a fallback that refuses every flow instead."""
    keys, secret = keys_file(tmp_path, fake)
    entry = tmp_path / "entry.py"
    good = (
        f"import sys\nsys.path.insert(0, {str(ROOT / 'addon')!r})\n"
        + (ROOT / "addon" / "gemini_proxy.py").read_text()
    )
    entry.write_text(good)
    port, admin = free_port(), free_port()
    cmd = [MITMDUMP, "-s", str(entry), "--mode", f"reverse:{fake.url}", "--listen-host"]
    cmd += ["127.0.0.1", "-p", str(port), "--set", f"gemini_keys={keys}"]
    cmd += [
        "--set",
        f"gemini_db={tmp_path / 'state.db'}",
        "--set",
        f"gemini_admin=127.0.0.1:{admin}",
    ]
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}{GENERATE}"
    token = {"x-goog-api-key": "tok-first-run-1"}

    def status() -> int:
        return httpx.post(url, json=BODY, headers=token, timeout=30).status_code

    def touch(text: str) -> None:
        entry.write_text(text)
        later = time.time() + 5  # mitmproxy compares mtimes: make the change unmistakable
        os.utime(entry, (later, later))

    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=0.5), 60)
        assert status() == 200
        touch("raise ImportError('broken on purpose')\n")
        wait_for(lambda: "broken on purpose" in log.read_text(errors="replace"), 30)
        before = len(fake.log())
        r = httpx.post(url, json=BODY, headers=token, timeout=30)
        assert r.status_code == 503 and b"not configured" in r.content
        assert len(fake.log()) == before  # nothing went upstream
        assert p.poll() is None
        touch(good)  # fixed: the reloaded script takes effect and the fallback goes
        wait_for(lambda: status() == 200, 30)
        assert fake.log()[-1]["key"] == secret
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
