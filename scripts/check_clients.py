#!/usr/bin/env python3
"""Third-party clients through the proxy, on loopback only: `scripts/check_clients` runs this.

Two roles in one file (stdlib only at import time):

* the **orchestrator** (the project's .venv): starts the fake Gemini and a real mitmdump with the
  addon on free loopback ports, a pool of two good keys and a dead one, and a client token; runs
  each client below as a subprocess; reads the fake's log to see what reached "Google"; prints
  PASS/FAIL per client and exits non-zero on any FAIL.
* the **client runner** (`--client NAME`, run by the clients' own venv under .cache/clients):
  drives LiteLLM or LangChain against the proxy and prints one JSON line of results.

Clients: `litellm` (LiteLLM as a library: `gemini/` with `api_base=<proxy>/v1beta` and the
OpenAI-compatible `openai/` with `api_base=<proxy>/v1`: unary, streaming, async, JSON schema,
embeddings), `langchain` (ChatGoogleGenerativeAI and GoogleGenerativeAIEmbeddings with
`base_url=<proxy>`; skipped when not installed), `gemini-cli` (Google's Gemini CLI, `gemini -p`,
with `GOOGLE_GEMINI_BASE_URL=<proxy>` and `GEMINI_API_KEY=<client token>`, telemetry, usage
statistics and update checks off in its settings).

Every client runs with a guard that refuses and records any connection to a host other than
loopback (Python: socket.getaddrinfo / connect; Node: net.Socket.connect via --require), so the
check never talks to Google and says so if a client tried; where strace may trace, it also
lists every connect() the Gemini CLI's processes make.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "localhost", "::ffff:127.0.0.1"}
PROMPT = "Say hi"
REPLY = "Hello from fake Gemini."
STREAM_REPLY = "chunk 0 chunk 1 chunk 2 "  # the fake's three SSE events, joined
CLIENTS = ("litellm", "langchain", "gemini-cli")


# --------------------------------------------------------------------------- client runner role


def install_python_guard() -> list[str]:
    """Refuse (and record) every connection that is not to loopback."""
    blocked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is not None and str(name) not in LOOPBACK:
            blocked.append(str(name))
            raise socket.gaierror(socket.EAI_NONAME, f"check_clients: loopback only, not {name}")
        return real_getaddrinfo(host, *args, **kw)

    def allowed(address: Any) -> bool:
        return not isinstance(address, tuple) or str(address[0]) in LOOPBACK

    def connect(self: socket.socket, address: Any) -> None:
        if not allowed(address):
            blocked.append(str(address[0]))
            raise ConnectionRefusedError(f"check_clients: loopback only, not {address[0]}")
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not allowed(address):
            blocked.append(str(address[0]))
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)

    socket.getaddrinfo = getaddrinfo
    setattr(socket.socket, "connect", connect)  # noqa: B010 - mypy: a method replaced on purpose
    setattr(socket.socket, "connect_ex", connect_ex)  # noqa: B010
    return blocked


Step = tuple[str, Callable[[], str]]


def run_steps(steps: list[Step]) -> list[dict[str, Any]]:
    out = []
    for name, fn in steps:
        try:
            out.append({"step": name, "ok": True, "detail": fn()})
        except Exception as e:
            detail = f"{type(e).__name__}: {str(e)[:400]}"
            out.append({"step": name, "ok": False, "detail": detail})
    return out


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise AssertionError(message)


def served_by(response: Any) -> str:
    """The x-gemini-proxy-key header LiteLLM passes on, if it does."""
    hidden = getattr(response, "_hidden_params", None) or {}
    headers = hidden.get("additional_headers") or {}
    name = headers.get("llm_provider-x-gemini-proxy-key") or headers.get("x-gemini-proxy-key")
    return f", x-gemini-proxy-key: {name}" if name else ""


def litellm_steps(base: str, token: str) -> list[Step]:
    import asyncio

    import litellm  # type: ignore[import-not-found,unused-ignore]
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int
        tags: list[str]

    native = {"api_base": f"{base}/v1beta", "api_key": token}
    compat = {"api_base": f"{base}/v1", "api_key": token}
    messages = [{"role": "user", "content": PROMPT}]

    def unary(model: str, kw: dict[str, str]) -> Callable[[], str]:
        def go() -> str:
            r = litellm.completion(model=model, messages=messages, **kw)
            text = r.choices[0].message.content
            expect(text == REPLY, f"text {text!r}")
            return f"text {text!r}{served_by(r)}"

        return go

    def stream(model: str, kw: dict[str, str]) -> Callable[[], str]:
        def go() -> str:
            parts = [
                c.choices[0].delta.content or ""
                for c in litellm.completion(model=model, messages=messages, stream=True, **kw)
            ]
            text = "".join(parts)
            expect(text == STREAM_REPLY, f"streamed {text!r}")
            return f"{len(parts)} chunks, text {text!r}"

        return go

    def structured(model: str, kw: dict[str, str]) -> Callable[[], str]:
        def go() -> str:
            r = litellm.completion(model=model, messages=messages, response_format=Person, **kw)
            text = r.choices[0].message.content
            Person.model_validate_json(text)
            return f"JSON {text}"

        return go

    def embed(model: str, kw: dict[str, str]) -> Callable[[], str]:
        def go() -> str:
            r = litellm.embedding(model=model, input=["one", "two"], **kw)
            sizes = [len(d["embedding"]) for d in r.data]
            expect(sizes == [3, 3], f"embedding sizes {sizes}")
            return f"{len(sizes)} vectors of {sizes[0]}"

        return go

    def async_stream() -> str:
        async def main() -> str:
            out = await litellm.acompletion(
                model="gemini/gemini-2.5-flash", messages=messages, stream=True, **native
            )
            return "".join([c.choices[0].delta.content or "" async for c in out])

        text = asyncio.run(main())
        expect(text == STREAM_REPLY, f"streamed {text!r}")
        return f"text {text!r}"

    def versionless() -> str:
        try:
            litellm.completion(
                model="gemini/gemini-2.5-flash", messages=messages, api_base=base, api_key=token
            )
        except Exception as e:
            expect("add /v1beta" in str(e), f"error without the hint: {str(e)[:300]}")
            return f"{type(e).__name__} that says to add /v1beta to api_base"
        raise AssertionError("a version-less api_base worked?")

    flash = "gemini-2.5-flash"
    return [
        ("gemini/ api_base without /v1beta", versionless),
        ("gemini/ unary", unary(f"gemini/{flash}", native)),
        ("gemini/ stream", stream(f"gemini/{flash}", native)),
        ("gemini/ async stream", async_stream),
        ("gemini/ JSON schema", structured(f"gemini/{flash}", native)),
        ("gemini/ embeddings", embed("gemini/gemini-embedding-001", native)),
        ("openai/ unary", unary(f"openai/{flash}", compat)),
        ("openai/ stream", stream(f"openai/{flash}", compat)),
        ("openai/ JSON schema", structured(f"openai/{flash}", compat)),
        ("openai/ embeddings", embed("openai/gemini-embedding-001", compat)),
    ]


def langchain_steps(base: str, token: str) -> list[Step]:
    from langchain_google_genai import (  # type: ignore[import-not-found,unused-ignore]
        ChatGoogleGenerativeAI,
        GoogleGenerativeAIEmbeddings,
    )

    chat = ChatGoogleGenerativeAI(
        model="gemini-2.5-flash", google_api_key=token, base_url=base, max_retries=0
    )

    def invoke() -> str:
        text = chat.invoke(PROMPT).text
        expect(text == REPLY, f"text {text!r}")
        return f"text {text!r}"

    def stream() -> str:
        parts = [c.text for c in chat.stream(PROMPT)]
        text = "".join(parts)
        expect(text == STREAM_REPLY, f"streamed {text!r}")
        return f"{len(parts)} chunks, text {text!r}"

    def structured() -> str:
        schema = {
            "title": "Person",
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        }
        doc = chat.with_structured_output(schema, method="json_schema").invoke(PROMPT)
        expect(isinstance(doc, dict) and set(doc) == {"name", "age"}, f"parsed {doc!r}")
        return f"parsed {json.dumps(doc)}"

    def embed() -> str:
        emb = GoogleGenerativeAIEmbeddings(
            model="gemini-embedding-001", google_api_key=token, base_url=base
        )
        vectors = emb.embed_documents(["one", "two"])
        expect([len(v) for v in vectors] == [3, 3], f"vectors {vectors!r}")
        return f"{len(vectors)} vectors of 3"

    return [
        ("chat invoke", invoke),
        ("chat stream", stream),
        ("structured output", structured),
        ("embeddings", embed),
    ]


def client_main(args: argparse.Namespace) -> int:
    blocked = install_python_guard()
    result: dict[str, Any] = {"client": args.client}
    try:
        make = {"litellm": litellm_steps, "langchain": langchain_steps}[args.client]
        steps = make(args.base, args.token)
    except ImportError as e:
        result.update(skipped=f"not installed ({e.name})", steps=[])
    except Exception:
        result.update(error=traceback.format_exc(limit=3), steps=[])
    else:
        result["steps"] = run_steps(steps)
    result["blocked"] = sorted(set(blocked))
    print("CHECK-CLIENTS-RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- orchestrator role

NODE_GUARD = r"""
// check_clients: refuse (and record) any TCP connection that is not to loopback.
const net = require('net');
const fs = require('fs');
const LOOPBACK = new Set(['127.0.0.1', '::1', 'localhost', '::ffff:127.0.0.1']);
const realConnect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  let opts = args[0];
  if (Array.isArray(opts)) opts = opts[0];
  let host, path;
  if (opts !== null && typeof opts === 'object') { host = opts.host; path = opts.path; }
  else if (typeof opts === 'string' && isNaN(Number(opts))) { path = opts; }
  else { host = typeof args[1] === 'string' ? args[1] : undefined; }
  if (path == null && host != null && !LOOPBACK.has(String(host))) {
    try { fs.appendFileSync(process.env.CHECK_CLIENTS_GUARD_LOG, String(host) + '\n'); } catch (e) {}
    const err = Object.assign(new Error('check_clients: loopback only, not ' + host),
                              { code: 'ECONNREFUSED' });
    process.nextTick(() => this.destroy(err));
    return this;
  }
  return realConnect.apply(this, args);
};
"""

CLI_SETTINGS = {
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    # The CLI derives "gateway" auth from GOOGLE_GEMINI_BASE_URL, which its own non-interactive
    # validation then rejects ("Invalid auth method selected."); API-key auth keeps the base URL.
    "security": {"auth": {"selectedType": "gemini-api-key"}},
    "advanced": {"autoConfigureMemory": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without proxies or any Gemini/Google credentials."""
    drop = ("_proxy", "_PROXY", "GEMINI_", "GOOGLE_", "LITELLM_", "OPENAI_", "NODE_OPTIONS")
    env = {k: v for k, v in os.environ.items() if not any(p in k for p in drop)}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


