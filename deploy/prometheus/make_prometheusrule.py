#!/usr/bin/env python3
"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/rules.yml.

rules.yml is the one source of the rules; the Prometheus Operator wants them inside a
PrometheusRule object. Run after editing rules.yml (tests/deploy/test_deploy.py fails while the two
differ):

    python deploy/prometheus/make_prometheusrule.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
OUT = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/rules.yml by deploy/prometheus/make_prometheusrule.py:
# edit rules.yml and rerun it. The same recording and alerting rules, for the Prometheus
# Operator (monitoring.coreos.com/v1). Your Prometheus' ruleSelector must match these labels.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (long PromQL) as literal blocks, as they are written in rules.yml."""


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def build() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "rm-server",
            "labels": {"app.kubernetes.io/name": "rm-server", "app.kubernetes.io/part-of": "rlhf"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=100)


def main() -> int:
    OUT.write_text(build())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
