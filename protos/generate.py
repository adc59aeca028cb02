"""Generate the Python stubs of ``protos/reward.proto`` (``make protos``).

``python -m protos.generate [OUT_ROOT]`` writes ``OUT_ROOT/protos/reward_pb2{,_grpc}.py``
and ``reward_pb2.pyi``; OUT_ROOT defaults to the repository root. The stale-stub test runs it
into a temporary directory and compares the bytes with the committed files.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/reward.proto"
STUBS = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on the proto; returns the written stub paths."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(REPO_ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "protos" / name for name in STUBS]


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT
    for path in generate(out):
        print(path)
