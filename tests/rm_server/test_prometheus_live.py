"""A real rm-server scraped by a real Prometheus, all on 127.0.0.1.

One server (tiny Llama RM) and one ``prometheus`` process (1 s scrape and rule evaluation,
deploy/prometheus/rules.yml loaded, a temporary storage directory) serve the whole module:

- the live /metrics page passes ``promtool check metrics`` and carries every metric that the
  rules, the dashboard and the adapter rules name;
- after a known number of samples is scored through ``RewardClient``, Prometheus reports
  exactly that ``rm_samples_total``, a positive rate, and a p99 latency from the histogram;
- every rule loads and evaluates without error, and every dashboard query runs;
- deploy/healthcheck.py (the image's HEALTHCHECK) says SERVING.

Skipped when the ``prometheus`` binary is missing (Debian: apt-get install prometheus).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from rm_server.launch import start_server, wait_serving  # noqa: E402
from tests.deploy import promql as deploy  # noqa: E402  (expression and metric helpers)

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (Debian: apt-get install prometheus)")

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
JOB = "rm-server"
FIRST, SECOND = 3, 20  # samples sent before and after Prometheus has seen the first ones
# Queried right after the first burst (one Score call), before any other request.
FIRST_BURST = (
    f'sum(increase(rm_requests_total{{job="{JOB}", method="Score", code="OK"}}[1m]))',
    f'histogram_quantile(0.99, sum by (le) '
    f'(rate(rm_request_duration_seconds_bucket{{job="{JOB}", method="Score"}}[1m])))',
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def loopback_config(metrics_port: int) -> dict:
    """deploy/prometheus/prometheus.yml with its discovery replaced by the loopback server."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    for key in ("kubernetes_sd_configs", "relabel_configs"):
        job.pop(key, None)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    return config


