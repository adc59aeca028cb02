"""Model versions without sockets (rm_server/versions.py): the resident set and its limit, the
default and rollbacks, refused loads that leave the default serving, batches that never mix
versions and finish on the version they were formed for, queued samples that move to a new
default only when it encodes inputs alike. Against a live server: test_versions_live.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rm_server.batch_policy import BatchPolicy, Pending
from rm_server.batcher import Batcher
from rm_server.checkpoint import ModelLoadError
from rm_server.errors import LoadFailed, NoRoom, NotResident
from rm_server.metrics import Metrics
from rm_server.sinks import UnarySink
from rm_server.versions import Version, Versions, VersionTag
from tests.rm_server.test_batch_policy import Sink


class Encoder:
    def __init__(self, fingerprint="tok-a"):
        self.max_length, self.truncation, self.type_vocab_size = 128, "left", None
        self.fingerprint = fingerprint


class FakeModel:
    """Reward = its ``offset`` + number of ids; records the versions' batches it ran."""

    def __init__(self, offset: float, fingerprint="tok-a", delay=0.0):
        self.offset, self.delay, self.batches = offset, delay, []
        self.encoder, self.tokenizer_fingerprint = Encoder(fingerprint), fingerprint
        self.name = f"m{offset:g}"

    def score_heads(self, seqs, types):
        self.batches.append(len(seqs))
        if self.delay:
            time.sleep(self.delay)
        return [self.offset + len(s) for s in seqs], [()] * len(seqs)


