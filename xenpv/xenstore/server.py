"""xenstored's trio edge: listeners, per-connection reader/writer, durable group commit.

The sans-IO `Store` decides everything; this module moves bytes and makes changes durable.

Connections. The Unix socket is dom0 (privileged). TCP connections first prove their domid
(`xenpv.xenstore.auth`). Each connection has one reader task (FrameReader: a framing error or
a header announcing more than 4096 bytes drops that connection and is logged) and one writer
task that sends everything queued with a single `send_all`.

Durability. Every Outcome's `changes` are written to the journal and fdatasynced BEFORE any of
its replies or events is queued to a socket. Outcomes with changes go to a pending list; one
committer task takes the whole list, writes it as one journal record with one fsync (group
commit across every connection), then delivers the replies in order. While a commit is in
flight or pending, even outcomes without changes (reads) wait behind it, so no client ever
observes state that is not yet durable and replies keep the order requests were handled in.
With nothing pending, a read is answered immediately. Appends run on the trio thread while
fdatasync is fast (moving average < 0.5 ms), else in a worker thread. When the journal grows past
max(4 MiB, 2 x last snapshot), the committer instead writes a full snapshot that already
contains the batch (compaction; see `journal.py`). A journal I/O error is fatal: the server
stops rather than acknowledge something it could not make durable.

Flow control and hostile clients (the XSA-349 approach of C xenstored):
- watch events queued for one connection and not yet written are bounded
  (`max_queued_events`, default 1024; for a domain, at least EVENTS_PER_WATCH per watch its
  quota allows: a backend the toolstack sized for 1000 devices gets their events' worth);
  events beyond the bound are dropped for that connection only, counted and logged;
- replies are never dropped. A connection with `max_outstanding` requests whose replies are
  not yet written is not read from until its writer catches up (backpressure), so a client
  that does not read its replies only stalls itself; if a write stays blocked for
  `write_stall_timeout` seconds, the connection is closed;
- watch events an `XsEventFaults` seam holds back (delay) count against the same bound, and
  copies it asks for (duplicate, flood) are queued one by one under it: a flood aimed at one
  connection costs at most its bound in memory and never delays another connection's replies.
Errors inside one connection's tasks are caught and logged; they never end the server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgpack
import structlog
import trio

from xenpv import identity
from xenpv.errors import XenpvError
from xenpv.metrics.counters import XenstoredStats
from xenpv.metrics.registry import REGISTRY
from xenpv.xenstore import auth
from xenpv.xenstore.journal import Journal, JournalError
from xenpv.xenstore.store import Change, ConnId, Quotas, Store
from xenpv.xenstore.tree import Capture
from xenpv.xenstore.wire import FrameReader, Message, XsProtocolError, XsType

log = structlog.get_logger()

DEFAULT_SOCKET = "/var/run/xenstored/socket"
DEFAULT_COMPACT_BYTES = 4 << 20
INLINE_FSYNC_MAX = 0.0005  # seconds: journal appends faster than this run on the loop


def default_socket_path() -> str:
    """`$XENSTORED_PATH`, else C xenstored's default socket path."""
    return os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET


EVENTS_PER_WATCH = 8  # queued, unwritten events a connection may have per allowed watch


@dataclass(slots=True)
class XsVerdict:
    """What the fault seam decides for one request (fields combine: delay, then the rest).

    `delay`: seconds before the request is handled (later requests of the connection wait
    too: order is kept); `drop`: never handle it and send nothing; `error`: answer with this
    xs_wire errno name instead of handling it; `fail`: a reason to close the connection.
    """

    delay: float = 0.0
    drop: bool = False
    error: str | None = None
    fail: str | None = None


class XsFaults(Protocol):
    """The interposition point every request on every xenstore connection passes.

    A fault plan implements it (docs/architecture.md, "Seams"); `None` (the default) costs nothing.
    """

    def on_request(self, domid: int, msg: Message) -> XsVerdict | None:
        """Decide the fate of `msg` from a connection of `domid`; None handles it normally."""
        ...


@dataclass(slots=True)
class EventVerdict:
    """What the watch-event seam decides for one event queued to one connection.

    `drop`: never send it; `copies`: send it this many times (2 = duplicate; a flood asks for
    many); `delay`: seconds to hold it (and its copies) before queueing. Every copy, held or
    not, counts against the connection's queued-event bound.
    """

    delay: float = 0.0
    drop: bool = False
    copies: int = 1


