"""The trio NBD server over an in-memory disk, driven by a minimal client over a Unix socket."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from tests.unit.nbd_client import NbdClient, nbd_client
from xenpv.errors import UsageError
from xenpv.nbd import protocol as p
from xenpv.nbd.protocol import Cmd
from xenpv.nbd.server import (
    MAX_IN_FLIGHT,
    MemoryDisk,
    export_of,
    parse_address,
    serve_connection,
    serve_nbd,
    uri_of,
)

SIZE = 1 << 20


class MemoryQueue:
    """An `IoQueue` over a MemoryDisk: I/Os complete at `wait()`, a few at a time."""

    def __init__(self, disk: QueuedMemoryDisk) -> None:
        self.disk = disk
        self.in_flight = 0
        self.queued: list[tuple[str, int, object, object]] = []
        self.arrived = trio.Event()

    def _add(self, op: str, offset: int, arg: object, tag: object) -> None:
        if self.in_flight >= self.disk.depth:
            raise trio.WouldBlock
        self.in_flight += 1
        self.queued.append((op, offset, arg, tag))
        self.arrived.set()

    def read(self, offset: int, length: int, tag: object = None) -> None:
        self._add("read", offset, length, tag)

    def write(self, offset: int, data: bytes, tag: object = None) -> None:
        self._add("write", offset, data, tag)

    def submit(self) -> None:
        self.disk.submits += 1

    async def wait(self) -> list[SimpleNamespace]:
        while not self.queued:
            await self.arrived.wait()
            self.arrived = trio.Event()
        await trio.lowlevel.checkpoint()
        batch, self.queued = self.queued[:3], self.queued[3:]
        out = []
        for op, offset, arg, tag in batch:
            try:
                if op == "read":
                    assert isinstance(arg, int)
                    data = await MemoryDisk.read(self.disk, offset, arg)
                    out.append(SimpleNamespace(tag=tag, data=bytearray(data), error=None))
                else:
                    assert isinstance(arg, bytes)
                    await MemoryDisk.write(self.disk, offset, arg)
                    out.append(SimpleNamespace(tag=tag, data=None, error=None))
            except OSError as exc:
                out.append(SimpleNamespace(tag=tag, data=None, error=exc))
        self.in_flight -= len(out)
        return out


class QueuedMemoryDisk(MemoryDisk):
    """A MemoryDisk with a queue: the server's fast path (as over blkfront)."""

    def __init__(self, size: int, depth: int = 8) -> None:
        super().__init__(size)
        self.depth = depth
        self.submits = 0

    def io_queue(self) -> MemoryQueue:
        return MemoryQueue(self)


DISKS = [MemoryDisk, QueuedMemoryDisk]


@asynccontextmanager
async def served(disk: MemoryDisk, tmp_path: Path, **kw: object) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: serve_nbd(
                disk, f"unix:{tmp_path}/nbd.sock", task_status=task_status, **kw
            )
        )
        try:
            yield bound.removeprefix("unix:")
        finally:
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("make_disk", DISKS)
async def test_write_read_flush_trim_zeroes(tmp_path: Path, make_disk: type[MemoryDisk]) -> None:
    disk = make_disk(SIZE)
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as c:
            assert c.negotiated.size == SIZE and c.negotiated.block_sizes == (512, 4096, 4 << 20)
            assert c.negotiated.flags & p.FLAG_CAN_MULTI_CONN
            data = os.urandom(8192)
            assert (await c.call(Cmd.WRITE, 4096, 8192, payload=data)).error == 0
            assert (await c.call(Cmd.READ, 4096, 8192)).data == data
            assert (await c.call(Cmd.WRITE, 0, 512, payload=b"f" * 512, flags=1)).error == 0
            assert disk.flushes == 1  # FUA = write + flush
            assert (await c.call(Cmd.FLUSH)).error == 0 and disk.flushes == 2
            assert (await c.call(Cmd.TRIM, 4096, 4096)).error == 0
            assert (await c.call(Cmd.WRITE_ZEROES, 8192, 4096)).error == 0
            assert disk.data[4096:12288] == bytes(8192)
            assert disk.data[:512] == b"f" * 512
            assert (await c.call(Cmd.READ, 0, 0)).error == 0  # empty: a no-op
    if isinstance(disk, QueuedMemoryDisk):
        assert disk.submits  # reads and writes went through the queue