class FakeLoader:
    """Checkpoints are names: "a", "b", ...; "broken*" fail to load; the hash is the name."""

    def __init__(self, free: int | None = None, **models):
        self.models, self.free, self.loaded = models, free, []

    def inspect(self, path, revision=None):
        if path == "missing":
            raise ModelLoadError("missing is not a checkpoint directory (no config.json)")
        return Path(path), f"hash-{path}"

    def need_bytes(self, source):
        return 100

    def free_bytes(self):
        return self.free

    def load(self, source, digest):
        if str(source).startswith("broken"):
            raise RuntimeError("Error(s) in loading state_dict: size mismatch for score.weight")
        self.loaded.append(str(source))
        return self.models.get(str(source)) or FakeModel(float(len(self.loaded)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_load_swap_rollback_and_the_resident_limit():
    async def main():
        metrics = Metrics()
        v = Versions(FakeLoader(), max_resident=2, metrics=metrics)
        await v.load("a", "v1")
        assert v.default.tag == VersionTag("hash-a", "v1")
        change = await v.load("b", "v2")  # the new default; a stays for a rollback
        assert v.default.label == "v2" and [x.label for x in v.listed()] == ["v1", "v2"]
        assert change.unloaded == []
        assert v.set_default("v1").version.hash == "hash-a"  # rollback, by label
        assert v.set_default("hash-b").version.label == "v2"  # and forward again, by hash
        change = await v.load("c", "v3")  # a third: the least recently default goes first
        assert [x.label for x in change.unloaded] == ["v1"]
        assert [x.label for x in v.listed()] == ["v2", "v3"] and v.default.label == "v3"
        with pytest.raises(NotResident, match=r"'v1' is not resident.*hash-b \(v2\), "
                                              r"hash-c \(v3, default\)"):
            v.resolve("v1")
        await v.load("d", make_default=False)  # a canary: resident, not the default
        assert v.default.label == "v3" and v.resolve("hash-d").label == ""
        with pytest.raises(NotResident, match="is the default"):
            v.unload("v3")
        v.unload("hash-d")
        assert [x.label for x in v.listed()] == ["v3"]
        return metrics

    metrics = run(main())
    assert metrics.version_loads.labels("ok")._value.get() == 4
    assert metrics.version_unloads._value.get() == 3  # v1 (limit), v2 (before d's load), d
    assert metrics.default_changes._value.get() == 5
    series = {s.labels["version"] for s in metrics.version_info.collect()[0].samples}
    assert series == {"hash-c"}  # bounded to the resident set


def test_a_load_never_holds_more_than_max_resident_models():
    """Before a load the oldest non-default version goes, so that N models (2 with N = 1, the
    default and the one loading) are the most ever held; N = 1 keeps the default only."""
    async def main():
        held = []

        class Counting(FakeLoader):
            def load(self, source, digest):
                held.append(len(v.resident) + 1)  # the resident ones + the one loading
                return super().load(source, digest)

        v = Versions(Counting(), max_resident=1)
        for name in "abcd":
            await v.load(name)
        return held, [x.hash for x in v.listed()]

    held, resident = run(main())
    assert max(held) == 2 and resident == ["hash-d"]

    async def canary():
        v = Versions(FakeLoader(), max_resident=1)
        await v.load("a")
        with pytest.raises(LoadFailed, match="--max-versions 1 keeps the default only"):
            await v.load("b", make_default=False)

    run(canary())


def test_a_broken_checkpoint_leaves_the_default_and_says_why_in_one_line():
    async def main():
        metrics = Metrics()
        v = Versions(FakeLoader(), max_resident=3, metrics=metrics)
        await v.load("a", "v1")
        with pytest.raises(LoadFailed, match=r"^load missing: missing is not a checkpoint "
                                             r"directory \(no config.json\)$"):
            await v.load("missing", "v2")
        with pytest.raises(LoadFailed, match=r"^load broken-b: RuntimeError: Error\(s\) in "
                                             r"loading state_dict: size mismatch"):
            await v.load("broken-b", "v2")
        with pytest.raises(LoadFailed, match="label 'v1' already names resident version"):
            await v.load("c", "v1")
        assert v.default.label == "v1" and len(v.resident) == 1
        return metrics.version_loads.labels("failed")._value.get()

    assert run(main()) == 3


def test_a_load_that_would_not_fit_in_memory_is_refused():
    async def main():
        v = Versions(FakeLoader(free=100), max_resident=3)  # 100 bytes x headroom > 100
        await v.load("a")  # the first version is not checked: there is nothing to protect
        with pytest.raises(NoRoom, match=r"weights need about .* MiB .* free: unload a version"):
            await v.load("b")
        assert [x.hash for x in v.listed()] == ["hash-a"]

    run(main())


def test_loading_resident_weights_again_loads_nothing_and_may_relabel():
    async def main():
        loader = FakeLoader()
        v = Versions(loader, max_resident=3)
        await v.load("a")
        await v.load("b")
        change = await v.load("a", "v1-again")
        return loader.loaded, change.version.tag, v.default.hash

    loaded, tag, default = run(main())
    assert loaded == ["a", "b"] and tag == VersionTag("hash-a", "v1-again")
    assert default == "hash-a"


def version(name, fingerprint="tok-a", delay=0.0):
    return Version(FakeModel(float(ord(name)), fingerprint, delay), VersionTag(name))


def test_batches_never_mix_versions():
    a, b = version("a"), version("b")
    pending = [Pending(f"s{i}", [1] * 10, Sink(), i, version=a if i % 2 else b)
               for i in range(12)]
    batch = BatchPolicy(max_batch_size=32).select(pending)
    assert {p.version for p in batch} == {b} and len(batch) == 6  # the oldest's version


def test_queued_samples_move_to_a_new_default_only_when_it_encodes_alike():
    old, new, other_tok = version("o"), version("n"), version("x", fingerprint="tok-b")
    v = Versions(FakeLoader())
    v.default = new
    free = Pending("free", [1], Sink(), 0, version=old)
    pinned = Pending("pinned", [1], Sink(), 0, version=old, pinned=True)
    v.rebind([free, pinned])
    assert free.version is new and pinned.version is old
    v.default = other_tok  # another tokenizer: ids made for `new` mean something else there
    v.rebind([free])
    assert free.version is new


def test_a_formed_batch_finishes_on_its_version_and_new_batches_go_to_the_new_default():
    """The model runs a batch on version A; the default changes to B meanwhile: that batch is
    scored by A and says so; the samples queued behind it (unpinned) are scored by B; a
    sample pinned to A stays on A."""
    async def main():
        a, b = version("a", delay=0.2), version("b")
        v = Versions(FakeLoader())
        v.default = a
        batcher = Batcher(v.run_batch, BatchPolicy(4, 4096, 0.0), rebind=v.rebind)
        batcher.start()
        first, later = UnarySink(4), UnarySink(3)
        batcher.submit([Pending(f"f{i}", [1] * 3, first, time.monotonic(), version=a)
                        for i in range(4)])
        await asyncio.sleep(0.05)  # the first batch is on the model thread now
        batcher.submit([Pending("q0", [1] * 3, later, time.monotonic(), version=a),
                        Pending("q1", [1] * 3, later, time.monotonic(), version=a),
                        Pending("pin", [1] * 3, later, time.monotonic(), version=a,
                                pinned=True)])
        v.default = b  # the swap, while the first batch runs
        done = await asyncio.gather(first.future, later.future)
        await batcher.stop()
        return {p.sample_id: (r.version.hash, r.reward) for res in done for p, r in res}

    got = run(main())
    assert all(got[f"f{i}"] == ("a", ord("a") + 3) for i in range(4))
    assert got["q0"] == got["q1"] == ("b", ord("b") + 3)
    assert got["pin"] == ("a", ord("a") + 3)