@dataclass
class Outcome:
    client: str
    ok: bool = True
    skipped: str | None = None
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, cond: bool, good: str, bad: str | None = None) -> None:
        self.lines.append(("ok    " if cond else "FAIL  ") + (good if cond else bad or good))
        self.ok = self.ok and cond


class Rig:
    """The fake Gemini and a real mitmdump running the addon in front of it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.good = {"pool-a": self.secret(), "pool-b": self.secret()}
        self.dead = {"pool-dead": self.secret()}
        self.names = {v: k for k, v in {**self.good, **self.dead}.items()}
        self.token = "sk-check-clients-" + secrets.token_hex(12)
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def secret() -> str:
        return "AIzaSy" + secrets.token_urlsafe(26)[:33]

    def start(self) -> None:
        port_file = self.work / "fake.port"
        keys = ",".join(
            [f"{s}=ok" for s in self.good.values()] + [f"{s}=dead" for s in self.dead.values()]
        )
        self.spawn(
            [sys.executable, str(ROOT / "scripts" / "fake_gemini.py"), "--port", "0",
             "--port-file", str(port_file), "--keys", keys],
            self.work / "fake.log",
        )  # fmt: skip
        wait_for("the fake Gemini", lambda: port_file.exists() and port_file.read_text() != "")
        self.fake = f"http://127.0.0.1:{port_file.read_text().strip()}"
        self.port, admin = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        keys_file = self.work / "keys.yaml"
        entries = [f"  - {{name: {n}, key: {s}}}" for n, s in {**self.good, **self.dead}.items()]
        keys_file.write_text(
            "keys:\n" + "\n".join(entries) + "\n"
            f"clients:\n  - {{name: check-clients, token: {self.token}}}\n"
        )
        bin_dir = Path(sys.executable).parent
        self.proxy_log = self.work / "proxy.log"
        self.spawn(
            [str(bin_dir / "mitmdump"), "-s", str(ROOT / "addon" / "gemini_proxy.py"),
             "--mode", f"reverse:{self.fake}", "--listen-host", "127.0.0.1", "-p", str(self.port),
             "--set", f"gemini_keys={keys_file}", "--set", f"gemini_db={self.work / 'state.db'}",
             "--set", f"gemini_admin=127.0.0.1:{admin}"],
            self.proxy_log,
        )  # fmt: skip
        wait_for("the proxy", lambda: http(f"http://127.0.0.1:{admin}/healthz") is not None)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2):
            pass

    def spawn(self, cmd: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            self.procs.append(
                subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                    cwd=self.work, start_new_session=True,
                )
            )  # fmt: skip

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def reset(self) -> None:
        http(f"{self.fake}/_fake/reset", "POST")

    def fake_log(self) -> list[dict[str, Any]]:
        return list(http(f"{self.fake}/_fake/log"))

    def judge(self, out: Outcome, expected: list[str]) -> None:
        """What reached the fake: the expected calls, served by good keys, never the token."""
        log = self.fake_log()
        calls = [
            e for e in log if not (e["path"] == "/v1beta/models" and "pageSize=1" in e["query"])
        ]
        served = [e for e in calls if e["key"] in self.good.values() and e["status"] == 200]
        retried = [e for e in calls if e["key"] in self.dead.values()]
        failed = [e for e in calls if e not in served and e not in retried]
        seen = sorted({f"{e['method']} {e['path']}" for e in served})
        missing = [x for x in expected if x not in seen]
        out.check(bool(served) and not missing, f"reached the fake: {', '.join(seen)}",
                  f"expected at the fake {missing}, saw {seen}")  # fmt: skip
        by_key: dict[str, int] = {}
        for e in served:
            by_key[self.names[e["key"]]] = by_key.get(self.names[e["key"]], 0) + 1
        out.check(not failed, "served by " + ", ".join(f"{k} ×{n}" for k, n in sorted(by_key.items()))
                  + (f"; {len(retried)} attempt(s) on pool-dead retried elsewhere" if retried else ""),
                  "not served: " + "; ".join(f"{e['method']} {e['path']} → {e['status']}"
                                             f" ({self.names.get(e['key'], 'not a pool key')})"
                                             for e in failed))  # fmt: skip
        leaked = [e for e in log if self.token in json.dumps(e)]
        out.check(not leaked, "the client token never reached the fake",
                  f"the client token reached the fake in {len(leaked)} request(s)")  # fmt: skip


def judge_python_client(rig: Rig, out: Outcome, doc: dict[str, Any], expected: list[str]) -> None:
    if doc.get("skipped"):
        out.skipped = doc["skipped"]
        return
    if doc.get("error"):
        out.check(False, "", f"client failed to start:\n{doc['error']}")
        return
    for step in doc["steps"]:
        out.check(step["ok"], f"{step['step']}: {step['detail']}")
    rig.judge(out, expected)
    out.check(not doc["blocked"], "no connection outside loopback",
              f"tried to reach (refused): {', '.join(doc['blocked'])}")  # fmt: skip


def run_python_client(rig: Rig, name: str, venv: Path, expected: list[str]) -> Outcome:
    out = Outcome(name)
    python = venv / "bin" / "python"
    if not python.exists():
        out.check(False, "", f"{python} is missing (scripts/check_clients installs it)")
        return out
    rig.reset()
    env = clean_env(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR")
    cmd = [str(python), __file__, "--client", name, "--base", rig.url, "--token", rig.token]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=rig.work, timeout=300)
    (rig.work / f"{name}.out").write_text(proc.stdout + proc.stderr)
    line = next(
        (x for x in proc.stdout.splitlines() if x.startswith("CHECK-CLIENTS-RESULT ")), None
    )
    if line is None:
        out.check(False, "", f"no result (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return out
    judge_python_client(rig, out, json.loads(line.split(" ", 1)[1]), expected)
    return out


def strace_works() -> bool:
    """strace is installed and may trace here (containers often forbid ptrace)."""
    if not shutil.which("strace"):
        return False
    probe = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", os.devnull, "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


def run_gemini_cli(rig: Rig, node_dir: Path, node: str) -> Outcome:
    out = Outcome("gemini-cli")
    if not shutil.which(node):
        out.check(
            False,
            "",
            f"no {node} (Node >= 20; set CHECK_CLIENTS_NODE, or --only litellm,langchain)",
        )
        return out
    entry = node_dir / "node_modules" / "@google" / "gemini-cli" / "bundle" / "gemini.js"
    if not entry.exists():
        out.check(False, "", f"{entry} is missing (scripts/check_clients installs it)")
        return out
    version = json.loads((entry.parent.parent / "package.json").read_text())["version"]
    home, workspace = rig.work / "cli-home", rig.work / "cli-workspace"
    (home / ".gemini").mkdir(parents=True, exist_ok=True)
    workspace.mkdir(exist_ok=True)
    (home / ".gemini" / "settings.json").write_text(json.dumps(CLI_SETTINGS, indent=2))
    guard, guard_log = rig.work / "guard.cjs", rig.work / "cli-blocked.txt"
    guard.write_text(NODE_GUARD)
    guard_log.write_text("")
    env = clean_env(
        HOME=str(home),
        GEMINI_API_KEY=rig.token,
        GOOGLE_GEMINI_BASE_URL=rig.url,
        GEMINI_CLI_TRUST_WORKSPACE="true",
        NODE_OPTIONS=f"--require {guard}",
        CHECK_CLIENTS_GUARD_LOG=str(guard_log),
        TERM="dumb",
        NO_COLOR="1",
    )
    rig.reset()
    cmd = [node, str(entry), "-p", PROMPT, "--output-format", "json"]
    trace = rig.work / "cli-connect.strace"
    if strace_works():  # a second witness, below Node: every connect() of every process
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *cmd]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=workspace, timeout=180
        )
    except subprocess.TimeoutExpired:
        out.check(False, "", "gemini -p did not finish within 180 s")
        return out
    (rig.work / "gemini-cli.out").write_text(proc.stdout + "\n--- stderr\n" + proc.stderr)
    try:
        doc = json.loads(proc.stdout[proc.stdout.index("{") :])
    except ValueError:
        doc = {}
    text = str(doc.get("response", "")).strip()
    out.check(
        proc.returncode == 0 and text == STREAM_REPLY.strip(),
        f"gemini {version} -p {PROMPT!r}: exit 0, answer {text!r}",
        f"gemini {version} -p: exit {proc.returncode}, answer {text!r}\n{proc.stderr[-1500:]}",
    )
    trouble = [
        line.strip()
        for line in proc.stderr.splitlines()
        if "failed" in line.lower() or "error when talking" in line.lower()
    ]
    errors = sum(
        int(m.get("api", {}).get("totalErrors", 0))
        for m in (doc.get("stats", {}).get("models", {}) or {}).values()
    )
    out.check(
        not trouble and errors == 0,
        "no failed call in its stats or on stderr (routing classifier included)",
        f"{errors} API error(s) in its stats; stderr: {' | '.join(trouble)[:800]}",
    )
    log = rig.fake_log()
    routing = [
        e
        for e in log
        if e["path"].endswith(":generateContent") and "responseJsonSchema" in e["body"]
    ]
    out.check(bool(routing) and all(e["status"] == 200 for e in routing),
              f"its routing call (JSON mode, responseJsonSchema) answered 200 ×{len(routing)}",
              f"routing calls: {[(e['model'], e['status']) for e in routing]}")  # fmt: skip
    models = sorted({str(e["model"]) for e in log if e["model"]})
    out.lines.append(f"ok    models asked for: {', '.join(models)}")
    rig.judge(out, [])
    blocked = sorted(set(filter(None, guard_log.read_text().splitlines())))
    if trace.exists():
        peers = re.findall(
            r'sin6?_addr=inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"', trace.read_text()
        )
        outside = sorted({p for p in peers if p not in LOOPBACK})
        blocked += [f"{p} (connect() seen by strace)" for p in outside]
        out.lines.append(
            f"ok    strace: {len(peers)} TCP connect(s), all to loopback"
            if not outside
            else "FAIL  strace saw connect() outside loopback"
        )
    out.check(not blocked, "no connection outside loopback (telemetry, usage stats, updates off)",
              f"tried to reach (refused): {', '.join(blocked)}")  # fmt: skip
    return out


def orchestrate(args: argparse.Namespace) -> int:
    chosen = [c.strip() for c in args.only.split(",")] if args.only else list(CLIENTS)
    unknown = [c for c in chosen if c not in CLIENTS]
    if unknown:
        print(f"unknown client(s) {unknown}; choose from {', '.join(CLIENTS)}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="check-clients-"))
    rig = Rig(work)
    outcomes: list[Outcome] = []
    try:
        try:
            rig.start()
        except Exception as e:
            logs = "".join(p.read_text(errors="replace")[-3000:] for p in work.glob("*.log"))
            print(f"FAIL  could not start the fake and the proxy: {e}\n{logs}")
            return 1
        print(
            f"fake Gemini {rig.fake}, proxy {rig.url} (keys pool-a, pool-b, pool-dead), work dir {work}"
        )

        def native(version: str) -> list[str]:
            return [
                f"POST /{version}/models/gemini-2.5-flash:generateContent",
                f"POST /{version}/models/gemini-2.5-flash:streamGenerateContent",
                f"POST /{version}/models/gemini-embedding-001:batchEmbedContents",
            ]

        expected = {
            # LiteLLM's gemini/ route speaks v1beta (from api_base), its openai/ route the
            # OpenAI-compatible API the proxy maps /v1/ to; LangChain's google-genai client v1.
            "litellm": [
                *native("v1beta"),
                "POST /v1beta/openai/chat/completions",
                "POST /v1beta/openai/embeddings",
            ],
            "langchain": native("v1"),
        }
        for client in chosen:
            started = time.monotonic()
            if client == "gemini-cli":
                outcome = run_gemini_cli(rig, args.node_dir, args.node)
            else:
                outcome = run_python_client(rig, client, args.venv, expected[client])
            outcome.seconds = time.monotonic() - started
            outcomes.append(outcome)
            verdict = "SKIP" if outcome.skipped else "PASS" if outcome.ok else "FAIL"
            print(
                f"\n{verdict}  {client}  ({outcome.seconds:.1f} s)"
                + (f": {outcome.skipped}" if outcome.skipped else "")
            )
            for line in outcome.lines:
                print("  " + line.replace("\n", "\n        "))
    finally:
        rig.stop()
    proxy_log = rig.proxy_log.read_text(errors="replace")
    secrets_seen = [s for s in [*rig.good.values(), *rig.dead.values()] if s in proxy_log]
    if secrets_seen:
        print("\nFAIL  a pool key appears in the proxy's log")
    failed = [o.client for o in outcomes if not o.ok] + (["proxy log"] if secrets_seen else [])
    keep = bool(failed) or args.keep
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    verdict = "FAIL: " + ", ".join(failed) if failed else "all clients PASS"
    print(f"\n{verdict}" + (f" (logs and client output in {work})" if keep else ""))
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help=f"comma list of clients ({', '.join(CLIENTS)})")
    parser.add_argument("--keep", action="store_true", help="keep the work dir even when all pass")
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "clients" / "venv")
    parser.add_argument("--node-dir", type=Path, default=ROOT / ".cache" / "clients" / "node")
    parser.add_argument("--node", default="node", help="the node binary for the Gemini CLI")
    parser.add_argument("--client", choices=["litellm", "langchain"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return client_main(args) if args.client else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