class XsEventFaults(Protocol):
    """The interposition point of every watch event xenstored queues to a connection.

    A fault plan implements it; `None` (the default) costs one check per event.
    """

    def on_event(self, domid: int, msg: Message) -> EventVerdict | None:
        """Decide the fate of watch event `msg` for a connection of `domid`; None: send it."""
        ...


@dataclass(slots=True)
class ServerConfig:
    socket_path: str
    data_dir: Path
    tcp: tuple[str, int] | None = None
    quotas: Quotas | None = None
    max_queued_events: int = 1024
    max_outstanding: int = 256
    write_stall_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_handshakes: int = 256  # TCP connections still proving their domid; more are closed
    compact_min_bytes: int = DEFAULT_COMPACT_BYTES
    faults: XsFaults | None = None
    event_faults: XsEventFaults | None = None


@dataclass(frozen=True, slots=True)
class Bound:
    """Where the server actually listens (the TCP port is resolved when 0 was asked)."""

    socket_path: str
    tcp: tuple[str, int] | None


Replies = list[tuple[ConnId, Message]]


@dataclass(slots=True, eq=False)
class _Conn:
    cid: ConnId
    domid: int
    stream: trio.abc.Stream
    queue: list[bytes] = field(default_factory=list)
    queued_replies: int = 0
    queued_events: int = 0
    held_events: int = 0  # events the watch-event seam delays, not yet queued
    outstanding: int = 0
    dropped_events: int = 0
    closing: bool = False
    send_since: float | None = None  # trio time a blocked send_all started
    wake: trio.Event = field(default_factory=trio.Event)
    space: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def encode_changes(changes: Iterable[Change]) -> bytes:
    return msgpack.packb([c.to_wire() for c in changes], use_bin_type=True)  # type: ignore[no-any-return]


def decode_changes(records: Iterable[bytes]) -> list[Change]:
    out: list[Change] = []
    for record in records:
        for obj in msgpack.unpackb(record, raw=False, strict_map_key=False):
            out.append(Change.from_wire(obj))
    return out


def open_store(data_dir: Path, quotas: Quotas | None = None) -> tuple[Store, Journal]:
    """Lock `data_dir`, recover snapshot + journal and rebuild the store."""
    journal, recovered = Journal.open(data_dir)
    try:
        changes = decode_changes(recovered.records)
        store = Store.restore(recovered.snapshot, changes, quotas)
    except JournalError:
        journal.close()
        raise
    except Exception as exc:
        journal.close()
        raise JournalError(f"cannot rebuild the store from {data_dir}: {exc}") from None
    log.info(
        "store recovered",
        data_dir=str(data_dir),
        snapshot=recovered.snapshot is not None,
        changes=len(changes),
        nodes=store.node_count(),
        torn_bytes=recovered.torn_bytes,
    )
    return store, journal