class Prometheus:
    def __init__(self, metrics_port: int):
        self.dir = Path(tempfile.mkdtemp(prefix="rm-prom-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(loopback_config(metrics_port)))
        self.log_path = self.dir / "prometheus.log"
        self.proc = None
        for _ in range(3):  # the free port may be taken between probe and bind: try again
            self.port = _free_port()
            log = open(self.log_path, "w")
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.dir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
            if self._wait_ready(30):
                return
            self.stop()
        raise RuntimeError(f"prometheus did not start:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            try:
                _get(f"{self.url}/-/ready", 1)
                return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(_get(url))
        except urllib.error.HTTPError as e:  # 400/422: a bad query; the body says why
            body = json.loads(e.read().decode())
        return body

    def query(self, expr: str) -> list:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        """The value of a one-series instant query, None while it is empty."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, ok, timeout: float = 30.0) -> float | None:
        end = time.monotonic() + timeout
        value = None
        while time.monotonic() < end:
            value = self.scalar(expr)
            if value is not None and ok(value):
                return value
            time.sleep(0.25)
        pytest.fail(f"{expr} = {value} after {timeout}s\nprometheus log:\n{self.log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def live(rm_dirs):
    """(server, prometheus, metrics text) after FIRST + SECOND samples were scored and seen."""
    from rm_client import RewardClient, text_sample

    # Prometheus starts while the model loads (the ports, /metrics included, bind at once).
    server = start_server(rm_dirs["llama"], "--max-wait-ms", "2", wait=False)
    prom = None
    try:
        prom = Prometheus(server.metrics_port)
        wait_serving(server.address, 90, server.proc)
        prom.wait_for(f'up{{job="{JOB}"}}', lambda v: v == 1)
        # The labelled series exist at 0 before any request (rm_server/metrics.py), so the
        # first burst is an increase Prometheus can see, not a series born at its value.
        prom.before_first = prom.scalar(f'sum(rm_requests_total{{job="{JOB}", code="OK"}})')
        with RewardClient(server.address, timeout=30) as rm:
            rm.score([text_sample(f"a{i}", "Review: the film", f" was good {i}")
                      for i in range(FIRST)])
            prom.wait_for(f'rm_samples_total{{job="{JOB}"}}', lambda v: v == FIRST)
            prom.wait_for(f'sum(rm_request_duration_seconds_count{{job="{JOB}"}})',
                          lambda v: v >= 1)
            time.sleep(1.5)  # one more scrape, so rate() has two points after the burst
            prom.first_burst = {expr: prom.scalar(expr) for expr in FIRST_BURST}
        # The rest through a dns:/// target, as trainers reach the headless Service
        # (dns:///rm-server.<namespace>.svc.cluster.local:50051, round-robin over pod IPs).
        with RewardClient(f"dns:///{server.address}", timeout=30) as rm:
            for k in range(SECOND // 4):
                results = rm.score([text_sample(f"b{k}-{i}", "Q: the plot?", " dull " * (i + 1))
                                    for i in range(4)])
                assert len(results) == 4 and all(math.isfinite(r.reward) for r in results)
        text = _get(f"http://127.0.0.1:{server.metrics_port}/metrics")
        yield server, prom, text
    finally:
        if prom is not None and prom.proc.poll() is None:
            prom.proc.send_signal(signal.SIGTERM)  # both shut down at once
        code = server.stop()
        if prom is not None:
            prom.stop()
            shutil.rmtree(prom.dir, ignore_errors=True)
        assert code == 0, server.log()


def test_live_metrics_pass_promtool_lint(live):
    _, _, text = live
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout + out.stderr)


def test_deploy_files_name_only_live_metrics(live):
    """Every metric named by rules.yml, the dashboard and the adapter rules is on the live
    page (or is recorded by rules.yml, or is Prometheus' own `up`)."""
    _, _, text = live
    names, labels = deploy.metric_names(text)
    recorded = deploy.recorded_names()
    known_labels = deploy.TARGET_LABELS | set().union(*labels.values())
    for where, expr in deploy.all_exprs():
        for metric in deploy.referenced_metrics(expr):
            assert metric in names or metric in recorded or metric == "up", (
                f"{where}: {metric} is not on the live /metrics page")
        unknown = deploy.referenced_labels(expr) - known_labels
        assert not unknown, f"{where}: labels {sorted(unknown)} on no live series"


def test_prometheus_counts_every_sample_sent(live):
    _, prom, _ = live
    total = prom.wait_for(f'rm_samples_total{{job="{JOB}"}}', lambda v: v == FIRST + SECOND)
    assert total == FIRST + SECOND
    rate = prom.wait_for(f'rate(rm_samples_total{{job="{JOB}"}}[1m])', lambda v: v > 0)
    assert rate > 0
    p99 = prom.wait_for(
        f'histogram_quantile(0.99, sum by (le) '
        f'(rate(rm_request_duration_seconds_bucket{{job="{JOB}"}}[1m])))',
        lambda v: math.isfinite(v))
    assert 0 < p99 <= 60
    ok = prom.wait_for(f'sum(rm_requests_total{{job="{JOB}", method="Score", code="OK"}})',
                       lambda v: v == 1 + SECOND // 4)
    assert ok == 1 + SECOND // 4


def test_first_burst_shows_in_rate_and_quantile(live):
    """A burst shorter than the scrape interval on a fresh server: its series were already
    scraped at 0, so increase() sees it and histogram_quantile() is a number, not NaN."""
    _, prom, _ = live
    assert prom.before_first == 0  # rm_requests_total{code="OK"} before any request
    increase, p99 = (prom.first_burst[expr] for expr in FIRST_BURST)
    assert increase is not None and increase > 0
    assert p99 is not None and math.isfinite(p99) and 0 < p99 <= 60


def test_rules_load_and_evaluate(live):
    _, prom, _ = live
    # the recording rules produce numbers from the live series
    assert prom.wait_for(f'job:rm_samples:rate1m{{job="{JOB}"}}', lambda v: v > 0) > 0
    assert math.isfinite(prom.wait_for(
        f'job_method:rm_request_duration_seconds:p99_5m{{job="{JOB}", method="Score"}}',
        lambda v: math.isfinite(v)))
    assert prom.wait_for(f'job:rm_request_errors:ratio_rate5m{{job="{JOB}"}}',
                         lambda v: v == 0) == 0
    groups = prom.api("rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = sum(len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])
    assert len(rules) == expected
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not broken, broken
    # A healthy, busy server fires nothing, not even pending (RMModelNotReady and
    # RMNoSamplesScored may be pending from before the model was ready and the samples came).
    end = time.monotonic() + 15
    while (alerts := prom.api("alerts")["data"]["alerts"]) and time.monotonic() < end:
        time.sleep(0.5)
    assert not alerts, alerts


def test_dashboard_queries_run(live):
    _, prom, _ = live
    empty = []
    for where, expr in deploy.dashboard_exprs():
        body = prom.api("query", query=deploy.grafana_to_promql(expr))
        assert body["status"] == "success", f"{where}: {body}"
        if not body["data"]["result"]:
            empty.append(where)
    # Only the error panel may be empty: every request here succeeded.
    assert all("Errors by code" in w for w in empty), empty


def test_healthcheck_script_reports_serving(live):
    server, _, _ = live
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py"),
                          "--address", server.address], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "SERVING" in out.stdout
