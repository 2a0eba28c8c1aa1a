"""blkfront's submission/completion queue (`Blkfront.io_queue()`) against blkback on an
image file: many I/Os in flight from one task, completions in batches, the device's queue
depth shared with `read`/`write`, errors per I/O, detach, and re-issue across a backend
restart."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from frontends.blkfront import BlkError, attach
from tests.integration.blk_env import DEVICE, Pair, make_vbd, pair, start_backend
from tests.integration.conftest import Xenstored
from tests.integration.test_blkback import read_image
from xenpv.toolstack.topology import VbdFeatures

SIZE = 4 << 20


@asynccontextmanager
async def zeroed_disk_served(
    xenstored: Xenstored, workdir: Path
) -> AsyncIterator[tuple[Pair, trio.CancelScope]]:
    """Two domains over shm, a SIZE-byte zeroed image as DEVICE and blkback serving it: the
    pair, and the backend's own cancel scope (the backend stops on exit anyway)."""
    image = workdir / "disk.img"
    image.write_bytes(bytes(SIZE))
    async with pair(workdir, xenstored.unix, "shm", 4096) as p:
        await make_vbd(p.xs, image=str(image), size=SIZE)
        async with trio.open_nursery() as nursery:
            backend = start_backend(nursery, p)
            yield p, backend
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("transport", "page_size", "persistent"),
    [("shm", 4096, True), ("socket", 65536, True), ("shm", 16384, False)],
)
async def test_many_ios_in_flight_from_one_task(
    xenstored: Xenstored, xs_workdir: Path, transport: str, page_size: int, persistent: bool
) -> None:
    image = xs_workdir / "disk.img"
    rng = random.Random(5)
    model = bytearray(rng.randbytes(SIZE))
    image.write_bytes(model)
    with trio.fail_after(60):
        async with pair(
            xs_workdir, xenstored.unix, transport, page_size, guest_memory=64 << 20
        ) as p:
            await make_vbd(
                p.xs, image=str(image), size=SIZE, features=VbdFeatures(persistent=persistent)
            )
            async with trio.open_nursery() as nursery:
                start_backend(nursery, p)
                async with attach(p.guest, p.xs, DEVICE, queue_depth=16) as front:
                    await front.wait_connected()
                    queue = front.io_queue()
                    # queue_depth is shared: a 17th submission would block
                    reused = bytearray(65536)
                    expected: dict[int, bytes] = {}
                    for i in range(16):
                        # The I/Os run concurrently, so a write overlaps nothing else: each
                        # has its own 256 KiB of the first half; reads use the second half.
                        if i % 3 == 0:
                            length = rng.choice([512, 4096, 65536])
                            offset = i // 3 * (256 << 10) + rng.randrange(0, 256) * 512
                        else:
                            length = rng.choice([512, 4096, 65536, 1 << 20])
                            half = (SIZE // 2 - length) // 512
                            offset = SIZE // 2 + rng.randrange(0, half) * 512
                        if i % 3 == 0:
                            data = rng.randbytes(length)
                            queue.write(offset, data, tag=i)
                            model[offset : offset + length] = data
                            expected[i] = b""
                        elif i == 1:
                            queue.readinto(offset, memoryview(reused)[:512], tag=i)
                            expected[i] = bytes(model[offset : offset + 512])
                        else:
                            queue.read(offset, length, tag=i)
                            expected[i] = bytes(model[offset : offset + length])
                    assert queue.in_flight == 16
                    with pytest.raises(trio.WouldBlock):
                        queue.read(0, 512)
                    seen: dict[int, bytes] = {}
                    while queue.in_flight:
                        for done in await queue.wait():
                            assert done.error is None
                            assert done.tag not in seen  # each I/O completes once
                            seen[done.tag] = b"" if done.data is None else bytes(done.data)
                    assert seen == expected
                    assert await queue.wait() == []  # nothing in flight: returns at once
                    assert await front.read(0, SIZE) == bytes(model)
                nursery.cancel_scope.cancel()
    assert read_image(image, 0, SIZE) == bytes(model)


async def test_errors_and_checks_per_io(xenstored: Xenstored, xs_workdir: Path) -> None:
    with trio.fail_after(30):
        async with (
            zeroed_disk_served(xenstored, xs_workdir) as (p, _backend),
            attach(p.guest, p.xs, DEVICE, queue_depth=4) as front,
        ):
            queue = front.io_queue()
            with pytest.raises(BlkError, match="not connected"):
                queue.read(0, 512)  # before the first connection
            await front.wait_connected()
            with pytest.raises(BlkError):
                queue.read(SIZE, 512)  # past the end: refused before the ring
            with pytest.raises(BlkError):
                queue.write(100, b"x" * 512)  # misaligned
            with pytest.raises(ValueError):
                queue.readinto(0, b"\0" * 512)  # type: ignore[arg-type]
            assert queue.in_flight == 0
            queue.write(0, b"\1" * 4096, tag="w")
            (done,) = await queue.wait()
            assert done == ("w", None, None)
            for i in range(4):
                queue.read(0, 512, tag=i)
            with pytest.raises(trio.WouldBlock):  # queue_depth=4
                queue.read(0, 512)
            got = []
            while queue.in_flight:
                got += await queue.wait()
            assert sorted(d.tag for d in got) == [0, 1, 2, 3]
            assert all(bytes(d.data or b"") == b"\1" * 512 and d.error is None for d in got)
            # the permits came back: read() shares the same queue depth
            assert await front.read(0, 512) == b"\1" * 512


async def test_detach_fails_what_never_completed(xenstored: Xenstored, xs_workdir: Path) -> None:
    """I/Os submitted while no backend serves the device fail at detach, once each."""
    with trio.fail_after(30):
        async with zeroed_disk_served(xenstored, xs_workdir) as (p, backend):
            async with attach(p.guest, p.xs, DEVICE) as front:
                await front.wait_connected()
                queue = front.io_queue()
                backend.cancel()  # the backend goes away before it can take them
                for i in range(5):
                    queue.read(i * 4096, 4096, tag=i)
                queue.submit()
            results: list[tuple[object, object]] = []
            while queue.in_flight:
                results += [(d.tag, type(d.error)) for d in await queue.wait()]
            assert sorted(results, key=str) == [(i, BlkError) for i in range(5)]


@pytest.mark.parametrize("transport", ["shm", "socket"])
async def test_reissued_across_a_backend_restart(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    """The backend is replaced with writes in flight through the queue: every write
    completes exactly once and is on disk."""
    image = xs_workdir / "disk.img"
    model = bytearray(SIZE)
    rng = random.Random(9)
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, transport, 4096, guest_memory=32 << 20) as p:
            await make_vbd(p.xs, image=str(image), size=SIZE)
            async with trio.open_nursery() as nursery:
                first = start_backend(nursery, p)
                async with attach(p.guest, p.xs, DEVICE, queue_depth=8) as front:
                    await front.wait_connected()
                    queue = front.io_queue()
                    completed: set[int] = set()
                    tag = 0

                    def submit() -> None:
                        nonlocal tag
                        length = rng.choice([4096, 65536])
                        # each write its own region, so the final contents do not depend
                        # on the completion order
                        offset = (tag * 65536) % (SIZE - 65536)
                        data = rng.randbytes(length)
                        queue.write(offset, data, tag=tag)
                        model[offset : offset + length] = data
                        tag += 1

                    for _ in range(8):
                        submit()
                    while tag < 48:
                        for done in await queue.wait():
                            assert done.error is None
                            assert done.tag not in completed
                            completed.add(done.tag)
                            if tag == 16:
                                first.cancel()  # writes in flight when the backend goes
                                start_backend(nursery, p)
                            if tag < 48:
                                submit()
                    while queue.in_flight:
                        for done in await queue.wait():
                            assert done.error is None and done.tag not in completed
                            completed.add(done.tag)
                    assert completed == set(range(48))
                    assert front.connections >= 2
                    assert await front.read(0, SIZE) == bytes(model)
                nursery.cancel_scope.cancel()
    assert read_image(image, 0, SIZE) == bytes(model)