@pytest.mark.parametrize("make_disk", DISKS)
async def test_simple_replies_without_structured(
    tmp_path: Path, make_disk: type[MemoryDisk]
) -> None:
    disk = make_disk(SIZE)
    disk.data[:512] = b"a" * 512
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path, structured=False) as c:
            assert not c.negotiated.flags & p.FLAG_SEND_DF
            assert (await c.call(Cmd.READ, 0, 512)).data == b"a" * 512
            assert (await c.call(Cmd.READ, 1, 512)).error == p.EINVAL


@pytest.mark.parametrize("make_disk", DISKS)
async def test_errors_named_by_the_spec(tmp_path: Path, make_disk: type[MemoryDisk]) -> None:
    disk = make_disk(SIZE)
    disk.fail_at = 64 << 10
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as c:
            assert (await c.call(Cmd.READ, SIZE, 512)).error == p.EINVAL
            assert (await c.call(Cmd.WRITE, SIZE, 512, payload=bytes(512))).error == p.ENOSPC
            assert (await c.call(Cmd.READ, 100, 512)).error == p.EINVAL
            assert (await c.call(Cmd.BLOCK_STATUS, 0, 512)).error == p.EINVAL
            failed = await c.call(Cmd.READ, 64 << 10, 512)
            assert failed.error == p.EIO and "injected" in failed.message
            # the connection still works after every error
            assert (await c.call(Cmd.READ, 0, 512)).error == 0


@pytest.mark.parametrize("make_disk", DISKS)
async def test_read_only_export_refuses_writes(tmp_path: Path, make_disk: type[MemoryDisk]) -> None:
    disk = make_disk(SIZE)
    with trio.fail_after(10):
        async with served(disk, tmp_path, read_only=True) as path, nbd_client(path) as c:
            assert c.negotiated.flags & p.FLAG_READ_ONLY
            assert not c.negotiated.flags & p.FLAG_SEND_TRIM
            assert (await c.call(Cmd.WRITE, 0, 512, payload=bytes(512))).error == p.EPERM
            assert (await c.call(Cmd.WRITE_ZEROES, 0, 512)).error == p.EPERM
            assert (await c.call(Cmd.READ, 0, 512)).error == 0


