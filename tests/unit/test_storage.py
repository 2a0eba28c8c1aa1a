"""Storage semantics shared by every implementation (MemoryDisk and RawImage)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.storage import (
    MemoryDisk,
    RawImage,
    Storage,
    StorageError,
    StorageErrorKind,
    StorageFaults,
    StorageOp,
)

MiB = 1 << 20
Factory = Callable[..., Storage]


def _memory(_tmp: Path) -> Factory:
    def make(size: int, **kw: object) -> Storage:
        return MemoryDisk(size, **kw)  # type: ignore[arg-type]

    return make


def _raw(tmp: Path) -> Factory:
    counter = iter(range(1_000_000))

    def make(size: int, *, read_only: bool = False, **kw: object) -> Storage:
        path = tmp / f"disk{next(counter)}.img"
        if read_only:
            path.write_bytes(b"")
            with path.open("r+b") as f:
                f.truncate(size)
            return RawImage(path, read_only=True, **kw)  # type: ignore[arg-type]
        return RawImage(path, size=size, create=True, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture(params=["memory", "raw"])
def make_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return {"memory": _memory, "raw": _raw}[request.param](tmp_path)


def _pattern(tag: int, n: int) -> bytes:
    return random.Random(tag).randbytes(n)


async def test_gather_write_scatter_read_roundtrip(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(4 * MiB)
        data = _pattern(1, 12 * 1024)
        await disk.write(8192, [data[:512], memoryview(data)[512:4096], bytearray(data[4096:])])
        bufs = [memoryview(bytearray(n)) for n in (4096, 1024, 7168)]
        await disk.readinto(8192, bufs)
        assert b"".join(bytes(b) for b in bufs) == data
        assert await disk.read(0, 8192) == bytes(8192)
        info = disk.info()
        assert info.size == 4 * MiB and info.sectors == 8192 and info.sector_size == 512
        await disk.close()


async def test_out_of_range_is_refused_and_changes_nothing(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB)
        for offset, length in ((MiB, 512), (MiB - 512, 1024), (-512, 512), (2 * MiB, 0)):
            with pytest.raises(StorageError) as err:
                await disk.write(offset, [bytes(length)])
            assert err.value.kind is StorageErrorKind.OUT_OF_RANGE
            with pytest.raises(StorageError, match="outside the disk"):
                await disk.read(offset, length)
        with pytest.raises(StorageError) as err:
            await disk.discard(MiB - 512, 1024)
        assert err.value.kind is StorageErrorKind.OUT_OF_RANGE
        assert await disk.read(0, MiB) == bytes(MiB)


async def test_misaligned_requests_are_refused(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB, sector_size=4096)
        assert disk.info().sector_size == 4096 and disk.info().sectors == MiB // 512
        cases = [
            (512, [bytes(4096)]),  # offset not on a 4K sector
            (0, [bytes(512)]),  # length not whole 4K sectors
            (0, [bytes(2048), bytes(2048)]),  # whole in total, but each segment must be too
        ]
        for offset, bufs in cases:
            with pytest.raises(StorageError) as err:
                await disk.write(offset, bufs)
            assert err.value.kind is StorageErrorKind.MISALIGNED
        with pytest.raises(StorageError, match="aligned"):
            await disk.discard(4096, 512)
        with pytest.raises(StorageError) as err:
            await disk.resize(MiB + 512)
        assert err.value.kind is StorageErrorKind.MISALIGNED
        await disk.write(4096, [bytes(range(256)) * 16, b"\xff" * 4096])
        assert await disk.read(4096, 8192) == bytes(range(256)) * 16 + b"\xff" * 4096
        assert await disk.read(0, 4096) == bytes(4096)


def test_bad_sector_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="sector size 1024"):
        MemoryDisk(MiB, sector_size=1024)
    with pytest.raises(StorageError, match="sector size 2048"):
        RawImage(tmp_path / "x.img", size=MiB, create=True, sector_size=2048)
    assert not (tmp_path / "x.img").exists()


async def test_read_only_refuses_every_change(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB, read_only=True)
        assert disk.info().read_only and not disk.info().flush and not disk.info().discard
        for call in (
            disk.write(0, [b"x" * 512]),
            disk.discard(0, 512),
            disk.flush(),
            disk.resize(2 * MiB),
        ):
            with pytest.raises(StorageError) as err:
                await call
            assert err.value.kind is StorageErrorKind.READ_ONLY
        assert await disk.read(0, 4096) == bytes(4096)
        assert disk.info().size == MiB


async def test_discard_zeroes_the_range(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB)
        data = _pattern(2, 64 * 1024)
        await disk.write(0, [data])
        await disk.discard(8192, 16384)
        got = await disk.read(0, 64 * 1024)
        assert got == data[:8192] + bytes(16384) + data[24576:]


async def test_resize_grows_and_shrinks(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB)
        await disk.write(MiB - 512, [b"\x5a" * 512])
        await disk.resize(2 * MiB)
        assert disk.info().sectors == 2 * MiB // 512
        assert await disk.read(MiB - 512, 1024) == b"\x5a" * 512 + bytes(512)
        await disk.write(2 * MiB - 512, [b"\xa5" * 512])
        await disk.resize(MiB // 2)
        assert disk.info().size == MiB // 2
        with pytest.raises(StorageError, match="outside"):
            await disk.read(MiB - 512, 512)


async def test_closed_disk_refuses_calls(make_disk: Factory) -> None:
    with trio.fail_after(10):
        disk = make_disk(MiB)
        await disk.close()
        await disk.close()  # idempotent
        with pytest.raises(StorageError) as err:
            await disk.read(0, 512)
        assert err.value.kind is StorageErrorKind.CLOSED


class FailNth:
    """A fault plan double: fails the n-th call of one op, records every call it saw."""

    def __init__(self, op: StorageOp, n: int) -> None:
        self.op, self.n = op, n
        self.seen: list[tuple[StorageOp, int, int]] = []

    async def before(self, op: StorageOp, offset: int, length: int) -> None:
        self.seen.append((op, offset, length))
        if op is self.op:
            self.n -= 1
            if self.n == 0:
                raise StorageError(StorageErrorKind.IO, "injected fault")


async def test_fault_seam_can_fail_a_call_without_side_effects(make_disk: Factory) -> None:
    with trio.fail_after(10):
        faults = FailNth(StorageOp.WRITE, 2)
        _: StorageFaults = faults
        disk = make_disk(MiB, faults=faults)
        await disk.write(0, [b"\x01" * 512])
        with pytest.raises(StorageError, match="injected fault"):
            await disk.write(512, [b"\x02" * 512])
        await disk.write(1024, [b"\x03" * 512])
        assert await disk.read(0, 1536) == b"\x01" * 512 + bytes(512) + b"\x03" * 512
        await disk.flush()
        await disk.discard(0, 512)
        await disk.resize(2 * MiB)
        assert [op for op, _, _ in faults.seen] == [
            StorageOp.WRITE,
            StorageOp.WRITE,
            StorageOp.WRITE,
            StorageOp.READ,
            StorageOp.FLUSH,
            StorageOp.DISCARD,
            StorageOp.RESIZE,
        ]
        assert faults.seen[1] == (StorageOp.WRITE, 512, 512)


class Delay:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def before(self, op: StorageOp, offset: int, length: int) -> None:
        await trio.sleep(self.seconds)


async def test_fault_seam_can_delay_a_call(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(100):
        disk = MemoryDisk(MiB, faults=Delay(5.0))
        start = trio.current_time()
        await disk.write(0, [b"z" * 512])
        assert trio.current_time() - start == pytest.approx(5.0)
        assert disk.data[:512] == b"z" * 512


async def test_many_concurrent_tasks_keep_their_data(make_disk: Factory) -> None:
    with trio.fail_after(30):
        disk = make_disk(8 * MiB)
        chunk = 64 * 1024

        async def worker(i: int) -> None:
            for round_ in range(4):
                data = _pattern(i * 100 + round_, chunk)
                await disk.write(i * chunk, [data[: chunk // 2], data[chunk // 2 :]])
                assert await disk.read(i * chunk, chunk) == data

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(worker, i)
        for i in range(64):
            assert await disk.read(i * chunk, chunk) == _pattern(i * 100 + 3, chunk)


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "read", "discard"]),
        st.integers(0, 255),  # first sector
        st.integers(1, 32),  # sectors
        st.integers(1, 4),  # buffers
        st.integers(0, 2**32),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops=ops, sector_size=st.sampled_from([512, 4096]))
def test_random_operations_match_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops, sector_size
):  # type: ignore[no-untyped-def]
    size = 256 * sector_size
    path = tmp_path_factory.mktemp("model") / "d.img"

    async def run() -> None:
        model = bytearray(size)
        disks: list[Storage] = [
            MemoryDisk(size, sector_size=sector_size),
            RawImage(path, size=size, create=True, sector_size=sector_size),
        ]
        for op, first, count, nbufs, seed in ops:
            offset, length = first * sector_size, count * sector_size
            in_range = offset + length <= size
            data = random.Random(seed).randbytes(length)
            inner = random.Random(seed).sample(range(1, count), min(nbufs, count) - 1)
            cuts = [0, *sorted(s * sector_size for s in inner), length]
            bufs = [data[a:b] for a, b in itertools.pairwise(cuts)]
            for disk in disks:
                if not in_range:
                    with pytest.raises(StorageError):
                        await disk.read(offset, length)
                    continue
                if op == "write":
                    await disk.write(offset, bufs)
                elif op == "discard":
                    await disk.discard(offset, length)
                else:
                    assert await disk.read(offset, length) == bytes(model[offset : offset + length])
            if in_range and op == "write":
                model[offset : offset + length] = data
            elif in_range and op == "discard":
                model[offset : offset + length] = bytes(length)
        for disk in disks:
            assert await disk.read(0, size) == bytes(model)
            await disk.close()
        assert path.read_bytes() == bytes(model)  # the independent reader

    trio.run(run)