class XenstoreServer:
    """Serves a `Store` over the Unix socket and optional TCP listener."""

    def __init__(self, store: Store, journal: Journal, config: ServerConfig) -> None:
        self.store = store
        self.journal = journal
        self.config = config
        self._conns: dict[ConnId, _Conn] = {}
        self._pending: list[tuple[Replies, list[Change], list[ConnId]]] = []
        self._committing = False
        self._commit_wake = trio.Event()
        self._compact_threshold = config.compact_min_bytes
        self.dropped_events = 0
        self.stats = XenstoredStats.new()  # docs/metrics.md
        REGISTRY.sections["xenstored"] = lambda: self.stats.as_dict(_TYPE_NAMES)
        self._fsync_ewma = 0.0
        self._handshaking = 0
        self._nursery: trio.Nursery | None = None

    # -- listeners ---------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED
    ) -> None:
        unix = await open_unix_listener(self.config.socket_path)
        listeners: list[trio.SocketListener] = []
        tcp_bound: tuple[str, int] | None = None
        try:
            if self.config.tcp is not None:
                host, port = self.config.tcp
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    raise XenpvError(
                        f"cannot listen on tcp:{host}:{port}: {exc.strerror}"
                    ) from None
                name = listeners[0].socket.getsockname()
                tcp_bound = (host, int(name[1]))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery  # delayed watch events are held by tasks in it
                nursery.start_soon(self._committer)
                nursery.start_soon(self._stall_watchdog)
                nursery.start_soon(trio.serve_listeners, self._serve_unix, [unix])
                if listeners:
                    nursery.start_soon(trio.serve_listeners, self._serve_tcp, listeners)
                task_status.started(Bound(self.config.socket_path, tcp_bound))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.config.socket_path)

    async def _serve_unix(self, stream: trio.SocketStream) -> None:
        await self._serve_conn(stream, 0, b"")

    async def _serve_tcp(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        peer = _peer(stream)
        if self._handshaking >= self.config.max_handshakes:
            log.warning("too many tcp handshakes in progress, closing", peer=peer)
            await trio.aclose_forcefully(stream)
            return
        domid: int | None = None
        leftover = b""
        reason = "refused"
        self._handshaking += 1
        with trio.move_on_after(self.config.handshake_timeout) as scope:
            try:
                domid, leftover = await auth.server_handshake(stream, self._pubkey)
            except (
                auth.AuthError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
            ) as exc:
                reason = str(exc) or type(exc).__name__
            finally:
                self._handshaking -= 1
        if scope.cancelled_caught:
            reason = "timed out"
        if domid is None:
            log.info("tcp handshake failed", peer=peer, reason=reason)
            await trio.aclose_forcefully(stream)
            return
        await self._serve_conn(stream, domid, leftover)

    def _pubkey(self, domid: int) -> str | None:
        value = self.store.get(identity.pubkey_path(domid))
        if value is None:
            return None
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None

    # -- one connection ----------------------------------------------------------------------

    async def _serve_conn(self, stream: trio.abc.Stream, domid: int, leftover: bytes) -> None:
        cid = self.store.connect(domid)
        conn = _Conn(cid, domid, stream)
        self._conns[cid] = conn
        clog = log.bind(conn=cid, domid=domid)
        clog.debug("connection opened")
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, conn, clog)
                    await self._reader(conn, leftover, clog)
                    if not conn.closing:
                        nursery.cancel_scope.cancel()
                    # else: dropped by the store; the writer sends what is queued, then
                    # cancels conn.scope (or gives up after write_stall_timeout).
        except* Exception:  # also when mixed with a Cancelled in one group
            clog.exception("connection handler failed")
        finally:
            del self._conns[cid]
            try:
                self._submit(self.store.disconnect(cid), [], [])
            except Exception:
                clog.exception("store failed to disconnect a connection")
            await trio.aclose_forcefully(stream)
            if conn.dropped_events:
                clog.warning("watch events dropped for slow client", count=conn.dropped_events)
            clog.debug("connection closed")

    async def _reader(
        self, conn: _Conn, data: bytes, clog: structlog.typing.FilteringBoundLogger
    ) -> None:
        frames = FrameReader()
        while True:
            if data:
                try:
                    messages = frames.feed(data)
                except XsProtocolError as exc:
                    clog.warning("framing error, dropping connection", error=str(exc))
                    return
                faults = self.config.faults
                for msg in messages:
                    if conn.closing:
                        return
                    if faults is not None:
                        verdict = faults.on_request(conn.domid, msg)
                        if verdict is not None:
                            if verdict.delay > 0:
                                await trio.sleep(verdict.delay)  # the injected fault itself
                            if verdict.fail is not None:
                                clog.info("fault plan closes the connection", reason=verdict.fail)
                                return
                            if verdict.drop:
                                continue
                            if verdict.error is not None:
                                conn.outstanding += 1
                                if msg.type == XsType.XS_TRANSACTION_END:
                                    # An error answered to a commit ends the transaction,
                                    # as a real EAGAIN does (else it would stay open).
                                    abort = Message(msg.type, msg.req_id, msg.tx_id, b"F\0")
                                    self.store.handle(conn.cid, abort)
                                self._submit([(conn.cid, msg.error(verdict.error))], [], [])
                                continue
                    self._handle(conn, msg, clog)
            while conn.outstanding >= self.config.max_outstanding and not conn.closing:
                conn.space = trio.Event()
                await conn.space.wait()
            if conn.closing:
                return
            try:
                data = bytes(await conn.stream.receive_some(65536))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            if not data:
                if frames.pending:
                    clog.info("connection closed inside a frame", bytes=frames.pending)
                return

    def _handle(
        self, conn: _Conn, msg: Message, clog: structlog.typing.FilteringBoundLogger
    ) -> None:
        conn.outstanding += 1
        ops = self.stats.ops
        if 0 <= msg.type < len(ops):
            ops[msg.type] += 1
        else:
            self.stats.other_ops += 1
        try:
            outcome = self.store.handle(conn.cid, msg)
        except Exception:
            # Store.handle must not raise; if it does, answer EIO and keep serving.
            clog.exception("store failed on a request", type=msg.type)
            self._submit([(conn.cid, msg.error("EIO"))], [], [])
            return
        self._submit(outcome.replies, outcome.changes, outcome.drop)

    async def _writer(self, conn: _Conn, clog: structlog.typing.FilteringBoundLogger) -> None:
        while True:
            if not conn.queue:
                if conn.closing:
                    conn.scope.cancel()
                    return
                conn.wake = trio.Event()
                await conn.wake.wait()
                continue
            data = b"".join(conn.queue)
            conn.queue.clear()
            replies = conn.queued_replies
            conn.queued_replies = conn.queued_events = 0
            conn.send_since = trio.current_time()  # watched by _stall_watchdog
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                conn.scope.cancel()
                return
            conn.send_since = None
            conn.outstanding -= replies
            if conn.outstanding < self.config.max_outstanding:
                conn.space.set()

    async def _stall_watchdog(self) -> None:
        """Close connections whose socket write has been blocked for write_stall_timeout.

        One periodic sweep instead of a deadline per send keeps the write path cheap.
        """
        timeout = self.config.write_stall_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 4))  # a periodic sweep, not synchronisation
            now = trio.current_time()
            for conn in list(self._conns.values()):
                if conn.send_since is not None and now - conn.send_since > timeout:
                    log.warning(
                        "client does not read its replies, disconnecting",
                        conn=conn.cid,
                        domid=conn.domid,
                    )
                    conn.send_since = None
                    conn.scope.cancel()

    # -- durability and delivery ------------------------------------------------------------

    def _submit(self, replies: Replies, changes: list[Change], drop: list[ConnId]) -> None:
        if not changes and not self._pending and not self._committing:
            self._deliver(replies, drop)
            return
        self._pending.append((replies, changes, drop))
        self._commit_wake.set()

    async def _committer(self) -> None:
        while True:
            if not self._pending:
                self._commit_wake = trio.Event()
                await self._commit_wake.wait()
                continue
            # Let every reader that is already runnable hand in its request first: the
            # bigger the group, the fewer fsyncs (with nothing runnable, don't pay a loop turn).
            if trio.lowlevel.current_statistics().tasks_runnable:
                await trio.lowlevel.checkpoint()
            batch = self._pending
            self._pending = []
            self._committing = True
            changes = [c for _, cs, _ in batch for c in cs]
            if changes:
                if self.journal.size >= self._compact_threshold:
                    # The store holds exactly journal + this batch: nothing else was handled
                    # since the batch was taken (no await in between). Capture that state
                    # here (25-40 ms at 100k nodes); encoding it (~0.2 s) and writing it run in
                    # a worker thread while the loop keeps serving requests (their changes
                    # wait in `_pending` for the new journal).
                    captured = self.store.capture()
                    size = await trio.to_thread.run_sync(self._compact, captured)
                    self._compact_threshold = max(self.config.compact_min_bytes, 2 * size)
                    log.info("journal compacted", snapshot_bytes=size)
                else:
                    await self._append(encode_changes(changes))
            for replies, _, drop in batch:
                self._deliver(replies, drop)
            self._committing = False

    def _compact(self, captured: Capture) -> int:
        """Encode the captured state and make it the new snapshot (a worker thread)."""
        snapshot = captured.encode()
        self.journal.compact(snapshot)
        return len(snapshot)

    async def _append(self, payload: bytes) -> None:
        # A fast fdatasync (tmpfs, a disk with a power-safe cache) costs less than a hop to a
        # worker thread and back, so it runs inline; a slow one runs in a thread so the loop
        # keeps reading and handling requests (the next group commit) meanwhile.
        if self._fsync_ewma < INLINE_FSYNC_MAX:
            elapsed = _timed_append(self.journal, payload)
            await trio.lowlevel.checkpoint()
        else:
            elapsed = await trio.to_thread.run_sync(_timed_append, self.journal, payload)
        self._fsync_ewma += 0.2 * (elapsed - self._fsync_ewma)

    def _event_limit(self, domid: int) -> int:
        base = self.config.max_queued_events
        if domid == 0:
            return base
        return max(base, EVENTS_PER_WATCH * self.store.quotas.of(domid).watches_per_domain)

    def _deliver(self, replies: Replies, drop: list[ConnId]) -> None:
        for cid, msg in replies:
            conn = self._conns.get(cid)
            if conn is None:
                continue
            if msg.type == XsType.XS_WATCH_EVENT:
                event_faults = self.config.event_faults
                if event_faults is not None and conn.domid != 0:
                    self._fault_event(conn, msg, event_faults.on_event(conn.domid, msg))
                    continue
                if not self._queue_event(conn):
                    continue
            else:
                conn.queued_replies += 1
                if msg.type == XsType.XS_ERROR:
                    self.stats.errors += 1
                    if msg.payload == b"EAGAIN\0":  # a transaction to retry
                        self.stats.transactions_retried += 1
            conn.queue.append(msg.encode())
            conn.wake.set()
        for cid in drop:
            conn = self._conns.get(cid)
            if conn is not None:
                conn.closing = True
                conn.wake.set()
                conn.space.set()

    def _queue_event(self, conn: _Conn) -> bool:
        """Count one more event queued to `conn`; False (and counted as dropped) when full."""
        if conn.queued_events + conn.held_events >= self._event_limit(conn.domid):
            if not conn.dropped_events:
                log.warning("watch event queue full, dropping events", conn=conn.cid)
            conn.dropped_events += 1
            self.dropped_events += 1
            self.stats.watch_events_dropped += 1
            return False
        conn.queued_events += 1
        self.stats.watch_events_fired += 1
        return True

    def _fault_event(self, conn: _Conn, msg: Message, verdict: EventVerdict | None) -> None:
        """Queue a watch event as the seam decided (dom0's events never come here)."""
        if verdict is None:
            verdict = EventVerdict()
        if verdict.drop or verdict.copies <= 0:
            return
        if verdict.delay > 0 and self._nursery is not None:
            room = self._event_limit(conn.domid) - conn.queued_events - conn.held_events
            held = min(verdict.copies, room)
            self.dropped_events += verdict.copies - held
            if held > 0:
                conn.held_events += held
                self._nursery.start_soon(self._release_held, conn, msg, held, verdict.delay)
            return
        self._queue_copies(conn, msg, verdict.copies)

    async def _release_held(self, conn: _Conn, msg: Message, copies: int, delay: float) -> None:
        await trio.sleep(delay)  # the injected delay itself
        conn.held_events -= copies
        if conn.closing or self._conns.get(conn.cid) is not conn:
            return
        self._queue_copies(conn, msg, copies)

    def _queue_copies(self, conn: _Conn, msg: Message, copies: int) -> None:
        # The bound holds for copies too: what a flood asks for past it is dropped, counted.
        room = max(0, self._event_limit(conn.domid) - conn.queued_events - conn.held_events)
        queued = min(copies, room)
        if queued < copies:
            if not conn.dropped_events:
                log.warning("watch event queue full, dropping events", conn=conn.cid)
            conn.dropped_events += copies - queued
            self.dropped_events += copies - queued
        if queued:
            conn.queued_events += queued
            conn.queue.extend([msg.encode()] * queued)
            conn.wake.set()


_TYPE_NAMES = {int(t): t.name.removeprefix("XS_").lower() for t in XsType}


def _timed_append(journal: Journal, payload: bytes) -> float:
    start = time.perf_counter()
    journal.append(payload)
    return time.perf_counter() - start


def _peer(stream: trio.SocketStream) -> str:
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Bind `path` mode 0600, removing a stale socket; refuse if a server answers on it."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XenpvError(f"cannot create {p.parent}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise XenpvError(f"{path} exists and is not a socket")
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise XenpvError(f"cannot probe {path}: {exc.strerror}") from None
        else:
            raise XenpvError(f"another xenstored is serving {path}")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no window where the socket is reachable by others
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise XenpvError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return trio.SocketListener(sock)
