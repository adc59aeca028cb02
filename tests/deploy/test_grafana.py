"""The Grafana dashboard (deploy/grafana/rm-server-dashboard.json): its panels, layout and
variables. Its queries are checked with the other PromQL in test_prometheus.py."""

from __future__ import annotations

import json
import re

from tests.deploy.promql import DASHBOARD, exported_metrics

REQUIRED_PANELS = ("Throughput", "Request rate by code", "Request latency", "Queue wait",
                   "Batch size", "Padding ratio", "Queue depth", "In-flight requests",
                   "Errors by code", "Rejections by reason")


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in panels}
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, f"dashboard lacks panels {missing}"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            used = set(re.findall(r"\$\{?([a-zA-Z_]\w*)", t["expr"]))
            builtin = {"__rate_interval", "__interval", "__range"}
            assert used <= set(variables) | builtin, f"{p['title']}: undefined {used}"
    for name in ("job", "instance"):
        query = variables[name]["query"]["query"]
        metric = re.search(r"label_values\(([a-z_:]+)", query).group(1)
        assert metric in exported_metrics()[0]
