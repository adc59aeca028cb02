"""Memory for model versions: what a checkpoint will take, what is free, and giving it back.

A server that loads a second model beside the one it serves can run out of memory, and on a
CPU that is the kernel's OOM killer ending the process with every request in it. So before a
load (rm_server/versions.py) the weights' size in the serving dtype is compared with free
memory, and a load that cannot fit is refused instead:

- :func:`weights_bytes`: the parameters' bytes from the safetensors headers (element count x
  the serving dtype's size; other weight files count their file size);
- :func:`free_bytes`: on CUDA what ``torch.cuda.mem_get_info`` reports free; on the CPU the
  least of ``MemAvailable`` and the cgroup's limit less its usage (a container's limit, which
  ``MemAvailable`` does not see); None when nothing can be read (no check then);
- :func:`release`: once a dropped version's model is freed (by reference counting: a full
  garbage collection holds the GIL for a quarter of a second with transformers loaded, a
  stall of every batch), CUDA's cached blocks back to the driver and glibc's free heap pages
  back to the kernel (``malloc_trim``, about a millisecond: freed tensors otherwise stay in
  the process's RSS).
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path

HEADROOM = 1.2  # weights x this must be free: activations of the warm-up, allocator slack
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
CGROUP = Path("/sys/fs/cgroup")


def weights_bytes(path: Path, dtype: str) -> int:
    """Bytes the checkpoint's floating-point parameters take in ``dtype`` (integer tensors
    keep their own size); files other than safetensors count as their size on disk."""
    total, itemsize = 0, ITEMSIZE.get(dtype, 4)
    for f in sorted(Path(path).iterdir()):
        if f.suffix == ".safetensors":
            total += _safetensors_bytes(f, itemsize)
        elif f.suffix in (".bin", ".pt"):
            total += f.stat().st_size
    return total


def _safetensors_bytes(path: Path, itemsize: int) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        numel = math.prod(t["shape"])
        floating = t["dtype"].startswith(("F", "BF"))
        total += numel * itemsize if floating else t["data_offsets"][1] - t["data_offsets"][0]
    return total


def free_bytes(device: str) -> int | None:
    """Bytes free where a model on ``device`` lives; None when unknown."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    candidates = [_meminfo_available(), _cgroup_room()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """cgroup v2: memory.max less memory.current (None when unlimited or not readable)."""
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def release() -> None:
    """Return freed model memory to the driver (CUDA's cache) and the kernel (the C heap)."""
    try:
        import torch

        if torch.cuda.is_initialized():  # a CPU server never starts CUDA here
            torch.cuda.empty_cache()
    except ImportError:
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
