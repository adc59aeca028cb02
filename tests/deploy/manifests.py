"""What the deploy/ files build, read the way the cluster and Docker read them.

A subset of ``kustomize build`` (resources, images, JSON 6902 patches) over the base and the
overlays; the Dockerfiles' ENTRYPOINT; and the rm-server container's argv parsed by the real
``rm-server serve`` parser, so a test compares a manifest with the server's own config.
Shared by the Kubernetes, Docker and docs tests in this folder.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOC = ROOT / "docs" / "deploying.md"

KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu",
                  "tls": K8S / "overlays" / "tls"}
CRD_GROUPS = ("monitoring.coreos.com",)


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
