"""Model versions in one server: the default, the resident set, loads off the hot path.

A version is one loaded checkpoint, named by the hash of its weights (``ModelInfo.version``) and
an optional operator label. :class:`Versions` holds the resident ones:

- the **default** scores unpinned samples; a request may pin any resident version by hash or
  label (:meth:`Versions.resolve`; otherwise FAILED_PRECONDITION naming the resident ones);
- :meth:`Versions.load` checks, loads and warms up a checkpoint on a thread of its own
  (``rm-load``), never the model thread, which keeps scoring meanwhile. Once warm the version
  joins the resident set, and becomes the default if asked, in one step on the event loop:
  batches formed from then on go to it; batches already formed finish on theirs. Each queued
  sample is bound to a version (``Pending.version``) and a batch takes one version's samples
  only (``BatchPolicy.select``); an unpinned sample queued before a swap moves to the new
  default when both encode inputs alike (:meth:`Versions.rebind`: equal tokenizer
  fingerprints, which cover the recipe, and limits), else it is scored by the version it was
  encoded for;
- at most ``max_resident`` versions stay resident, the least recently default unloaded first:
  before a load, so that a load never holds more than ``max(N, 2)`` models, and after it,
  down to N. A load whose weights would not fit in free memory is refused
  (rm_server/memory.py): on a CPU the alternative is the OOM killer ending every request;
- unloading drops a version from the registry; samples already bound to it still finish on
  it (they hold the last references), then its memory is freed and returned to the OS;
- a checkpoint that cannot be loaded leaves everything as it was (except versions unloaded
  to make room) and raises one :class:`LoadFailed` line.

Loads run one at a time; making a version the default or unloading one never waits for a
load, so a rollback is instant while a new version loads.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from rm_server import memory
from rm_server.batch_policy import Pending, Scored
from rm_server.checkpoint import ModelLoadError, check_source, weights_version
from rm_server.errors import LoadFailed, NoRoom, NotResident, ServiceError

log = logging.getLogger("rm_server")


@dataclass(frozen=True, slots=True)
class VersionTag:
    """What a result names: the weights hash and the operator's label ("" when none)."""

    hash: str
    label: str = ""


class Version:
    """One resident checkpoint: the loaded model, its tag, where and when it was loaded."""

    def __init__(self, model, tag: VersionTag, source: str = "", load_seconds: float = 0.0):
        self.model = model
        self.tag = tag
        self.name, self.fingerprint = model.name, model.tokenizer_fingerprint
        self.source = source
        self.loaded_at = time.time()
        self.load_seconds = load_seconds
        enc = model.encoder
        # inputs encoded for one version mean the same to another with the same encoding
        self.encoding = (model.tokenizer_fingerprint, enc.max_length, enc.truncation,
                         enc.type_vocab_size)
        self.shares_prefix = (getattr(model, "prefix_sharing", False)  # BatchPolicy.shares
                              and getattr(model, "scoring_path", "") == "last-token")

    @property
    def hash(self) -> str:
        return self.tag.hash

    @property
    def label(self) -> str:
        return self.tag.label

    def describe(self) -> str:
        return f"{self.hash} ({self.label})" if self.label else self.hash

    def record(self) -> Version:
        """A copy without the model, to report an unloaded version without keeping it."""
        out = copy.copy(self)
        out.model = None
        return out


@dataclass
class Change:
    """What an admin call did: the version it loaded, made the default or unloaded, and the
    versions it unloaded to keep at most ``max_resident`` (records without their models)."""

    version: Version
    unloaded: list[Version] = field(default_factory=list)


class CheckpointLoader:
    """Checkpoints as the server loads them: its model options (``config.model_options``),
    the path replaced."""

    def __init__(self, options: dict):
        self.options = options

    def inspect(self, path: str, revision: str | None = None) -> tuple[Path, str]:
        """The checkpoint directory (checked, rm_server/checkpoint.py) and its weights hash."""
        o = self.options
        source = check_source(path, revision, o.get("tokenizer"), o.get("trust_remote_code"))
        return source, weights_version(source)

    def need_bytes(self, source: Path) -> int:
        return memory.weights_bytes(source, self.options.get("dtype", "float32"))

    def free_bytes(self) -> int | None:
        return memory.free_bytes(self.options.get("device", "cpu"))

    def load(self, source: Path, digest: str):
        """Load and warm up (on the load thread)."""
        from rm_server.model import RewardModel

        options = {**self.options, "path": source, "revision": None}
        model = RewardModel(**options, weights_hash=digest)
        model.warmup()
        return model


