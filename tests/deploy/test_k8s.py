"""Kubernetes manifests (deploy/k8s/): each kustomization builds and validates, and the
Deployment agrees with the server.

- every object, as built by each kustomization (base and overlays), validates against the
  Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail) for the
  oldest supported and the newest Kubernetes; CRD kinds (PodMonitor, PrometheusRule) are
  checked by hand;
- the Deployment's args (after the image's ENTRYPOINT) parse with the real ``rm-server serve``
  parser, the gRPC probes use the numeric ``--health-port``, container ports match the flags,
  the termination grace period covers preStop + drain + grace, and the pod runs as the image's
  non-root user on a read-only root filesystem.

Offline: no cluster. Tools that are missing are skipped with the reason; CI installs them
(PyPI: kubernetes-validate, jsonpatch, dockerfile).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    CRD_GROUPS,
    DEPLOY,
    K8S,
    KUSTOMIZATIONS,
    built,
    default_metrics_port,
    one,
    parse_dockerfile,
    serve_config,
    server_argv,
)
from tests.deploy.promql import PROM, exported_metrics

yaml = pytest.importorskip("yaml")

K8S_VERSIONS = ("1.30", "latest")  # 1.30: the preStop `sleep` action is on by default


# ---------------------------------------------------------------------------------------------
# kustomize and Kubernetes schemas


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_lists_existing_files_and_builds(name):
    directory = KUSTOMIZATIONS[name]
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Kustomization"
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    for res in k.get("resources", []):
        assert (directory / res).exists(), f"{name}: resource {res} is missing"
    for p in k.get("patches", []):
        if "path" in p:
            assert (directory / p["path"]).exists(), f"{name}: patch {p['path']} is missing"
    objs = built(name)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    if name == "base":  # no manifest lies in base/ unlisted
        listed = {Path(r).name for r in k["resources"]}
        present = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert present <= listed, f"not in kustomization.yaml: {sorted(present - listed)}"
        assert {o["kind"] for o in objs} >= {
            "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "PodMonitor", "PrometheusRule"}


def test_real_kustomize_builds_the_same_objects_when_installed():
    tool = shutil.which("kustomize")
    cmd = [tool, "build"] if tool else None
    if cmd is None and shutil.which("kubectl"):
        cmd = [shutil.which("kubectl"), "kustomize"]
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl installed; the test's own builder is used")
    for name, directory in KUSTOMIZATIONS.items():
        out = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        real = sorted((o["kind"], o["metadata"]["name"], json.dumps(o, sort_keys=True))
                      for o in yaml.safe_load_all(out.stdout) if o)
        ours = sorted((o["kind"], o["metadata"]["name"], json.dumps(o, sort_keys=True))
                      for o in built(name))
        assert real == ours, name


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_manifests_validate_against_kubernetes_schemas(name, version):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.utils.latest_version() if version == "latest" else version
    checked = 0
    for obj in built(name):
        group = obj["apiVersion"].rpartition("/")[0]
        if group in CRD_GROUPS:
            # No schema for custom resources in kubernetes-validate (SchemaNotFoundError):
            # test_custom_resources_have_required_fields checks them by hand.
            with pytest.raises(kv.utils.SchemaNotFoundError):
                kv.validate(obj, version, strict=True)
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                        f"Kubernetes {version}: {e.message} at {list(e.absolute_path)}")
        checked += 1
    assert checked >= 4


def test_custom_resources_have_required_fields():
    objs = built("base")
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}

    pm = one(objs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["name"]
    sel = pm["spec"]["selector"]["matchLabels"]
    assert sel and sel.items() <= pod_labels.items(), "PodMonitor selects no rm-server pod"
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["port"] == "metrics" for e in endpoints)
    assert "metrics" in port_names
    for e in endpoints:
        assert e.get("path", "/metrics") == "/metrics"
        assert set(e) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                          "relabelings", "metricRelabelings", "honorLabels"}

    pr = one(objs, "PrometheusRule")
    assert pr["apiVersion"] == "monitoring.coreos.com/v1"
    assert pr["metadata"]["name"]
    groups = pr["spec"]["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    for g in groups:
        for r in g["rules"]:
            assert ("record" in r) != ("alert" in r) and r["expr"]


def test_prometheusrule_is_generated_from_rules_yml():
    sys.path.insert(0, str(PROM))
    try:
        import make_prometheusrule
    finally:
        sys.path.remove(str(PROM))
    current = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert current == make_prometheusrule.build(), (
        "deploy/k8s/base/prometheusrule.yaml is stale: "
        "run python deploy/prometheus/make_prometheusrule.py")


def test_selectors_names_and_ports_agree():
    objs = built("base")
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    container, argv = server_argv(dep)
    cfg = serve_config(argv)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    svc = one(objs, "Service")
    assert svc["spec"]["clusterIP"] == "None", "headless, for client-side round-robin"
    assert svc["spec"]["selector"].items() <= labels.items()
    for sp in svc["spec"]["ports"]:
        target = sp.get("targetPort", sp["port"])
        assert target in ports or target in ports.values(), sp
    grpc_port = next(sp for sp in svc["spec"]["ports"] if sp["name"] == "grpc")
    assert grpc_port["port"] == cfg.port

    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = one(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == (
        "Deployment", dep["metadata"]["name"], dep["apiVersion"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "PDB blocks drains"


def test_hpa_metric_is_served_by_the_adapter_rules():
    hpa = one(built("base"), "HorizontalPodAutoscaler")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]
                    if m["type"] == "Pods"]
    assert "rm_queue_depth" in pods_metrics
    rules = yaml.safe_load((PROM / "adapter-rules.yaml").read_text())["rules"]
    served = {r["name"]["as"]: r for r in rules}
    names, labels = exported_metrics()
    for metric in pods_metrics:
        assert metric in served, f"prometheus-adapter serves no {metric}"
        r = served[metric]
        assert set(r["resources"]["overrides"]) == {"namespace", "pod"}
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        assert series in names, f"adapter rule reads {series}, which the server does not export"
        assert re.fullmatch(r["name"]["matches"].strip("^$"), series)
        for tmpl in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert tmpl in r["metricsQuery"]


# ---------------------------------------------------------------------------------------------
# the Deployment against the server's flags


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_probes_ports_and_flags_match_the_server(name):
    dep = one(built(name), "Deployment")
    container, argv = server_argv(dep)
    cfg = serve_config(argv)  # every flag exists and parses (argparse exits otherwise)
    assert cfg.host == "0.0.0.0", "a container must bind all interfaces"
    assert cfg.health_port and cfg.health_port != cfg.port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == cfg.port
    assert ports["health"] == cfg.health_port
    assert ports["metrics"] == cfg.metrics_port == default_metrics_port()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        port = probe["grpc"]["port"]
        # Native gRPC probes take a number, not a port name, and speak neither TLS nor auth:
        # they must hit the plaintext health-only port.
        assert isinstance(port, int) and not isinstance(port, bool), f"{kind}: {port!r}"
        assert port == cfg.health_port, f"{kind} probes {port}, --health-port is {cfg.health_port}"
        assert probe.get("grpc", {}).get("service", "") in ("", "rlhf.reward.v1.RewardService")
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model load time"
    # The model and the token come from mounts where the flags point.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert cfg.model in mounts and mounts[cfg.model].get("readOnly")
    model_vol = volumes[mounts[cfg.model]["name"]]
    assert "persistentVolumeClaim" in model_vol or "emptyDir" in model_vol
    token_dir = str(Path(cfg.auth_token_file).parent)
    assert token_dir in mounts, "--auth-token-file must lie on a mounted Secret"
    secret = volumes[mounts[token_dir]["name"]]["secret"]
    assert any(i["path"] == Path(cfg.auth_token_file).name for i in secret.get("items", [])) \
        or "items" not in secret
    if cfg.tls_cert:
        for f in (cfg.tls_cert, cfg.tls_key):
            assert str(Path(f).parent) in mounts, f"{f} is not on a mounted volume"
    if name == "gpu":
        assert cfg.device.startswith("cuda") and cfg.dtype == "bfloat16"
        res = container["resources"]
        assert str(res["limits"]["nvidia.com/gpu"]) == "1"
        assert container["image"].endswith("-cuda")
        assert any(t.get("key") == "nvidia.com/gpu"
                   for t in dep["spec"]["template"]["spec"].get("tolerations", []))
        tmp = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"]["sizeLimit"] == "2Gi"
    else:
        assert cfg.device == "cpu" and not container["image"].endswith("-cuda")
    if name == "tls":
        assert cfg.tls_cert and cfg.tls_key


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_termination_grace_covers_prestop_drain_and_grace(name):
    dep = one(built(name), "Deployment")
    container, argv = server_argv(dep)
    cfg = serve_config(argv)
    pre = container["lifecycle"]["preStop"]
    if "sleep" in pre:
        pre_s = pre["sleep"]["seconds"]
    else:  # exec: [sleep, N]
        pre_s = float(pre["exec"]["command"][-1])
    assert pre_s >= 1, "endpoints need a moment to drop the pod before SIGTERM"
    assert cfg.drain_delay_seconds > 0
    tgps = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    need = pre_s + cfg.drain_delay_seconds + cfg.grace_seconds
    assert tgps >= need, f"terminationGracePeriodSeconds {tgps} < {need} (preStop + drain + grace)"


def test_pod_security_and_resources():
    dep = one(built("base"), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    container, argv = server_argv(dep)
    cfg = serve_config(argv)
    psc, csc = spec["securityContext"], container["securityContext"]
    assert psc["runAsNonRoot"] is True and csc.get("runAsNonRoot", True) is True
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"]
    assert spec["automountServiceAccountToken"] is False
    # The uid is the image's USER, numeric (runAsNonRoot cannot check a name).
    user = [c for c in parse_dockerfile(DEPLOY / "Dockerfile") if c.cmd.upper() == "USER"][-1]
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert psc["runAsUser"] == int(uid)
    # Read-only root: /tmp (HOME, HF_HOME, TRITON_CACHE_DIR in the image) is an emptyDir.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]] and not mounts["/tmp"].get("readOnly")
    res = container["resources"]
    for key in ("cpu", "memory"):
        assert res["requests"][key] and res["limits"][key]
    cpu = str(res["limits"]["cpu"])
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert cfg.num_threads and cfg.num_threads <= max(1, round(cores)), (
        f"--num-threads={cfg.num_threads} exceeds the CPU limit {cpu}")
