"""Prometheus (deploy/prometheus/): config, recording and alerting rules, every PromQL query.

``promtool check rules`` / ``check config`` / ``test rules`` pass, every alert has a unit
test, and every PromQL expression (rules, dashboard, adapter) parses and names only metrics
and labels the server exports. The live counterparts (a real server scraped by a real
Prometheus) are in tests/rm_server/test_prometheus_live.py. Without promtool (Debian:
prometheus) those tests skip with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.deploy.manifests import default_metrics_port
from tests.deploy.promql import (
    PROM,
    PROMTOOL,
    TARGET_LABELS,
    all_exprs,
    exported_metrics,
    needs_promtool,
    promtool,
    recorded_names,
    referenced_labels,
    referenced_metrics,
)

yaml = pytest.importorskip("yaml")


@needs_promtool
def test_promtool_check_rules():
    out = promtool("check", "rules", str(PROM / "rules.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    out = subprocess.run([PROMTOOL, "test", "rules", "rules_test.yml"], cwd=PROM,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # every alert of rules.yml has at least one unit test
    alerts = {r["alert"] for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROM / "rules_test.yml").read_text())["tests"]
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    untested = alerts - tested
    assert not untested, f"alerts without a promtool unit test: {sorted(untested)}"


@needs_promtool
def test_promtool_check_config(tmp_path):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "rm-server")
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == "rm-server"
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"
    targets = {r["target_label"] for r in job["relabel_configs"] if "target_label" in r}
    assert {"namespace", "pod"} <= targets, "prometheus-adapter maps namespace and pod labels"
    out = promtool("check", "config", str(PROM / "prometheus.yml"))
    if out.returncode != 0 and "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        # Debian's prometheus is built without Kubernetes service discovery. Check the rest of
        # the file (globals, relabelling, rule files) with the discovery swapped for a static
        # target; the kubernetes_sd_configs block itself is checked above by hand.
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{default_metrics_port()}"]}]
        shutil.copy(PROM / "rules.yml", tmp_path / "rules.yml")
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        out = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


@needs_promtool
def test_every_promql_expression_parses(tmp_path):
    """Rules, dashboard queries (Grafana variables substituted) and the adapter's query, each
    as a recording rule in one file that `promtool check rules` must accept."""
    exprs = all_exprs()
    assert len(exprs) > 40
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    if out.returncode != 0:
        bad = [w for i, (w, _) in enumerate(exprs) if f"expr_{i}" in out.stdout + out.stderr]
        pytest.fail(f"{out.stdout}{out.stderr}\n{bad}")


def test_expressions_name_only_exported_metrics_and_labels():
    names, labels = exported_metrics()
    recorded = recorded_names()
    known_labels = TARGET_LABELS | {"le"} | set().union(*labels.values())
    for where, expr in all_exprs():
        for metric in referenced_metrics(expr):
            ok = metric in names or metric in recorded or metric == "up"
            assert ok, f"{where}: {metric} is neither exported by the server nor recorded"
        unknown = referenced_labels(expr) - known_labels
        assert not unknown, f"{where}: unknown labels {sorted(unknown)}"


def test_queue_alert_follows_each_replicas_max_queue():
    """The threshold is a fraction of the capacity the replica exports, not a hard-coded
    --max-queue (a changed flag would leave the alert silent)."""
    alert = next(r for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
                 for r in g["rules"] if r.get("alert") == "RMQueueNearFull")
    assert "rm_queue_capacity" in referenced_metrics(alert["expr"])
    numbers = [float(x) for x in re.findall(r"(?<![\w.\[])\d+(?:\.\d+)?(?![\w\]])", alert["expr"])]
    assert all(x <= 1 for x in numbers), f"a hard-coded queue size in {alert['expr']!r}"