class Versions:
    """The resident versions and the default (event loop), and the batch runner (model
    thread)."""

    def __init__(self, loader, max_resident: int = 2, metrics=None,
                 on_change: Callable[[], None] | None = None):
        self.loader = loader
        self.max_resident = max(1, max_resident)
        self.metrics = metrics
        self.on_change = on_change or (lambda: None)
        self.resident: dict[str, Version] = {}  # hash -> version, least recently default first
        self.default: Version | None = None
        self._loads = asyncio.Lock()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rm-load")
        self._releases: set[asyncio.Task] = set()

    # -- lookups (event loop) ----------------------------------------------------------------
    def resolve(self, name: str = "") -> Version:
        """The default (``name`` empty), or the resident version with that hash or label."""
        if not name:
            return self.default
        for v in self.resident.values():
            if name in (v.hash, v.label):
                return v
        raise NotResident(f"version {name!r} is not resident on this server; resident: "
                          f"{self.names()}")

    def names(self) -> str:
        """The resident versions in one line, e.g. "3f2a... (v2, default), 81c0... (v1)"."""
        parts = []
        for v in self.listed():
            extra = [x for x in (v.label, "default" if v is self.default else "") if x]
            parts.append(f"{v.hash} ({', '.join(extra)})" if extra else v.hash)
        return ", ".join(parts) or "none"

    def listed(self) -> list[Version]:
        """Resident versions in load order."""
        return sorted(self.resident.values(), key=lambda v: v.loaded_at)

    def rebind(self, pending: list[Pending]) -> None:
        """Move unpinned queued samples to the default when it encodes inputs as their version
        did (before a batch forms; samples in formed batches are not queued any more)."""
        default = self.default
        for p in pending:
            if (p.version is not default and not p.pinned and p.version is not None
                    and p.version.encoding == default.encoding):
                p.version = default

    # -- the model thread --------------------------------------------------------------------
    def run_batch(self, batch: list[Pending]) -> list[Scored]:
        """Score one batch (one version's samples) with its version."""
        version = batch[0].version
        rewards, heads = version.model.score_heads([p.ids for p in batch],
                                                   [p.token_type_ids for p in batch])
        if self.metrics and version.hash in self.resident:  # series of resident versions only
            self.metrics.version_samples.labels(version.hash).inc(len(batch))
        tag = version.tag
        return [Scored(r, h, tag) for r, h in zip(rewards, heads)]

    # -- admin (event loop) ------------------------------------------------------------------
    async def load(self, path: str, label: str = "", make_default: bool = True,
                   revision: str | None = None) -> Change:
        """Load ``path`` beside the serving versions; the new default if ``make_default`` (or
        if there is none yet). Weights already resident load nothing."""
        if not make_default and self.default is not None and self.max_resident < 2:
            raise LoadFailed(f"load {path}: --max-versions 1 keeps the default only, so a "
                             "version that is not made the default would be unloaded at once")
        async with self._loads:
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            unloaded: list[Version] = []
            try:
                source, digest = await loop.run_in_executor(self._thread, self.loader.inspect,
                                                            path, revision)
                self._check_label(label, digest)
                if digest in self.resident:  # already here: relabel and promote only
                    return self._adopt(self.resident[digest], label, make_default, unloaded)
                unloaded = self._evict(max(self.max_resident, 2) - 1)
                if self.default is not None:
                    await self._check_room(path, source)
                box: list = []  # not the future's result: asyncio's future chain is a
                # reference cycle, which would keep the model alive after its unload
                await loop.run_in_executor(self._thread, lambda: box.append(
                    self.loader.load(source, digest)))
                model = box.pop()
            except BaseException as e:
                self._count_load("failed")
                if unloaded:
                    self._changed()
                raise _load_error(path, e) from None
            seconds = time.perf_counter() - start
            version = Version(model, VersionTag(digest, label), str(source), seconds)
            self.resident[digest] = version
            self._count_load("ok", seconds)
            if self.metrics:  # from zero, so rate() sees its first batch
                self.metrics.version_samples.labels(digest)
            log.info("loaded version %s from %s in %.1fs", version.describe(), source, seconds)
            return self._adopt(version, label, make_default or self.default is None, unloaded)

    def set_default(self, name: str) -> Change:
        """Make a resident version the default (a roll-forward, or a rollback)."""
        return self._adopt(self.resolve(name), "", True, [])

    def unload(self, name: str) -> Change:
        """Unload a resident version that is not the default."""
        version = self.resolve(name)
        if version is self.default:
            raise NotResident(f"version {version.describe()} is the default: make another "
                              "version the default first (SetDefaultVersion)")
        self._drop(version)
        self._changed()
        return Change(version.record())

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------
    def _check_label(self, label: str, digest: str) -> None:
        for v in self.resident.values():
            if label and v.label == label and v.hash != digest:
                raise LoadFailed(f"label {label!r} already names resident version {v.hash}: "
                                 "choose another label, or unload that version first")

    def _adopt(self, version: Version, label: str, make_default: bool,
               unloaded: list[Version]) -> Change:
        if label and label != version.label:
            version.tag = VersionTag(version.hash, label)
        if make_default and version is not self.default:
            previous, self.default = self.default, version
            self.resident[version.hash] = self.resident.pop(version.hash)  # most recent
            if self.metrics:
                self.metrics.default_changes.inc()
            log.info("default version: %s (was %s)", version.describe(),
                     previous.describe() if previous else "none")
        unloaded += self._evict(self.max_resident)
        self._changed()
        return Change(version, unloaded)

    def _changed(self) -> None:
        """Publish the resident set (``rm_version_info``), then tell the server."""
        if self.metrics:
            self.metrics.version_info.clear()
            for v in self.resident.values():
                self.metrics.version_info.labels(v.hash, v.label,
                                                 str(int(v is self.default))).set(1)
        self.on_change()

    def _evict(self, keep: int) -> list[Version]:
        """Unload the least recently default versions (never the default) down to ``keep``."""
        out = []
        for v in list(self.resident.values()):
            if len(self.resident) <= keep:
                break
            if v is not self.default:
                self._drop(v)
                out.append(v.record())
        return out

    def _drop(self, version: Version) -> None:
        del self.resident[version.hash]
        if self.metrics:
            self.metrics.version_unloads.inc()
            try:
                self.metrics.version_samples.remove(version.hash)
            except KeyError:  # never scored nor published
                pass
        log.info("unloaded version %s", version.describe())
        self._release_when_free(weakref.ref(version.model))

    def _release_when_free(self, model_ref: weakref.ref) -> None:
        """Once nothing refers to the model (its last bound samples scored), return its
        memory to the OS (on the load thread: a collection must not stall the event loop)."""
        async def release():
            loop = asyncio.get_running_loop()
            for tick in range(600):  # up to a minute: queued samples drain long before
                if model_ref() is None:  # freed by reference counting, as models are
                    break
                if tick % 50 == 49:  # still alive: a reference cycle needs a collection,
                    await loop.run_in_executor(self._thread, gc.collect)  # (GIL-bound: rare)
                await asyncio.sleep(0.1)
            await loop.run_in_executor(self._thread, memory.release)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _check_room(self, path: str, source: Path) -> None:
        """Refuse a load whose weights would not fit (after unloaded versions are freed)."""
        if self._releases:
            await asyncio.wait(set(self._releases), timeout=30)
        loop = asyncio.get_running_loop()
        need = await loop.run_in_executor(self._thread, self.loader.need_bytes, source)
        free = self.loader.free_bytes()
        if free is not None and need * memory.HEADROOM > free:
            raise NoRoom(f"load {path}: its weights need about {need / 2**20:.0f} MiB "
                         f"(x{memory.HEADROOM} with headroom) and {free / 2**20:.0f} MiB is "
                         "free: unload a version (UnloadVersion) or lower --max-versions")

    def _count_load(self, result: str, seconds: float | None = None) -> None:
        if self.metrics:
            self.metrics.version_loads.labels(result).inc()
            if seconds is not None:
                self.metrics.version_load_seconds.observe(seconds)


def _load_error(path: str, e: BaseException) -> BaseException:
    """One line for the admin caller; the default keeps serving."""
    if isinstance(e, (ServiceError, asyncio.CancelledError)):
        return e
    if isinstance(e, ModelLoadError):
        return LoadFailed(f"load {path}: {' '.join(str(e).split())}")
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return NoRoom(f"load {path}: out of memory while loading: {type(e).__name__}")
    log.warning("load of %s failed", path, exc_info=e)
    first = (str(e).strip().splitlines() or [""])[0]
    return LoadFailed(f"load {path}: {type(e).__name__}: {first}")
