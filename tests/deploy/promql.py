"""PromQL as the deploy/ files write it: every expression, the metrics and labels it names.

The expressions of the recording and alerting rules, the Grafana dashboard (its variables
substituted as Grafana would) and the prometheus-adapter rules; the series the server
exports, from its own registry; and ``promtool``. Shared by test_prometheus.py,
test_grafana.py, test_k8s.py and the live check in tests/rm_server/test_prometheus_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from tests.deploy.manifests import DEPLOY

yaml = pytest.importorskip("yaml")

PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "rm-server-dashboard.json"
# Labels Prometheus attaches to every series of a target (job/instance always; the rest from
# the PodMonitor or prometheus.yml's relabelling).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "node", "endpoint",
                 "service"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "le", "inf", "nan"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


def exported_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Series names and their labels the server exports, from its own registry (every
    labelled family touched once so it appears). tests/rm_server/test_prometheus_live.py checks the
    same against a live server's /metrics."""
    from prometheus_client import generate_latest

    from rm_server.metrics import Metrics

    m = Metrics()
    m.requests.labels("Score", "OK")
    m.request_duration.labels("Score")
    m.build_info.labels("0", "model")
    return metric_names(generate_latest(m.registry).decode())


def metric_names(text: str) -> tuple[set[str], dict[str, set[str]]]:
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return set(labels), labels


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every query of the dashboard, Grafana variables left in."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return out


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's variables with what Grafana would send."""
    expr = re.sub(r"\$__rate_interval|\$__interval|\$__range", "1m", expr)
    return re.sub(r"\$\{?(job|instance)\}?", ".*", expr)


def adapter_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROM / "adapter-rules.yaml").read_text())["rules"]
    out = []
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        q = (r["metricsQuery"].replace("<<.Series>>", series)
             .replace("<<.LabelMatchers>>", 'namespace="rlhf",pod=~"rm-server-.*"')
             .replace("<<.GroupBy>>", "pod"))
        out.append((f"adapter rule {r['name']['as']}", q))
        out.append((f"adapter seriesQuery {r['name']['as']}", r["seriesQuery"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    return [(f"rule {r.get('record') or r.get('alert')}", r["expr"])
            for g in groups for r in g["rules"]]


def recorded_names() -> set[str]:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def all_exprs() -> list[tuple[str, str]]:
    dashboard = [(w, grafana_to_promql(e)) for w, e in dashboard_exprs()]
    return rule_exprs() + dashboard + adapter_exprs()


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def referenced_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers not followed by '(' that are not
    keywords, label names in matchers/groupings, or durations)."""
    e = _strip_strings(expr)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\{[^}]*\}", " ", e)            # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)           # range durations
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        after = e[m.end():].lstrip()
        if after.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def referenced_labels(expr: str) -> set[str]:
    e = _strip_strings(expr)
    labels = set()
    for m in re.finditer(r"\{([^}]*)\}", e):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(1)))
    for m in re.finditer(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", e):
        labels |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return labels


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60)