class SlowDisk(MemoryDisk):
    """Reads of the first block wait for a gate: later requests overtake them."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.gate = trio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if offset == 0:
            await self.gate.wait()
        return await super().read(offset, length)


async def test_requests_run_concurrently_and_replies_come_out_of_order(tmp_path: Path) -> None:
    disk = SlowDisk()
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as c:
            await c.send(Cmd.READ, 0, 512, cookie=1)
            for cookie in range(2, 10):
                await c.send(Cmd.READ, cookie * 512, 512, cookie=cookie)
            early = [(await c.reply()).cookie for _ in range(8)]
            assert sorted(early) == list(range(2, 10))
            disk.gate.set()
            assert (await c.reply()).cookie == 1


async def test_disconnect_waits_for_requests_in_flight(tmp_path: Path) -> None:
    disk = SlowDisk()
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as c:
            await c.send(Cmd.READ, 0, 512, cookie=5)
            await c.send(Cmd.DISC)
            disk.gate.set()
            assert (await c.reply()).cookie == 5
            assert await c.at_eof()


@pytest.mark.parametrize("make_disk", DISKS)
async def test_broken_client_does_not_disturb_another(
    tmp_path: Path, make_disk: type[MemoryDisk]
) -> None:
    disk = make_disk(SIZE)
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as good:
            async with nbd_client(path, negotiate=False) as bad:
                await bad.stream.send_all(b"GARBAGE!" * 4)  # not an option header
                assert await bad.at_eof()
            # a client that breaks transmission is cut off too
            async with nbd_client(path) as rude:
                await rude.stream.send_all(b"\xff" * 28)
                assert await rude.at_eof()
            # one that vanishes mid-request
            async with nbd_client(path) as half:
                await half.stream.send_all(p.pack_request(Cmd.WRITE, length=4096)[:20])
            assert (await good.call(Cmd.WRITE, 0, 512, payload=b"z" * 512)).error == 0
            assert (await good.call(Cmd.READ, 0, 512)).data == b"z" * 512


async def test_abort_and_export_name(tmp_path: Path) -> None:
    disk = MemoryDisk(SIZE)
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path:
            async with nbd_client(path, negotiate=False) as c:
                await c.option(p.Opt.ABORT)
                assert (await c.option_reply())[1] == p.REP_ACK
                assert await c.at_eof()
            async with nbd_client(path, negotiate=False) as c:
                await c.option(p.Opt.EXPORT_NAME, b"")
                size, _flags = struct.unpack(">QH", await c.receive_exactly(10))
                assert size == SIZE
                assert (await c.call(Cmd.READ, 0, 512)).error == 0  # simple replies


def test_addresses() -> None:
    assert parse_address("unix:/tmp/x.sock") == ("unix", "/tmp/x.sock", 0)
    assert parse_address("tcp:127.0.0.1:10809") == ("tcp", "127.0.0.1", 10809)
    assert uri_of("unix:/tmp/x.sock") == "nbd+unix:///?socket=/tmp/x.sock"
    assert uri_of("tcp:localhost:10809") == "nbd://localhost:10809"
    assert uri_of("tcp:[::1]:10809") == "nbd://[::1]:10809"
    for bad in ("tcp:nohost", "udp:1.2.3.4:5", "unix:", "tcp:h:99999"):
        with pytest.raises(UsageError):
            parse_address(bad)


def test_export_of_a_disk() -> None:
    export = export_of(MemoryDisk(SIZE + 100, block_size=4096, preferred_block_size=65536))
    assert (export.size, export.min_block, export.preferred_block) == (SIZE, 4096, 65536)
    assert export.multi_conn and export.trim


async def test_tcp_listener_reports_the_picked_port() -> None:
    disk = MemoryDisk(SIZE)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_nbd, disk, "tcp:127.0.0.1:0")
            kind, host, port = parse_address(bound)
            assert kind == "tcp" and port > 0
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                c = NbdClient(stream)
                await c.handshake()
                assert c.negotiated.size == SIZE
            nursery.cancel_scope.cancel()


async def test_listening_on_a_bad_path_is_a_usage_error(tmp_path: Path) -> None:
    with trio.fail_after(10), pytest.raises(UsageError, match="cannot listen"):
        await serve_nbd(MemoryDisk(SIZE), f"unix:{tmp_path}/missing/dir/nbd.sock")


async def test_a_client_that_stops_reading_replies_is_not_read() -> None:
    """Replies hold their request's slot until sent: a client that sends requests without
    reading replies is not read beyond MAX_IN_FLIGHT requests (no replies piling up)."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    disk = MemoryDisk(SIZE)
    sent = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, server_stream, disk, export_of(disk))
            c = NbdClient(client_stream)
            await c.handshake()

            async def flood() -> None:
                nonlocal sent
                for cookie in range(100):
                    await c.send(Cmd.READ, 0, 512, cookie=cookie)
                    sent += 1

            nursery.start_soon(flood)
            await trio.testing.wait_all_tasks_blocked()
            assert MAX_IN_FLIGHT <= sent <= MAX_IN_FLIGHT + 2
            cookies = {(await c.reply()).cookie for _ in range(100)}  # now it reads: all come
            assert cookies == set(range(100))
            nursery.cancel_scope.cancel()


async def test_a_full_queue_falls_back_to_tasks(tmp_path: Path) -> None:
    disk = QueuedMemoryDisk(SIZE, depth=2)
    disk.data[:] = os.urandom(SIZE)
    with trio.fail_after(10):
        async with served(disk, tmp_path) as path, nbd_client(path) as c:
            for cookie in range(20):
                await c.send(Cmd.READ, cookie * 4096, 4096, cookie=cookie)
            replies = [await c.reply() for _ in range(20)]
            assert sorted(r.cookie for r in replies) == list(range(20))
            for r in replies:
                assert r.error == 0 and r.data == disk.data[r.cookie * 4096 : (r.cookie + 1) * 4096]
            await c.send(Cmd.DISC)
            assert await c.at_eof()
