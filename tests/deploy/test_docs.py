"""docs/deploying.md against deploy/: its manifests and patches validate, the paths it names
exist, and every alert's runbook link lands on a heading."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import CRD_GROUPS, DOC, ROOT, built, one, serve_config, server_argv
from tests.deploy.promql import PROM

yaml = pytest.importorskip("yaml")


def test_docs_yaml_examples_validate():
    """Manifests shown in docs/deploying.md (blocks with apiVersion and kind) are valid too."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    text = DOC.read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    checked = 0
    for block in blocks:
        for obj in yaml.safe_load_all(block):
            if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
                continue
            if obj["apiVersion"].rpartition("/")[0] in CRD_GROUPS:
                continue
            kv.validate(obj, kv.utils.latest_version(), strict=True)
            checked += 1
    assert checked >= 1
    # JSON 6902 patches shown in the docs apply to the base Deployment and keep it valid.
    jsonpatch = pytest.importorskip("jsonpatch", reason="pip install jsonpatch")
    patches = [ops for block in blocks for ops in yaml.safe_load_all(block)
               if isinstance(ops, list) and ops and all(isinstance(o, dict) and "op" in o
                                                        for o in ops)]
    assert patches, "the initContainer example is gone"
    for ops in patches:
        patched = jsonpatch.apply_patch(one(built("base"), "Deployment"), ops)
        kv.validate(patched, kv.utils.latest_version(), strict=True)
        container, argv = server_argv(patched)
        cfg = serve_config(argv)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert cfg.model in mounts
    for path in ("deploy/Dockerfile", "deploy/k8s/base", "deploy/k8s/overlays/gpu",
                 "deploy/prometheus/rules.yml", "deploy/grafana/rm-server-dashboard.json"):
        assert path in text, f"docs/deploying.md does not mention {path}"
        assert (ROOT / path).exists()
    # every alert has its paragraph (the runbook annotations point there)
    for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert r["annotations"]["runbook"] == f"docs/deploying.md#{r['alert'].lower()}"
                assert re.search(rf"^#+ {r['alert']}$", text, re.M), (
                    f"docs/deploying.md has no heading '{r['alert']}' (the runbook link)")
