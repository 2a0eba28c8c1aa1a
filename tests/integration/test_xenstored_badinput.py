"""Bad and hostile input: the offending connection gets an error or is dropped, the server
keeps serving everybody else."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from xenpv import identity
from xenpv.identity import DomainKey
from xenpv.xenstore.client import connect
from xenpv.xenstore.wire import (
    HEADER,
    FrameReader,
    Message,
    XsError,
    XsType,
    error_name,
    join_strings,
)

TIMEOUT = 30


class Raw:
    """A bare xs_wire connection on the dom0 socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = FrameReader()
        self.inbox: list[Message] = []

    @classmethod
    async def open(cls, server: Xenstored) -> Raw:
        return cls(await trio.open_unix_socket(server.socket))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Message:
        while not self.inbox:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.inbox += self.frames.feed(data)
        return self.inbox.pop(0)

    async def request(self, mtype: int, payload: bytes, tx_id: int = 0) -> Message:
        await self.send(Message(mtype, 77, tx_id, payload).encode())
        return await self.receive()

    async def is_closed_by_server(self) -> bool:
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return True
        except trio.BrokenResourceError:
            return True


async def _still_serving(server: Xenstored) -> None:
    async with connect(server.unix) as xs:
        await xs.write("/alive", "yes")
        assert await xs.read_text("/alive") == "yes"


@pytest.mark.parametrize(
    "data",
    [
        HEADER.pack(XsType.XS_READ, 1, 0, 4097),  # announces an oversize frame
        HEADER.pack(XsType.XS_WRITE, 1, 0, 0xFFFFFFFF) + b"x" * 100,
        b"\xff" * 16,  # garbage header
    ],
    ids=["oversize", "huge-length", "garbage-header"],
)
async def test_framing_errors_drop_only_that_connection(xenstored: Xenstored, data: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        bystander = await Raw.open(xenstored)
        bad = await Raw.open(xenstored)
        await bad.send(data)
        assert await bad.is_closed_by_server()
        reply = await bystander.request(XsType.XS_DIRECTORY, b"/\0")
        assert reply.type == XsType.XS_DIRECTORY
        await _still_serving(xenstored)
    assert "framing error" in xenstored.log()


async def test_truncated_frame_does_not_stall_anyone(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        stuck = await Raw.open(xenstored)
        await stuck.send(HEADER.pack(XsType.XS_WRITE, 1, 0, 100) + b"/half\0")
        await _still_serving(xenstored)
        await stuck.stream.aclose()  # EOF inside a frame
        await _still_serving(xenstored)


async def test_unknown_and_client_only_types_get_enosys(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        raw = await Raw.open(xenstored)
        for mtype in (99, 20, XsType.XS_WATCH_EVENT, XsType.XS_ERROR):
            reply = await raw.request(mtype, b"/\0")
            assert (reply.type, error_name(reply), reply.req_id) == (XsType.XS_ERROR, "ENOSYS", 77)


@pytest.mark.parametrize(
    "path",
    [b"", b"/a//b", b"/a/", b"/a b", b"/\xc3\xa9", b"/" + b"a" * 3100, b"@introduceDomain"],
)
async def test_invalid_paths_are_einval(xenstored: Xenstored, path: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        raw = await Raw.open(xenstored)
        reply = await raw.request(XsType.XS_WRITE, path + b"\0value")
        assert (reply.type, error_name(reply)) == (XsType.XS_ERROR, "EINVAL")
        reply = await raw.request(XsType.XS_READ, b"/\0")
        assert reply.type == XsType.XS_READ  # the connection still works


async def test_guest_quota_is_enforced(xs_workdir: Path) -> None:
    server = Xenstored(xs_workdir, extra=("--quota-nodes-per-domain", "20"))
    server.start()
    key = DomainKey.generate(3)
    try:
        with trio.fail_after(TIMEOUT):
            async with connect(server.unix) as dom0:
                await dom0.write(identity.pubkey_path(3), key.public_hex())
                await dom0.mkdir("/local/domain/3")
                await dom0.set_perms("/local/domain/3", ["n3"])
                async with connect(server.tcp, key=key) as guest:
                    with pytest.raises(XsError) as info:
                        for i in range(30):
                            await guest.write(f"q{i}", "x")
                    assert info.value.errno_name == "ENOSPC"
                    with pytest.raises(XsError) as info:
                        await guest.write("q0", "x" * 3000)
                    assert info.value.errno_name == "ENOSPC"
                await _still_serving(server)
    finally:
        server.stop()


async def test_client_not_reading_replies_only_stalls_itself(xenstored: Xenstored) -> None:
    with trio.fail_after(TIMEOUT):
        hog = await Raw.open(xenstored)
        read = Message(XsType.XS_READ, 1, 0, b"/tool\0").encode()
        async with trio.open_nursery() as nursery:
            # Far more than the outstanding-request bound; never read the replies.
            nursery.start_soon(hog.send, read * 20000)
            await _still_serving(xenstored)
            nursery.cancel_scope.cancel()
        assert xenstored.alive()


async def test_client_that_never_reads_is_eventually_disconnected(xs_workdir: Path) -> None:
    server = Xenstored(xs_workdir, tcp=False, extra=("--write-stall-timeout", "1"))
    server.start()
    try:
        with trio.fail_after(TIMEOUT):
            hog = await Raw.open(server)
            read = Message(XsType.XS_READ, 1, 0, b"/tool\0").encode()
            # The server stops reading once too many replies are unwritten, its write then
            # stalls for the timeout and it closes the connection: our send fails.
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await hog.send(read * 10000)
            await _still_serving(server)
        assert "client does not read its replies" in server.log()
    finally:
        server.stop()


async def test_slow_watcher_has_events_dropped_not_the_writer_stalled(xenstored: Xenstored) -> None:
    deep = "/flood/" + "/".join(["d" * 60] * 30)  # ~1.8 KB paths: fill socket buffers fast
    writes = 3000
    with trio.fail_after(60):
        slow = await Raw.open(xenstored)
        reply = await slow.request(XsType.XS_WATCH, join_strings("/flood", "t"))
        assert reply.type == XsType.XS_WATCH
        async with connect(xenstored.unix) as writer:

            async def burst(start: int) -> None:
                for i in range(start, writes, 16):
                    await writer.write(f"{deep}/k", str(i))

            async with trio.open_nursery() as nursery:
                for start in range(16):
                    nursery.start_soon(burst, start)
        # The writer finished although nobody read the events. A reply is never dropped and
        # is queued after every event kept so far: read up to it.
        await slow.send(Message(XsType.XS_READ, 555, 0, b"/tool\0").encode())
        events = 0
        while (msg := await slow.receive()).req_id != 555:
            assert msg.type == XsType.XS_WATCH_EVENT
            events += 1
        assert 0 < events < writes
    assert "watch event queue full" in xenstored.log()


def test_header_struct_is_xs_wire() -> None:
    assert struct.calcsize("<IIII") == HEADER.size == 16
