"""``python -m bench.select_cost``: what the batching policy's ``select`` costs the batcher
thread per batch, this tree's policy against another revision's, side by side (interleaved,
median of reps), at several queue depths and three kinds of queue: one length, mixed lengths,
and k = 8 samples per 256-token prompt.

    python -m bench.select_cost --baseline e0c6d4f   # the padded policy, before prefix sharing

The baseline is ``rm_server/batch_policy.py`` at that revision (``git show``), imported beside
ours; its queue gets its own ``Pending`` objects with the same ids.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rm_server import batch_policy as ours


def load_revision(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:rm_server/batch_policy.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="select-cost-")) / "baseline_policy.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_policy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Sink:
    cancelled = False


def queue(kind: str, n: int, rng: random.Random) -> list[list[int]]:
    prompts = [[rng.randrange(1000) for _ in range(256)] for _ in range(n // 8 + 1)]
    if kind == "k8":
        return [prompts[i // 8] + [rng.randrange(1000) for _ in range(64)] for i in range(n)]
    return [[rng.randrange(1000) for _ in range(rng.randint(20, 400) if kind == "mixed" else 320)]
            for _ in range(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="e0c6d4f", help="git revision of the baseline policy")
    ap.add_argument("--depths", type=int, nargs="+", default=[32, 256, 4096])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    base = load_revision(args.baseline)
    rng = random.Random(0)
    print(f"select() per batch (max 32 samples, 8192 tokens), ms: ours vs {args.baseline}")
    for kind in ("same-length", "mixed", "k8"):
        seqs = queue(kind, max(args.depths), rng)
        sides = {name: [mod.Pending(str(i), s, _Sink(), enqueued=i * 1e-4, peer=f"p{i % 64}",
                                    client="c") for i, s in enumerate(seqs)]
                 for name, mod in (("ours", ours), ("baseline", base))}
        for depth in args.depths:
            times: dict[str, list[float]] = {"ours": [], "baseline": []}
            calls = max(3, 4096 // depth)
            for rep in range(args.reps):
                names = ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")
                for name in names:
                    mod = ours if name == "ours" else base
                    policy, q = mod.BatchPolicy(max_batch_size=32, max_batch_tokens=8192), \
                        sides[name][:depth]
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        policy.select(q)
                    times[name].append((time.perf_counter() - t0) / calls * 1e3)
            a, b = statistics.median(times["ours"]), statistics.median(times["baseline"])
            print(f"{kind:<12} {depth:>5} queued: ours {a:7.3f}  baseline {b:7.3f}  "
                  f"ours/baseline {a / b:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
