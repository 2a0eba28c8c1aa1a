"""RawImage specifics: sparse files, holes, locking, I/O policies, the independent reader."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
import trio

from backends.storage import IoPolicy, RawImage, StorageError, StorageErrorKind
from backends.storage import raw as raw_module
from backends.storage.vectored import IOV_MAX, skip

MiB = 1 << 20
GiB = 1 << 30


def test_created_sparse_at_the_given_size(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    disk = RawImage(path, size=GiB, create=True)
    st = path.stat()
    assert st.st_size == GiB
    assert st.st_blocks * 512 < MiB  # nothing allocated
    info = disk.info()
    assert info.sectors == GiB // 512 and not info.read_only and info.flush
    assert info.physical_sector_size in (512, 4096, st.st_blksize)
    trio.run(disk.close)


def test_open_errors_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    with pytest.raises(StorageError, match=r"cannot open image .*No such file"):
        RawImage(path)
    with pytest.raises(StorageError, match="needs a size"):
        RawImage(path, create=True)
    disk = RawImage(path, size=MiB, create=True)
    trio.run(disk.close)
    with pytest.raises(StorageError, match="File exists"):
        RawImage(path, size=MiB, create=True)
    with pytest.raises(StorageError, match="expected 4096"):
        RawImage(path, size=4096)
    assert path.stat().st_size == MiB  # a refused open changes nothing


def test_one_writer_per_image(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    writer = RawImage(path, size=MiB, create=True)
    with pytest.raises(StorageError, match="in use"):
        RawImage(path)
    with pytest.raises(StorageError, match="in use"):
        RawImage(path, read_only=True)
    trio.run(writer.close)
    readers = [RawImage(path, read_only=True), RawImage(path, read_only=True)]
    with pytest.raises(StorageError, match="in use"):
        RawImage(path)
    for reader in readers:
        trio.run(reader.close)
    trio.run(RawImage(path).close)


def test_partial_trailing_sector_is_not_exposed(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    path.write_bytes(b"\x07" * (8192 + 100))
    disk = RawImage(path, sector_size=4096)
    assert disk.info().size == 8192
    trio.run(disk.close)


async def test_writes_reach_the_file_for_an_independent_reader(tmp_path: Path) -> None:
    with trio.fail_after(30):
        path = tmp_path / "d.img"
        size = 16 * MiB
        disk = RawImage(path, size=size, create=True)
        rng = random.Random(5)
        model: dict[int, bytes] = {}
        for _ in range(200):
            sectors = rng.choice([1, 8, 64, 2048])
            first = rng.randrange(0, size // 512 - sectors)
            data = rng.randbytes(sectors * 512)
            await disk.write(first * 512, [data])
            for i in range(sectors):
                model[first + i] = data[i * 512 : (i + 1) * 512]
        await disk.flush()
        with path.open("rb") as f:  # plain open()/read, not our code
            for sector, data in model.items():
                f.seek(sector * 512)
                assert f.read(512) == data
        await disk.close()


async def test_discard_punches_a_hole(tmp_path: Path) -> None:
    with trio.fail_after(30):
        path = tmp_path / "d.img"
        disk = RawImage(path, size=8 * MiB, create=True)
        info = disk.info()
        assert info.discard and not info.discard_secure and info.discard_alignment == 0
        assert info.discard_granularity >= 512
        await disk.write(0, [b"\xee" * (4 * MiB)])
        await disk.flush()
        full = path.stat().st_blocks * 512
        assert full >= 4 * MiB
        await disk.discard(MiB, 2 * MiB)
        freed = full - path.stat().st_blocks * 512
        assert freed >= 2 * MiB - 2 * info.discard_granularity
        assert await disk.read(MiB, 2 * MiB) == bytes(2 * MiB)
        data = path.read_bytes()
        assert data[:MiB] == b"\xee" * MiB and data[MiB : 3 * MiB] == bytes(2 * MiB)
        assert data[3 * MiB : 4 * MiB] == b"\xee" * MiB and path.stat().st_size == 8 * MiB
        with pytest.raises(StorageError) as err:
            await disk.discard(0, 512, secure=True)
        assert err.value.kind is StorageErrorKind.UNSUPPORTED
        await disk.close()


async def test_filesystem_without_hole_punching_reports_no_discard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(raw_module, "punch_hole", refuse)
    with trio.fail_after(10):
        disk = RawImage(tmp_path / "d.img", size=MiB, create=True)
        assert not disk.info().discard
        with pytest.raises(StorageError) as err:
            await disk.discard(0, 512)
        assert err.value.kind is StorageErrorKind.UNSUPPORTED
        await disk.close()


async def test_resize_changes_the_file(tmp_path: Path) -> None:
    with trio.fail_after(10):
        path = tmp_path / "d.img"
        disk = RawImage(path, size=MiB, create=True, sector_size=4096)
        await disk.resize(3 * MiB)
        assert path.stat().st_size == 3 * MiB and disk.info().sectors == 3 * MiB // 512
        await disk.write(3 * MiB - 4096, [b"\x42" * 4096])
        assert path.read_bytes()[-4096:] == b"\x42" * 4096
        await disk.close()


@pytest.mark.parametrize("mode", ["auto", "inline", "thread"])
@pytest.mark.parametrize("inline_max", [4096, 1 << 20])
async def test_every_io_policy_moves_the_same_bytes(
    tmp_path: Path, mode: str, inline_max: int
) -> None:
    with trio.fail_after(30):
        path = tmp_path / "d.img"
        policy = IoPolicy(mode=mode, inline_read_max=inline_max, inline_write_max=inline_max)  # type: ignore[arg-type]
        disk = RawImage(path, size=4 * MiB, create=True, policy=policy)
        rng = random.Random(mode)
        for length in (512, 4096, 65536, MiB):
            data = rng.randbytes(length)
            await disk.write(length, [data])
            assert await disk.read(length, length) == data
        # more segments than one preadv/pwritev may take
        pieces = [rng.randbytes(512) for _ in range(IOV_MAX + 77)]
        await disk.write(0, pieces)
        out = [memoryview(bytearray(512)) for _ in pieces]
        await disk.readinto(0, out)
        assert [bytes(v) for v in out] == pieces
        assert path.read_bytes()[: 512 * len(pieces)] == b"".join(pieces)
        await disk.close()


async def test_truncated_image_is_an_io_error_not_garbage(tmp_path: Path) -> None:
    with trio.fail_after(10):
        path = tmp_path / "d.img"
        disk = RawImage(path, size=MiB, create=True)
        os.truncate(path, 4096)  # someone else shrinks the file under us
        with pytest.raises(StorageError) as err:
            await disk.read(0, 8192)
        assert err.value.kind is StorageErrorKind.IO and "truncated" in str(err.value)
        await disk.close()


async def test_close_waits_for_calls_in_flight(tmp_path: Path) -> None:
    with trio.fail_after(30):
        disk = RawImage(
            tmp_path / "d.img", size=8 * MiB, create=True, policy=IoPolicy(mode="thread")
        )
        outcomes: list[str] = []
        busy = trio.Event()  # set once reads have been completing for a while

        async def reader() -> None:
            try:
                while True:
                    await disk.read(0, MiB)
                    outcomes.append("ok")
                    if len(outcomes) >= 16:
                        busy.set()
            except StorageError as exc:
                assert exc.kind is StorageErrorKind.CLOSED
                outcomes.append("closed")

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
            await busy.wait()
            await disk.close()
        assert outcomes.count("closed") == 8 and outcomes.count("ok") >= 16


def test_skip_resumes_mid_buffer() -> None:
    views = [memoryview(b"abc"), memoryview(b"de"), memoryview(b"fgh")]
    assert [bytes(v) for v in skip(views, 0)] == [b"abc", b"de", b"fgh"]
    assert [bytes(v) for v in skip(views, 4)] == [b"e", b"fgh"]
    assert [bytes(v) for v in skip(views, 5)] == [b"fgh"]
    assert skip(views, 8) == []
