"""Storage faults: a policy for the `StorageFaults` seam and a `FaultyStorage` wrapper.

`StoragePolicy` is sans-IO: it keeps the active faults and answers, per call, "fail with this
error" or "wait this long". Its `before()` satisfies `StorageFaults`, so a `MemoryDisk` or
`RawImage` built with `faults=policy` gets EIO, latency and ENOSPC at the existing seam.

`FaultyStorage` wraps any `Storage` and adds what the seam cannot express:

- `storage.eio` (dm-dust style): reads of a bad sector fail; in `read` mode a write to a bad
  sector succeeds and clears it; `write`/`both` modes fail writes too;
- `storage.drop-writes`: a write is acknowledged and thrown away;
- a volatile write cache (`write_cache=True`): writes land in the cache and reach the inner
  disk only on flush; reads see the cache; `storage.power-cut` drops the cache and fails every
  call until it stops (power back). Only data covered by a completed flush survives.

Discard and resize go straight to the inner disk (dropping cached sectors they cover): the
cache models what a disk's volatile cache loses, and a discard is not data.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from backends.storage.base import (
    BLKIF_SECTOR,
    ReadBuffer,
    Storage,
    StorageError,
    StorageErrorKind,
    StorageInfo,
    StorageOp,
    WriteBuffer,
)
from xenpv.faults.schedule import ScheduledFault, stream

STORAGE_KINDS = frozenset(
    {"storage.eio", "storage.latency", "storage.enospc", "storage.drop-writes", "storage.power-cut"}
)


@dataclass(slots=True)
class _Active:
    fault: ScheduledFault
    rng: random.Random
    hits: int = 0


@dataclass(slots=True)
class StoragePolicy:
    """The storage faults active on one disk, and what they do to each call."""

    seed: int = 0
    _active: dict[str, _Active] = field(default_factory=dict)
    # dm-dust: bad 512-byte sectors -> the ops they fail ("read", "write" or "both")
    bad: dict[int, str] = field(default_factory=dict)
    powered: bool = True

    def activate(self, fault: ScheduledFault) -> None:
        if fault.kind not in STORAGE_KINDS:
            raise ValueError(f"{fault.kind} is not a storage fault")
        self._active[fault.id] = _Active(fault, stream(self.seed, f"inject/{fault.id}"))
        if fault.kind == "storage.eio":
            first = int(fault.param("sector"))
            mode = str(fault.param("op"))
            for sector in range(first, first + int(fault.param("sectors"))):
                self.bad[sector] = mode
        elif fault.kind == "storage.power-cut":
            self.powered = False

    def deactivate(self, fault: ScheduledFault) -> None:
        entry = self._active.pop(fault.id, None)
        if entry is None:
            return
        if fault.kind == "storage.eio":  # heal: forget this fault's bad sectors
            first = int(fault.param("sector"))
            for sector in range(first, first + int(fault.param("sectors"))):
                self.bad.pop(sector, None)
        elif fault.kind == "storage.power-cut":
            self.powered = not any(
                a.fault.kind == "storage.power-cut" for a in self._active.values()
            )

    def _fires(self, kind: str) -> bool:
        for entry in self._active.values():
            fault = entry.fault
            if fault.kind != kind:
                continue
            if fault.count is not None and entry.hits >= fault.count:
                continue
            p = 1.0 if fault.probability is None else fault.probability
            if p < 1.0 and entry.rng.random() >= p:
                continue
            entry.hits += 1
            return True
        return False

    def delay(self) -> float:
        return sum(
            float(a.fault.param("delay"))
            for a in self._active.values()
            if a.fault.kind == "storage.latency"
        )

    def check(self, op: StorageOp, offset: int, length: int) -> None:
        """Raise the error the active faults give this call (bad sectors of a write are
        cleared here, dm-dust style, when the fault only fails reads)."""
        if not self.powered:
            raise StorageError(StorageErrorKind.IO, f"{op.value}: the disk has no power")
        if op is StorageOp.WRITE and self._fires("storage.enospc"):
            raise StorageError(StorageErrorKind.IO, "no space left on device (ENOSPC)")
        if self.bad and op in (StorageOp.READ, StorageOp.WRITE) and length:
            first = offset // BLKIF_SECTOR
            last = (offset + length - 1) // BLKIF_SECTOR
            hit = [s for s in range(first, last + 1) if s in self.bad]
            failing = "read" if op is StorageOp.READ else "write"
            if any(self.bad[s] in (failing, "both") for s in hit):
                if self._fires("storage.eio"):
                    bad = next(s for s in hit if self.bad[s] in (failing, "both"))
                    raise StorageError(
                        StorageErrorKind.IO, f"{op.value}: bad sector {bad} (injected EIO)"
                    )
                return
            if op is StorageOp.WRITE:  # a write rewrites a read-bad sector: it is good again
                for s in hit:
                    del self.bad[s]

    def drops(self, op: StorageOp) -> bool:
        return op is StorageOp.WRITE and self._fires("storage.drop-writes")

    async def before(self, op: StorageOp, offset: int, length: int) -> None:
        """The `StorageFaults` seam."""
        self.check(op, offset, length)
        delay = self.delay()
        if delay > 0:
            await trio.sleep(delay)


class FaultyStorage:
    """A `Storage` that passes every call through `policy` and, with `write_cache`, keeps
    writes in a volatile cache until a flush."""

    def __init__(
        self, inner: Storage, policy: StoragePolicy | None = None, *, write_cache: bool = False
    ) -> None:
        self.inner = inner
        self.policy = policy if policy is not None else StoragePolicy()
        self.write_cache = write_cache
        self._sector = inner.info().sector_size
        self._cache: dict[int, bytes] = {}  # logical sector -> data not yet flushed
        self._flushing: dict[int, bytes] = {}  # being written by a flush in progress
        # One flush at a time: a flush must not complete while an earlier one still writes.
        self._flush_lock = trio.Lock()

    # -- the Injector side -------------------------------------------------------------------

    def start(self, fault: ScheduledFault) -> None:
        self.policy.activate(fault)
        if fault.kind == "storage.power-cut":
            self.power_cut()

    def stop(self, fault: ScheduledFault) -> None:
        self.policy.deactivate(fault)

    def power_cut(self) -> None:
        """Lose the volatile cache (and what an unfinished flush had not written yet)."""
        self._cache.clear()
        self._flushing.clear()

    @property
    def dirty_sectors(self) -> int:
        return len(self._cache) + len(self._flushing)

    # -- Storage -------------------------------------------------------------------------------

    def info(self) -> StorageInfo:
        return self.inner.info()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def _enter(self, op: StorageOp, offset: int, length: int) -> None:
        self.policy.check(op, offset, length)
        delay = self.policy.delay()
        if delay > 0:
            await trio.sleep(delay)

    async def readinto(self, offset: int, buffers: Sequence[ReadBuffer]) -> None:
        length = sum(memoryview(b).nbytes for b in buffers)
        await self._enter(StorageOp.READ, offset, length)
        # What the caches hold for the range, taken before the inner read: a flush running
        # meanwhile may write a sector back and drop it from `_flushing` after the inner
        # read saw the old data; the snapshot still covers it (no torn blocks).
        overlay = self._snapshot(offset, length) if self._cache or self._flushing else None
        await self.inner.readinto(offset, buffers)
        if overlay:
            self._overlay(offset, buffers, overlay)

    def _snapshot(self, offset: int, length: int) -> dict[int, bytes]:
        first = offset // self._sector
        end = (offset + length + self._sector - 1) // self._sector
        out: dict[int, bytes] = {}
        for sector in range(first, end):
            data = self._cache.get(sector, self._flushing.get(sector))
            if data is not None:
                out[sector] = data
        return out

    def _overlay(
        self, offset: int, buffers: Sequence[ReadBuffer], overlay: dict[int, bytes]
    ) -> None:
        size = self._sector
        for buf in buffers:
            view = memoryview(buf).cast("B")
            for i in range(0, view.nbytes, size):
                data = overlay.get((offset + i) // size)
                if data is not None:
                    view[i : i + size] = data
            offset += view.nbytes

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, [buf])
        return bytes(buf)

    async def write(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        length = sum(memoryview(b).nbytes for b in buffers)
        await self._enter(StorageOp.WRITE, offset, length)
        if self.policy.drops(StorageOp.WRITE):
            await trio.lowlevel.checkpoint()
            return
        if not self.write_cache:
            await self.inner.write(offset, buffers)
            return
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        info = self.inner.info()
        if (
            info.read_only
            or offset % self._sector
            or len(data) % self._sector
            or offset + len(data) > info.size
        ):
            await self.inner.write(offset, buffers)  # let the inner disk refuse it
            return
        first = offset // self._sector
        for i in range(0, len(data), self._sector):
            self._cache[first + i // self._sector] = data[i : i + self._sector]
        await trio.lowlevel.checkpoint()

    async def flush(self) -> None:
        await self._enter(StorageOp.FLUSH, 0, 0)
        async with self._flush_lock:
            await self._flush_cache()
        await self.inner.flush()

    async def _flush_cache(self) -> None:
        if self._cache:
            # What this flush covers: every write completed before it began.
            self._flushing.update(self._cache)
            self._cache.clear()
            for sector in sorted(self._flushing):
                data = self._flushing.get(sector)
                if data is None:  # a power cut during the flush
                    break
                await self.inner.write(sector * self._sector, [data])
                if self._flushing.get(sector) is data:
                    del self._flushing[sector]
            if not self.policy.powered:
                raise StorageError(StorageErrorKind.IO, "flush: the disk lost power")

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        await self._enter(StorageOp.DISCARD, offset, length)
        await self.inner.discard(offset, length, secure=secure)
        self._forget(offset // self._sector, (offset + length) // self._sector)

    async def resize(self, new_size: int) -> None:
        await self._enter(StorageOp.RESIZE, new_size, 0)
        await self.inner.resize(new_size)
        self._forget(new_size // self._sector, None)

    def _forget(self, first: int, end: int | None) -> None:
        for table in (self._cache, self._flushing):
            for sector in [s for s in table if s >= first and (end is None or s < end)]:
                del table[sector]

    async def close(self) -> None:
        await self.inner.close()


class StorageInjector:
    """`Injector` for the `storage.*` kinds: one `FaultyStorage` per device id."""

    def __init__(self, disks: dict[str, FaultyStorage]) -> None:
        self.disks = disks

    def handles(self, fault: ScheduledFault) -> bool:
        return fault.kind in STORAGE_KINDS and fault.target in self.disks

    def start(self, fault: ScheduledFault) -> None:
        self.disks[fault.target].start(fault)

    def stop(self, fault: ScheduledFault) -> None:
        self.disks[fault.target].stop(fault)
