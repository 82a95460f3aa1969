"""scripts/deploy/: the Prometheus alerts pass promtool's check and their unit tests, the Grafana
dashboard's queries parse, and every gemini_proxy_* metric either names is on a live /metrics.

promtool comes from Debian's `prometheus` package (./scripts/test installs it on first use)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import ROOT, Fake, key_entry, new_secret
from .test_proxy import FLASH, post

DEPLOY = ROOT / "scripts" / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "gemini-proxy.json"
METRIC_RE = re.compile(r"\bgemini_proxy_[a-z0-9_]+")
# Grafana's variables, replaced by what a query would see, so promtool can parse the query
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing (./scripts/test installs Debian's prometheus package)")
    return exe


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_the_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = run_promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tested = run_promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has at least one unit test that expects it to fire
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    alerts = {r["alert"] for r in rules}
    fired = {
        case["alertname"]
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts and alerts == fired, f"alerts without a firing test: {alerts - fired}"


def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The check above can fail: promtool refuses a rule with a PromQL error."""
    broken = ALERTS.read_text().replace("== 0\n", "== \n", 1)
    (tmp_path / "alerts.yml").write_text(broken)
    assert run_promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode != 0


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "queries.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    check = run_promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def exposed_names(metrics_text: str) -> set[str]:
    """Every sample name /metrics can carry, from its `# TYPE` lines (one per family, present
    before any sample): a histogram's _bucket/_sum/_count, a counter's name as written (_total)."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        m = re.fullmatch(r"# TYPE (\S+) (\w+)", line)
        if not m:
            continue
        name, kind = m.groups()
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_every_metric_the_alerts_and_the_dashboard_name_is_on_a_live_metrics(
    fake: Fake, make_proxy: Any
) -> None:
    good, dead = new_secret(), new_secret()
    fake.configure({good: "ok", dead: "dead"})
    proxy = make_proxy([key_entry("dead", dead, weight=10), key_entry("good", good)])
    # some traffic, so that labelled series exist too: one served after a dead key, one stream
    assert post(proxy, f"/v1beta/models/{FLASH}:generateContent").status_code == 200
    assert post(proxy, f"/v1beta/models/{FLASH}:streamGenerateContent?alt=sse").status_code == 200
    text = proxy.metrics()
    exposed = exposed_names(text)
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert "gemini_proxy_upstream_latency_seconds_bucket" in samples
    assert "gemini_proxy_upstream_requests_total" in samples

    named = {
        "alerts.yml": set(METRIC_RE.findall(ALERTS.read_text())),
        "alerts_test.yml": set(METRIC_RE.findall(ALERTS_TEST.read_text())),
        "gemini-proxy.json": set(METRIC_RE.findall(" ".join(dashboard_exprs()))),
    }
    assert len(named["alerts.yml"]) >= 8 and len(named["gemini-proxy.json"]) >= 20
    for source, names in named.items():
        missing = sorted(names - exposed)
        assert not missing, f"{source} names metrics that /metrics does not have: {missing}"


COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"


def test_the_compose_workers_and_haproxy_s_servers_agree() -> None:
    """compose.yaml's workers each share the pool on Redis under their own name and volume, and
    HAProxy's backend lists exactly them (adding a worker means both)."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    workers = sorted(name for name, s in services.items() if "build" in s)
    assert len(workers) >= 2 and {"redis", "haproxy"} <= set(services)
    for name in workers:
        s = services[name]
        cmd = s["command"]
        sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
        assert f"gemini_worker={name}" in sets and "gemini_redis=redis://redis:6379/0" in sets
        assert cmd[cmd.index("-p") + 1] == "8080" and "0.0.0.0" in cmd
        assert f"{name}-state:/var/lib/gemini-proxy" in s["volumes"]
        assert any(v.endswith(":/etc/gemini-proxy/keys.yaml:ro") for v in s["volumes"])
    assert sorted(services["haproxy"]["depends_on"]) == workers
    servers = re.findall(r"^\s+server (\S+) (\S+)$", HAPROXY_CFG.read_text(), re.M)
    assert sorted(servers) == [(w, f"{w}:8080") for w in workers]


def test_the_haproxy_config_passes_haproxy_check(tmp_path: Path) -> None:
    exe = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/sbin/haproxy") if Path(p).exists()), None
    )
    if exe is None:
        pytest.skip("no haproxy here (./scripts/run --workers installs it)")
    r = subprocess.run(
        [exe, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
