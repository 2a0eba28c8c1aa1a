"""The NBD server at the edge: trio streams ↔ `protocol.ServerConnection` ↔ a `BlockBackend`.

    disk = MemoryDisk(16 << 20)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_nbd, disk, "unix:/tmp/disk.sock")

One task per client connection reads its requests and keeps up to `MAX_IN_FLIGHT` of them
in flight: plain reads and writes through the disk's submission queue if it has one
(`QueuedBackend`: blkfront's `io_queue()`), everything else as a task each; replies go out
as they complete, in any order (the spec allows it), through one writer task. So a client's
queue depth reaches the backend, and blkfront spreads it over its rings. A client that
breaks the protocol is disconnected; a request the disk fails gets EIO; neither affects
other clients. See docs/nbd.md.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
import trio

from xenpv.address import split_address
from xenpv.errors import UsageError
from xenpv.nbd import protocol
from xenpv.nbd.protocol import Cmd, Export, Ready, Request, ServerConnection, Violation

log = structlog.get_logger()
Logger = Any  # a bound structlog logger

MAX_IN_FLIGHT = 32  # requests of one connection running at once (blkfront's default depth)
HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to choose the export
RECEIVE_SIZE = 1 << 18
ZERO_CHUNK = 1 << 20  # WRITE_ZEROES is written in chunks of this size


class BlockBackend(Protocol):
    """What the server exports: a disk of `size` bytes addressed in `block_size` units."""

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...  # the minimum (logical sector) size

    @property
    def preferred_block_size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def can_discard(self) -> bool: ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def flush(self) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...


class Completion(Protocol):
    """A finished I/O of an `IoQueue` (blkfront's `Completion` is one)."""

    @property
    def tag(self) -> Any: ...

    @property
    def data(self) -> bytearray | memoryview | None: ...

    @property
    def error(self) -> Exception | None: ...


class IoQueue(Protocol):
    """A submission/completion queue (blkfront's `io_queue()`): `read`/`write` only queue
    (raising `trio.WouldBlock` when the disk's depth is used up), `wait` submits and returns
    the completions available."""

    in_flight: int

    def read(self, offset: int, length: int, tag: Any = None) -> None: ...

    def write(self, offset: int, data: bytes, tag: Any = None) -> None: ...

    def submit(self) -> None: ...

    async def wait(self) -> Sequence[Completion]: ...


class QueuedBackend(BlockBackend, Protocol):
    """A `BlockBackend` that also takes reads and writes through a queue: the server then
    submits them from its reader task in batches and reaps completions in another, instead
    of a task per request (the per-request task switch costs more than a small I/O)."""

    def io_queue(self) -> IoQueue: ...


class MemoryDisk:
    """A `BlockBackend` in memory (tests, and a reference for the contract)."""

    def __init__(
        self,
        size: int,
        *,
        block_size: int = 512,
        preferred_block_size: int = 4096,
        read_only: bool = False,
        discard: bool = True,
    ) -> None:
        self.data = bytearray(size)
        self.block_size = block_size
        self.preferred_block_size = preferred_block_size
        self.read_only = read_only
        self.can_discard = discard
        self.flushes = 0
        self.fail_at: int | None = None  # an offset whose I/O fails (tests)

    @property
    def size(self) -> int:
        return len(self.data)

    def _check(self, offset: int, length: int) -> None:
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            raise OSError(errno.EIO, "injected I/O error")

    async def read(self, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self._check(offset, length)
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._check(offset, len(data))
        self.data[offset : offset + len(data)] = data

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self.flushes += 1

    async def discard(self, offset: int, length: int) -> None:
        await trio.lowlevel.checkpoint()
        self.data[offset : offset + length] = bytes(length)


def _joined(batch: list[bytes]) -> bytes:
    # Small replies are joined (one system call); a big read reply is not copied again.
    return batch[0] if len(batch) == 1 else b"".join(batch)


def export_of(
    disk: BlockBackend, name: str = "", *, read_only: bool = False, description: str = ""
) -> Export:
    """The export a disk gives. Multi-conn holds: every connection reaches the same disk
    through the same path, so a completed write is seen by all and a flush covers all."""
    block = disk.block_size
    preferred = max(disk.preferred_block_size, block, 512)
    return Export(
        name=name,
        size=disk.size - disk.size % block,
        min_block=block,
        preferred_block=preferred,
        max_payload=max(protocol.DEFAULT_MAX_PAYLOAD, preferred),
        read_only=read_only or disk.read_only,
        flush=True,  # a disk without a cache flush has nothing to flush: a no-op is right
        trim=disk.can_discard,
        multi_conn=True,
        description=description,
    )


class _Client:
    """One connection in transmission: runs requests; a writer task sends their replies.

    Replies are queued (`reply`) and sent by `writer`, as many per system call as have piled
    up: at queue depth 32 that is most of the server's cost saved. A request's slot (of
    MAX_IN_FLIGHT) is released only once its reply is sent, so a client that stops reading
    replies stops being read, instead of piling replies up in memory."""

    def __init__(self, stream: trio.abc.Stream, conn: ServerConnection, disk: BlockBackend) -> None:
        self.stream = stream
        self.conn = conn
        self.disk = disk
        self.slots = trio.Semaphore(MAX_IN_FLIGHT)
        self.broken = False
        self._outbox: list[bytes] = []
        self._queued = trio.Event()
        self._closing = False
        # A QueuedBackend's reads and writes go through its queue (see there).
        self.queue: IoQueue | None = disk.io_queue() if hasattr(disk, "io_queue") else None
        self._submitted = trio.Event()
        self._reaped_all = trio.Event()
        self._reaper_done = trio.Event()

    async def send(self, data: bytes) -> None:
        """Send at once (the handshake, before the writer runs)."""
        if self.broken or not data:
            return
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.broken = True

    def acquire_slot_nowait(self) -> bool:
        try:
            self.slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        return True

    def reply(self, data: bytes) -> None:
        self._outbox.append(data)
        self._queued.set()

    def close_outbox(self) -> None:
        """The writer ends once everything queued is sent."""
        self._closing = True
        self._queued.set()

    async def writer(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            batch, self._outbox = self._outbox, []
            if batch and not self.broken:
                try:
                    await self.stream.send_all(_joined(batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.broken = True  # the client went away: later replies are dropped
            for _ in batch:
                self.slots.release()
            if self._closing and not self._outbox:
                return

    def try_queue(self, request: Request, ready: Ready) -> bool:
        """Put a plain read or write on the disk's queue; False if it must take the task
        path (another command, a refused request, FUA, or the disk's depth used up)."""
        queue = self.queue
        if (
            queue is None
            or request.cmd not in (Cmd.READ, Cmd.WRITE)
            or request.flags & protocol.CMD_FLAG_FUA
            or not request.length
            or protocol.check_request(request, ready.export, structured=ready.structured)
        ):
            return False
        try:
            if request.cmd == Cmd.READ:
                queue.read(request.offset, request.length, tag=request)
            else:
                queue.write(request.offset, request.payload, tag=request)
        except trio.WouldBlock:
            return False
        except Exception as exc:  # refused by the disk (e.g. it shrank): as the task path does
            log.warning("nbd request failed", cmd=request.cmd, error=str(exc))
            self.reply(self.conn.error_reply(request.cookie, protocol.EIO, f"I/O error: {exc}"))
            return True
        self._submitted.set()
        return True

    def submit_queued(self) -> None:
        if self.queue is not None:
            self.queue.submit()

    async def reaper(self) -> None:
        """Replies for the queue's completions, until `stop_reaping` and none in flight."""
        queue = self.queue
        assert queue is not None
        try:
            while True:
                if not queue.in_flight:
                    if self._reaped_all.is_set():
                        return
                    await self._submitted.wait()
                    self._submitted = trio.Event()
                    continue
                for done in await queue.wait():
                    request: Request = done.tag
                    if done.error is not None:
                        log.warning("nbd request failed", cmd=request.cmd, error=str(done.error))
                        reply = self.conn.error_reply(
                            request.cookie, protocol.EIO, f"I/O error: {done.error}"
                        )
                    elif request.cmd == Cmd.READ:
                        assert done.data is not None
                        reply = self.conn.read_reply(request.cookie, request.offset, done.data)
                    else:
                        reply = self.conn.ok_reply(request.cookie)
                    self.reply(reply)
        finally:
            self._reaper_done.set()

    async def stop_reaping(self) -> None:
        """Let the reaper finish what is in flight, and wait for it."""
        self._reaped_all.set()
        self._submitted.set()
        await self._reaper_done.wait()

    async def handle(self, request: Request, ready: Ready) -> None:
        try:
            reply = await self._handle(request, ready)
        except Exception as exc:  # a bug here must not leak the slot or kill the connection
            log.error("nbd request handling failed", cmd=request.cmd, error=repr(exc))
            reply = self.conn.error_reply(request.cookie, protocol.EIO, "internal error")
        self.reply(reply)

    async def _handle(self, request: Request, ready: Ready) -> bytes:
        conn, export = self.conn, ready.export
        refused = protocol.check_request(request, export, structured=ready.structured)
        if refused is not None:
            return conn.error_reply(request.cookie, *refused)
        cookie, offset, length = request.cookie, request.offset, request.length
        try:
            if request.cmd == Cmd.READ:
                data = await self.disk.read(offset, length) if length else b""
                return conn.read_reply(cookie, offset, data)
            if request.cmd == Cmd.WRITE and length:
                await self.disk.write(offset, request.payload)
            elif request.cmd == Cmd.WRITE_ZEROES and length:
                await self._write_zeroes(offset, length)
            elif request.cmd == Cmd.TRIM and length:
                await self.disk.discard(offset, length)
            if request.cmd == Cmd.FLUSH or request.flags & protocol.CMD_FLAG_FUA:
                await self.disk.flush()  # FUA = the write, then a flush
        except Exception as exc:  # the disk failed this request; the connection goes on
            log.warning("nbd request failed", cmd=request.cmd, offset=offset, error=str(exc))
            return conn.error_reply(cookie, protocol.EIO, f"I/O error: {exc}")
        return conn.ok_reply(cookie)

    async def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            await self.disk.write(offset, zeroes[:n])
            offset += n


async def serve_connection(
    stream: trio.abc.Stream, disk: BlockBackend, export: Export | Callable[[], Export]
) -> None:
    """Speak NBD on one connection until the client disconnects or breaks the protocol.
    `export` may be a function: evaluated per connection (a disk may have been resized)."""
    conn = ServerConnection(export() if callable(export) else export)
    client = _Client(stream, conn, disk)
    peer = log.bind(client=id(stream))
    ready: Ready | None = None
    try:
        await client.send(conn.data_to_send())
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
            ready = await _handshake(stream, conn, client, peer)
        if handshake.cancelled_caught:
            peer.info("nbd handshake timed out")
        if ready is None:
            return
        peer.info("nbd client connected", structured=ready.structured, flags=hex(ready.flags))
        async with trio.open_nursery() as io:
            io.start_soon(client.writer)
            if client.queue is not None:
                io.start_soon(client.reaper)
            try:
                async with trio.open_nursery() as requests:
                    await _transmission(stream, conn, client, ready, requests, peer)
                if client.queue is not None:
                    await client.stop_reaping()
            finally:
                client.close_outbox()  # the writer sends every reply queued, then ends
        peer.info("nbd client disconnected")
    finally:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()


async def _handshake(
    stream: trio.abc.Stream, conn: ServerConnection, client: _Client, peer: Logger
) -> Ready | None:
    while True:
        event = conn.next_event()
        await client.send(conn.data_to_send())
        if isinstance(event, Ready):
            return event
        if isinstance(event, Violation):
            peer.warning("nbd handshake refused", reason=event.reason)
            return None
        if event is not None:  # Aborted
            return None
        data = await _receive(stream)
        if not data:
            return None
        conn.receive_data(data)


async def _transmission(
    stream: trio.abc.Stream,
    conn: ServerConnection,
    client: _Client,
    ready: Ready,
    nursery: trio.Nursery,
    peer: Logger,
) -> None:
    while True:
        event = conn.next_event()
        if event is None:
            client.submit_queued()  # what this batch of bytes queued, in one go
            data = await _receive(stream)
            if not data:
                return  # a hard disconnect by the client: in-flight requests still finish
            conn.receive_data(data)
            continue
        if isinstance(event, Violation):
            peer.warning("nbd client broke the protocol", reason=event.reason)
            return
        assert isinstance(event, Request)
        if event.cmd == Cmd.DISC:
            client.submit_queued()
            return  # the nursery finishes what is in flight, then the stream closes
        if not client.acquire_slot_nowait():
            client.submit_queued()  # before waiting: the slots come back as replies go out
            await client.slots.acquire()  # bounds the requests in flight (and reading ahead)
        if not client.try_queue(event, ready):
            nursery.start_soon(client.handle, event, ready)


async def _receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(RECEIVE_SIZE))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return b""


def parse_address(address: str) -> tuple[str, str, int]:
    """`unix:PATH` → ("unix", PATH, 0); `tcp:HOST:PORT` → ("tcp", HOST, PORT)."""
    parsed = split_address(address)
    if parsed is not None and parsed[2] < 65536:
        return parsed
    raise UsageError(f"NBD address {address!r}: expected unix:PATH or tcp:HOST:PORT")


def uri_of(address: str) -> str:
    """The NBD URI clients use for a bound address (`nbd+unix:///?socket=...`, `nbd://...`)."""
    kind, host, port = parse_address(address)
    if kind == "unix":
        return f"nbd+unix:///?socket={host}"
    return f"nbd://[{host}]:{port}" if ":" in host else f"nbd://{host}:{port}"


async def open_listener(address: str) -> tuple[trio.SocketListener, str]:
    """Listen at `address`; returns the listener and the bound address (a TCP port 0 is
    resolved to the port the kernel picked). A stale Unix socket file is replaced."""
    kind, host, port = parse_address(address)
    if kind == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(host).st_mode):  # a stale socket; never any other file
                os.unlink(host)
        try:
            await sock.bind(host)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {host}: {exc.strerror}") from None
        return trio.SocketListener(sock), f"unix:{host}"
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener = listeners[0]
    for extra in listeners[1:]:
        await extra.aclose()
    bound = listener.socket.getsockname()
    return listener, f"tcp:{host}:{bound[1]}"


async def serve_nbd(
    disk: BlockBackend,
    address: str,
    *,
    name: str = "",
    read_only: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `disk` at `address` until cancelled; `task_status.started(bound address)`.
    A listener that cannot be opened raises `UsageError` before anything is served."""
    listener, bound = await open_listener(address)
    await serve_listener(
        listener, bound, disk, name=name, read_only=read_only, task_status=task_status
    )


async def serve_listener(
    listener: trio.SocketListener,
    bound: str,
    disk: BlockBackend,
    *,
    name: str = "",
    read_only: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `disk` on an open listener (`open_listener`) until cancelled; closes it and
    removes its Unix socket file at the end."""

    def export() -> Export:
        return export_of(disk, name, read_only=read_only)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream, disk, export)
        except Exception as exc:  # never let one client take the server down
            log.error("nbd connection failed", error=repr(exc))

    log.info("nbd export listening", address=bound, size=disk.size)
    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started(bound)
            nursery.start_soon(_accept_loop, listener, handler, nursery)
    finally:
        kind, path, _ = parse_address(bound)
        if kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(path)


async def _accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:  # EMFILE and the like: wait a little rather than spin
            log.warning("nbd accept failed", error=str(exc))
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handler, stream)
