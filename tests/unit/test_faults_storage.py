"""FaultyStorage and StoragePolicy against MemoryDisk: dm-dust EIO, power cut, and friends."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from backends.storage import MemoryDisk, StorageError, StorageOp
from tests.unit.faults_helpers import fault
from xenpv.faults.storage import FaultyStorage, StorageInjector, StoragePolicy

SECTOR = 512
DEV = "device:guest4k:vbd:xvda"


def eio(op: str = "read", sector: int = 8, sectors: int = 4) -> object:
    return fault("storage.eio", DEV, op=op, sector=sector, sectors=sectors)


async def test_eio_range_fails_reads_and_a_write_clears_it() -> None:
    with trio.fail_after(5):
        disk = FaultyStorage(MemoryDisk(64 * SECTOR))
        f = eio()
        disk.start(f)  # type: ignore[arg-type]
        assert await disk.read(0, 8 * SECTOR) == bytes(8 * SECTOR)  # before the range
        with pytest.raises(StorageError, match="bad sector 8"):
            await disk.read(8 * SECTOR, SECTOR)
        with pytest.raises(StorageError, match="bad sector 10"):
            await disk.read(10 * SECTOR, 4 * SECTOR)
        await disk.write(9 * SECTOR, [b"x" * SECTOR])  # dm-dust: rewriting a bad block fixes it
        assert await disk.read(9 * SECTOR, SECTOR) == b"x" * SECTOR
        with pytest.raises(StorageError):
            await disk.read(8 * SECTOR, SECTOR)  # its neighbours stay bad
        disk.stop(f)  # type: ignore[arg-type]
        assert await disk.read(8 * SECTOR, SECTOR) == bytes(SECTOR)


async def test_eio_write_mode_fails_writes_without_clearing() -> None:
    with trio.fail_after(5):
        inner = MemoryDisk(64 * SECTOR)
        disk = FaultyStorage(inner)
        disk.start(eio("write", 0, 2))  # type: ignore[arg-type]
        for _ in range(2):
            with pytest.raises(StorageError, match="injected EIO"):
                await disk.write(0, [b"y" * SECTOR])
        assert inner.data[:SECTOR] == bytes(SECTOR)  # a failed call changed nothing
        assert await disk.read(0, SECTOR) == bytes(SECTOR)  # reads are fine in write mode


async def test_power_cut_loses_unflushed_writes_only() -> None:
    with trio.fail_after(5):
        inner = MemoryDisk(64 * SECTOR)
        disk = FaultyStorage(inner, write_cache=True)
        await disk.write(0, [b"a" * SECTOR])
        await disk.flush()
        await disk.write(SECTOR, [b"b" * SECTOR])
        await disk.write(0, [b"c" * SECTOR])  # overwrites a flushed sector, unflushed
        assert await disk.read(0, 2 * SECTOR) == b"c" * SECTOR + b"b" * SECTOR  # cache visible
        assert inner.data[: 2 * SECTOR] == b"a" * SECTOR + bytes(SECTOR)  # not on the medium
        cut = fault("storage.power-cut", DEV)
        disk.start(cut)
        with pytest.raises(StorageError, match="no power"):
            await disk.read(0, SECTOR)
        disk.stop(cut)
        assert await disk.read(0, 2 * SECTOR) == b"a" * SECTOR + bytes(SECTOR)
        assert disk.dirty_sectors == 0


async def test_flush_makes_writes_durable_across_a_power_cut() -> None:
    with trio.fail_after(5):
        inner = MemoryDisk(16 * SECTOR)
        disk = FaultyStorage(inner, write_cache=True)
        await disk.write(2 * SECTOR, [b"q" * (2 * SECTOR)])
        await disk.flush()
        disk.start(fault("storage.power-cut", DEV))
        disk.stop(fault("storage.power-cut", DEV))
        assert await disk.read(2 * SECTOR, 2 * SECTOR) == b"q" * (2 * SECTOR)


async def test_drop_writes_acknowledges_and_forgets() -> None:
    with trio.fail_after(5):
        disk = FaultyStorage(MemoryDisk(16 * SECTOR))
        f = fault("storage.drop-writes", DEV)
        disk.start(f)
        await disk.write(0, [b"z" * SECTOR])  # acknowledged
        disk.stop(f)
        assert await disk.read(0, SECTOR) == bytes(SECTOR)


async def test_enospc_and_latency_through_the_existing_seam(autojump_clock: object) -> None:
    with trio.fail_after(5):
        policy = StoragePolicy()
        disk = MemoryDisk(16 * SECTOR, faults=policy)
        full = fault("storage.enospc", DEV)
        policy.activate(full)
        with pytest.raises(StorageError, match="ENOSPC"):
            await disk.write(0, [b"z" * SECTOR])
        await disk.read(0, SECTOR)  # reads still work on a full disk
        policy.deactivate(full)
        slow = fault("storage.latency", DEV, "f1.0", delay=0.25)
        policy.activate(slow)
        start = trio.current_time()
        await disk.write(0, [b"z" * SECTOR])
        assert trio.current_time() - start == pytest.approx(0.25)
        policy.deactivate(slow)
        policy.check(StorageOp.WRITE, 0, SECTOR)  # healed: nothing raised


async def test_count_limits_hits_and_injector_dispatches() -> None:
    with trio.fail_after(5):
        disk = FaultyStorage(MemoryDisk(16 * SECTOR))
        injector = StorageInjector({DEV: disk})
        limited = fault("storage.enospc", DEV)
        limited = type(limited)(limited.id, 0, limited.kind, DEV, 0.0, 1.0, None, 2, limited.params)
        assert injector.handles(limited)
        assert not injector.handles(fault("link.loss", "link:a-b"))
        injector.start(limited)
        for _ in range(2):
            with pytest.raises(StorageError):
                await disk.write(0, [b"1" * SECTOR])
        await disk.write(0, [b"1" * SECTOR])  # the count is spent
        injector.stop(limited)


class _ReadsThenWaits:
    """A disk whose reads take their data first and return after other tasks ran (a flush
    can write back meanwhile): the order a slow real read can see."""

    def __init__(self, inner: MemoryDisk, let_run: trio.Event) -> None:
        self.inner = inner
        self.let_run = let_run

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def readinto(self, offset: int, buffers: list[bytearray]) -> None:
        await self.inner.readinto(offset, buffers)
        await self.let_run.wait()


async def test_a_read_racing_a_flush_sees_the_cached_write_whole() -> None:
    with trio.fail_after(5):
        let_run = trio.Event()
        inner = MemoryDisk(16 * SECTOR)
        disk = FaultyStorage(_ReadsThenWaits(inner, let_run), write_cache=True)  # type: ignore[arg-type]
        await disk.write(0, [b"A" * (8 * SECTOR)])
        await disk.flush()
        await disk.write(0, [b"B" * (8 * SECTOR)])  # in the volatile cache
        got: list[bytes] = []

        async def read() -> None:
            got.append(await disk.read(0, 8 * SECTOR))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()  # the read has the old data
            await disk.flush()  # writes B back and empties the caches
            let_run.set()
        assert got == [b"B" * (8 * SECTOR)]
