"""Blkfront at the edge: the xenbus handshake, event-channel waits, and the async I/O API.

`Blkfront` is the `HandshakeDriver` that `xenpv.xenbus.handshake.run_handshake` drives, and the
object
users call. Per connection it owns the ring pages (granted per negotiated grant granule: 4 KiB
frames in the baseline, larger granules with docs/granule-extension.md), one unbound event
channel per queue and one task per queue that waits for the backend's notifications and hands
the ring to the engine (core.py). Everything between two awaits is synchronous engine work, so
no locks are needed.

Recovery: a queue task that finds the backend gone (`EventChannelClosed`, `PeerGone`) or
broken (`BlkfrontProtocolError`) ends the connection in the engine (unfinished I/Os go back
to the pending queue) and waits; a protocol error also switches the frontend to Closing, as
Linux's `xenbus_dev_fatal` does. The xenbus rules then close and re-run the handshake
(a restarted backend writes Closed first), and CONNECT re-issues everything pending.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog
import trio

from frontends.blkfront import keys as blk_keys
from frontends.blkfront.core import BlkIo, Engine, Negotiated
from frontends.blkfront.errors import (
    BlkError,
    BlkfrontProtocolError,
    DeviceNotFound,
    io_error,
    not_supported,
)
from frontends.blkfront.keys import Geometry, Wishes
from xenpv.abi.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    SECTOR_SIZE,
    blkif_protocol,
)
from xenpv.abi.ring import FrontRing
from xenpv.hv import Domain, EventChannel, GrantError, HvError, Page
from xenpv.hv.errors import EventChannelClosed, PeerGone
from xenpv.metrics.counters import BlkfrontStats
from xenpv.metrics.registry import REGISTRY
from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import Action, DeviceId
from xenpv.xenbus.handshake import KeyValues, is_online, read_keys, read_state, run_handshake
from xenpv.xenbus.keys import ULLONG_MAX
from xenpv.xenstore.client import XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

DETACH_TIMEOUT = 5.0
UNPLUG_DRAIN_TIMEOUT = 5.0  # seconds requests on the rings may take to finish at an unplug
UNPLUGGED = "the device was unplugged"
# Test-only (docs/faults.md, "Simulation"): XENPV_PLANT_BUG=blkfront-reissue, read when a
# device is made, plants a lost write: at each reconnect one unfinished write is acknowledged
# instead of re-issued. The fault checkers must catch it; nothing else sets it.
PLANT_BUG_ENV = "XENPV_PLANT_BUG"
PLANTED_LOST_REISSUE = "blkfront-reissue"


@dataclass(eq=False)
class _Connection:
    """The resources of one handshake: ring pages, their grants, the event channels."""

    geometry: Geometry
    pages: list[Page]
    grefs: list[list[int]]
    channels: list[EventChannel]
    rings: list[FrontRing]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    gone: trio.Event = field(default_factory=trio.Event)  # set when the connection ends
    live: bool = False


class _EventWaiter:
    """Completion of an I/O awaited by its own task (`read`, `write`, ...)."""

    __slots__ = ("event",)

    def __init__(self, event: trio.Event) -> None:
        self.event = event

    def completed(self, io: BlkIo) -> None:
        self.event.set()


class Completion(NamedTuple):
    """A finished I/O of an `IoQueue`: its `tag`, the data of a read (the buffer it was
    read into, which the caller owns; None for a write), and `error` (None, or the
    BlkError it failed with)."""

    tag: Any
    data: bytearray | memoryview | None
    error: BlkError | None


class IoQueue:
    """Submit I/Os without waiting for each, reap completions in batches: the shape of
    io_uring / libaio (what fio and databases drive a disk with at high queue depth).

        queue = disk.io_queue()
        queue.read(0, 4096, tag="a")        # no await: queued
        queue.write(8192, data, tag="b")
        for done in await queue.wait():     # submits, then waits for at least one
            if done.error: raise done.error
            use(done.tag, done.data)

    `read` / `write` only queue the I/O (checked as `Blkfront.read` / `write` check it); it
    reaches the ring at the next `submit()` or `wait()`, so a batch of submissions costs one
    ring push and at most one notification. `wait()` returns every completion available,
    at least one (an empty list when nothing is in flight). Completions are delivered by
    the device's event-channel task without waking a task per I/O: with `read()` each
    completion costs a task switch, the main cost of a small I/O. I/Os of all queues and of
    `read`/`write` share the device's `queue_depth`: a submission beyond it raises
    `trio.WouldBlock` (callers keep their own count below it). Recovery is the same as for
    `read`/`write`: across a reconnect I/Os are re-issued, never completed twice.
    """

    __slots__ = ("_done", "_front", "_lot", "_unsubmitted", "in_flight")

    def __init__(self, front: Blkfront) -> None:
        self._front = front
        self._done: list[Completion] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._unsubmitted = False
        self.in_flight = 0  # submitted and not yet returned by wait()

    def read(self, offset: int, length: int, tag: Any = None) -> None:
        """Read `length` bytes at `offset` into a new bytearray (the completion's data)."""
        self.readinto(offset, bytearray(length), tag)

    def readinto(self, offset: int, buffer: bytearray | memoryview, tag: Any = None) -> None:
        """Read `len(buffer)` bytes at `offset` into `buffer` (the completion's data is that
        buffer; it must stay untouched until then). Reusing buffers saves allocating and
        zeroing fresh memory per I/O, which at 1 MiB costs more than the I/O itself."""
        view = memoryview(buffer)
        if view.readonly or view.ndim != 1 or view.itemsize != 1:
            raise ValueError("readinto needs a writable, flat byte buffer")
        self._queue_data(BLKIF_OP_READ, offset, len(view), buffer, tag)

    def write(self, offset: int, data: bytes | bytearray | memoryview, tag: Any = None) -> None:
        """Write `data` at `offset`. Not copied: a mutable buffer must stay untouched until
        the completion (the I/O is re-sent from it if the backend reconnects)."""
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            raise ValueError("write needs a flat byte buffer")
        self._queue_data(BLKIF_OP_WRITE, offset, len(view), data, tag)

    def _queue_data(
        self, op: int, offset: int, length: int, data: bytes | bytearray | memoryview, tag: Any
    ) -> None:
        front = self._front
        sector = front._check_now(offset, length, write=op == BLKIF_OP_WRITE)
        waiter = _QueueWaiter(self, tag)
        self._queue(
            BlkIo(int(op), sector, length, offset % front.dom.page_size, data, waiter=waiter)
        )

    def _queue(self, io: BlkIo) -> None:
        front = self._front
        if not front._wanted:
            raise io_error("the device is detached")
        front._depth.acquire_nowait()  # trio.WouldBlock at queue_depth I/Os in flight
        self.in_flight += 1
        front.engine.submit(io)
        self._unsubmitted = True

    def submit(self) -> None:
        """Put the queued I/Os on the rings (one push per ring, notify if asked to)."""
        if self._unsubmitted:
            self._unsubmitted = False
            self._front._kick()

    async def wait(self) -> list[Completion]:
        """Submit, then wait for completions; every one available (none if none is due)."""
        self.submit()
        if self._done or not self.in_flight:
            await trio.lowlevel.checkpoint()
        else:
            await self._lot.park()
        done, self._done = self._done, []
        self.in_flight -= len(done)
        return done

    def _completed(self, io: BlkIo, tag: Any) -> None:
        self._front._depth.release()
        error = None
        if io.status != BLKIF_RSP_OKAY:
            assert io.status is not None
            error = BlkError(io.status, io.reason or "I/O failed")
        data = io.data if io.operation == BLKIF_OP_READ and error is None else None
        assert not isinstance(data, bytes)
        self._done.append(Completion(tag, data, error))
        if len(self._done) == 1:
            self._lot.unpark_all()


class _QueueWaiter:
    __slots__ = ("queue", "tag")

    def __init__(self, queue: IoQueue, tag: Any) -> None:
        self.queue = queue
        self.tag = tag

    def completed(self, io: BlkIo) -> None:
        self.queue._completed(io, self.tag)


class Blkfront:
    """One virtual block device of a guest (see `frontends.blkfront.attach`)."""

    role: xenbus.Role = "frontend"

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        *,
        queue_depth: int,
        grant_size: int,
        wishes: Wishes,
    ) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        self.dom = dom
        self.xs = xs
        self.device = device
        self.wishes = wishes
        self.grant_size = grant_size
        self.queue_depth = queue_depth
        self.engine = Engine(
            dom.memory,
            dom.grants,
            device.backend_domid,
            grant_size=grant_size,
            queue_depth=queue_depth,
            planted_lost_reissue=os.environ.get(PLANT_BUG_ENV) == PLANTED_LOST_REISSUE,
            counters=self._register_queue,
        )
        self._info: Negotiated | None = None  # the last connection's parameters
        self.connections = 0  # handshakes completed (1 + reconnects)
        self._depth = trio.Semaphore(queue_depth)
        self._connected = trio.Event()
        self._resized = trio.Event()
        self._closed = trio.Event()
        self._progress = trio.Event()  # set (and renewed) whenever I/Os complete
        self._conn: _Connection | None = None
        # ring grants (and their pages) the backend still mapped at a teardown
        self._stuck_rings: list[tuple[list[int], list[Page]]] = []
        self._wanted = True
        self._nursery: trio.Nursery | None = None
        self._log = log.bind(device=str(device), domid=dom.domid)

    def _register_queue(self, queue: int) -> BlkfrontStats:
        """The counters of queue `queue`, exposed (docs/metrics.md)."""
        key = (self.dom.domid, self.device.backend_domid, self.device.devid, queue)
        return REGISTRY.register_queue(REGISTRY.blkfront, key, BlkfrontStats())

    # -- the API ------------------------------------------------------------------------------

    async def wait_connected(self) -> None:
        """Return once the device is connected (at once if it is)."""
        while not self.engine.connected:
            await self._connected.wait()

    async def read(self, offset: int, length: int) -> bytes:
        sector = await self._check(offset, length, write=False)
        io = BlkIo(
            int(BLKIF_OP_READ),
            sector,
            length,
            offset % self.dom.page_size,
            bytearray(length),
        )
        await self._run(io)
        return bytes(io.data)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        payload = bytes(data)
        sector = await self._check(offset, len(payload), write=True)
        io = BlkIo(int(BLKIF_OP_WRITE), sector, len(payload), offset % self.dom.page_size, payload)
        await self._run(io)

    async def flush(self) -> None:
        """Flush the backend's cache (FLUSH_DISKCACHE, or WRITE_BARRIER); a no-op when the
        backend offers neither, as for a Linux disk without a write cache."""
        await self.wait_connected()
        if self._read_only():
            return
        await self._run(BlkIo(int(BLKIF_OP_FLUSH_DISKCACHE), 0, 0))

    async def discard(self, offset: int, length: int) -> None:
        sector = await self._check(offset, length, write=True)
        if not self.engine.discard:
            raise not_supported("the backend does not support discard")
        await self._run(BlkIo(int(BLKIF_OP_DISCARD), sector, length))

    async def wait_capacity_change(self) -> int:
        """Wait for the backend's next capacity change (a Connected re-write); the new size
        in 512-byte sectors."""
        await self._resized.wait()
        return self.info.sectors

    @property
    def capacity(self) -> int:
        """The disk size in bytes (0 before the first connection)."""
        return self._info.capacity if self._info is not None else 0

    @property
    def info(self) -> Negotiated:
        """What the last connection negotiated; an error before the first one."""
        if self._info is None:
            raise io_error("not connected yet: await wait_connected() first")
        return self._info

    def _read_only(self) -> bool:
        return self._info is not None and self._info.read_only

    async def _check(self, offset: int, length: int, *, write: bool) -> int:
        if self._info is None:
            await self.wait_connected()
        return self._check_now(offset, length, write=write)

    def _check_now(self, offset: int, length: int, *, write: bool) -> int:
        info = self._info  # once: this runs for every I/O
        if info is None:
            raise io_error("not connected yet: await wait_connected() first")
        block = info.sector_size
        if offset < 0 or length <= 0 or offset % block or length % block:
            raise io_error(
                f"I/O of {length} bytes at {offset}: both must be positive multiples of the "
                f"{block}-byte sector size"
            )
        if offset + length > info.capacity:
            raise io_error(f"I/O at {offset}+{length} beyond the end of the disk ({self.capacity})")
        if write and info.read_only:
            raise io_error("the disk is read-only")
        return offset // SECTOR_SIZE

    async def _run(self, io: BlkIo) -> None:
        if not self._wanted:
            raise io_error("the device is detached")
        async with self._depth:
            done = trio.Event()
            io.waiter = _EventWaiter(done)
            self.engine.submit(io)
            self._kick()
            await done.wait()
        if io.status != BLKIF_RSP_OKAY:
            assert io.status is not None
            raise BlkError(io.status, io.reason or "I/O failed")

    def io_queue(self) -> IoQueue:
        """A submission/completion queue on this device: the interface for many I/Os in
        flight from one task (see `IoQueue`)."""
        return IoQueue(self)

    # -- engine plumbing ------------------------------------------------------------------

    def _wake(self, ios: list[BlkIo]) -> None:
        for io in ios:
            if io.waiter is not None:
                io.waiter.completed(io)
        if ios:
            self._progress.set()
            self._progress = trio.Event()

    def _kick(self) -> None:
        """Put what fits on the rings and notify the backend."""
        conn = self._conn
        if conn is None or not conn.live:
            return
        try:
            notify = self.engine.dispatch()
        except GrantError as exc:  # a grant table fault, not exhaustion: a local bug
            self._log.error("cannot grant I/O buffers", error=str(exc))
            raise
        self._wake(self.engine.take_finished())
        for index in notify:
            try:
                conn.channels[index].notify()
            except EventChannelClosed as exc:
                self._lost(conn, f"event channel closed: {exc}")
                return

    def _lost(self, conn: _Connection, reason: str) -> None:
        """The connection is unusable: keep every unfinished I/O for the next one."""
        if not conn.live:
            return
        conn.live = False
        conn.gone.set()
        conn.scope.cancel()
        report = self._log.warning if self._wanted else self._log.info
        report("blkfront connection lost", reason=reason, unfinished=self.engine.unfinished())
        self.engine.disconnect()
        self._connected = trio.Event()

    async def _queue_task(self, conn: _Connection, index: int) -> None:
        channel = conn.channels[index]
        try:
            while True:
                self._wake(self.engine.poll(index))
                self._kick()
                if not conn.live:
                    return
                await channel.wait()
        except (EventChannelClosed, PeerGone) as exc:
            self._lost(conn, f"backend gone: {exc}")
        except BlkfrontProtocolError as exc:
            self._log.error("backend broke the blkif protocol", error=str(exc))
            self._lost(conn, str(exc))
            if self._nursery is not None:
                self._nursery.start_soon(self._close_on_error)

    async def _close_on_error(self) -> None:
        """Switch to Closing (Linux `xenbus_dev_fatal`) once Connected is published: the
        error may come from the first responses, before the handshake wrote Connected, and
        writing Closing before that would be overwritten."""
        path = f"{self.device.frontend}/state"
        async with self.xs.watch(path) as events:
            async for _ in events:
                state = await read_state(self.xs, self.device.frontend)
                if state == xenbus.Connected:
                    await self.xs.write(path, str(int(xenbus.Closing)))
                    return
                if state != xenbus.Initialised:
                    return  # already closing, or starting over

    # -- xenbus actions -------------------------------------------------------------------

    async def perform(self, action: Action) -> KeyValues | None:
        self._release_stuck()  # the backend's state moved: it may have unmapped since
        if action is Action.SETUP:
            if not self._wanted:
                return None
            return await self._setup()
        if action is Action.CONNECT:
            return await self._connect()
        if action is Action.CAPACITY:
            await self._capacity()
            return {}
        if action is Action.CLOSE:
            if self._wanted and not await is_online(self.xs, self.device):
                await self._unplugged()
            self._teardown("closed through xenbus")
            if not self._wanted:  # unplugged: nothing will reconnect, fail what is left
                self._wake(self.engine.fail_pending(int(BLKIF_RSP_ERROR), UNPLUGGED))
            self._closed.set()
            return {}
        if action is Action.REINIT:
            if not self._wanted:
                return None
            self._closed = trio.Event()
            return {}
        return {}

    async def _unplugged(self) -> None:
        """The toolstack is removing the device (backend `online` = 0, state Closing): take
        no new I/O, fail what is not on a ring yet, and let the backend (still serving until
        we are Closed) answer what is, for up to UNPLUG_DRAIN_TIMEOUT; `CLOSE` then fails the
        rest. Linux blkfront_closing likewise stops the queues before switching to Closed."""
        self._wanted = False
        self._log.info("device unplugged by the toolstack", unfinished=self.engine.unfinished())
        self._wake(self.engine.fail_pending(int(BLKIF_RSP_ERROR), UNPLUGGED))
        conn = self._conn
        with trio.move_on_after(UNPLUG_DRAIN_TIMEOUT):
            while self.engine.unfinished() and conn is not None and conn.live:
                await self._progress.wait()

    async def _setup(self) -> KeyValues | None:
        self._teardown("new handshake")
        await self._remove_stale_keys()
        backend = await read_keys(self.xs, self.device.backend, blk_keys.SETUP_KEYS)
        geo = blk_keys.geometry(self.wishes, backend, self.dom.page_size)
        nframes = 1 << geo.ring_page_order
        step = 1 << geo.granule_order  # frames per ring grant
        layout = blkif_protocol(self.wishes.protocol).ring_layout
        conn = _Connection(geo, [], [], [], [])
        self._conn = conn
        remote = self.device.backend_domid
        try:
            for _ in range(geo.queues):
                page = self.dom.alloc_buffer(nframes)
                conn.pages.append(page)
                ring = FrontRing(page, layout)  # SHARED_RING_INIT
                conn.rings.append(ring)
                grefs: list[int] = []
                conn.grefs.append(grefs)
                for i in range(0, nframes, step):
                    grefs.append(
                        self.dom.grants.grant_access(
                            remote, page.frame + i, order=geo.granule_order
                        )
                    )
                conn.channels.append(await self.dom.alloc_unbound(remote))
        except HvError as exc:
            # Out of guest memory, grant entries or ports: stay in Initialising (Linux
            # fails the probe with xenbus_dev_fatal); a later backend event retries.
            self._log.error("cannot set up the rings", error=str(exc))
            self._teardown("setup failed")
            return None
        keys = blk_keys.setup_keys(geo, conn.grefs, [c.port for c in conn.channels], self.wishes)
        self._log.info(
            "blkfront setup",
            order=geo.ring_page_order,
            queues=geo.queues,
            granule_order=geo.granule_order,
        )
        return keys

    async def _remove_stale_keys(self) -> None:
        """Drop a previous connection's ring keys: a backend must not read `queue-3/...` or
        `ring-page-order` left over when this connection uses fewer queues or pages."""
        try:
            names = await self.xs.directory(self.device.frontend)
        except XsError:
            return
        for name in names:
            if blk_keys.is_ring_key(name):
                with contextlib.suppress(XsError):
                    await self.xs.rm(f"{self.device.frontend}/{name}")

    async def _connect(self) -> KeyValues | None:
        conn = self._conn
        if conn is None:  # Connected without our rings (e.g. we restarted): start over
            return None
        backend = await read_keys(self.xs, self.device.backend, blk_keys.CONNECT_KEYS)
        try:
            neg = blk_keys.negotiated(
                self.wishes,
                conn.geometry,
                backend,
                handle=self.device.devid,
            )
        except BlkfrontProtocolError as exc:
            # Linux: xenbus_dev_fatal → Closing; the close/reconnect rules take it from there.
            self._log.error("backend published unusable device keys", error=str(exc))
            await self.xs.write(f"{self.device.frontend}/state", str(int(xenbus.Closing)))
            return None
        self.engine.connect(neg, conn.rings)
        self.grant_size = neg.grant_size
        self._info = neg
        self.connections += 1
        conn.live = True
        assert self._nursery is not None
        self._nursery.start_soon(self._run_queues, conn)
        self._log.info("blkfront connected", **neg.summary(), pending=len(self.engine.pending))
        self._kick()
        self._connected.set()
        return {}

    async def _run_queues(self, conn: _Connection) -> None:
        with conn.scope:
            async with trio.open_nursery() as nursery:
                for index in range(len(conn.rings)):
                    nursery.start_soon(self._queue_task, conn, index)

    async def _capacity(self) -> None:
        backend = await read_keys(self.xs, self.device.backend, ["sectors"])
        sectors = blk_keys.number(backend, "sectors", -1, maximum=ULLONG_MAX)
        if sectors < 0 or self.engine.negotiated is None:
            return
        self.engine.negotiated = dataclasses.replace(self.engine.negotiated, sectors=sectors)
        changed = self._info is None or sectors != self._info.sectors
        self._info = self.engine.negotiated
        if changed:
            self._log.info("blkfront capacity change", sectors=sectors)
            self._resized.set()
            self._resized = trio.Event()

    def _teardown(self, reason: str) -> None:
        """Drop the connection's rings and channels (unfinished I/Os stay in the engine)."""
        conn = self._conn
        if conn is None:
            return
        self._lost(conn, reason)
        conn.scope.cancel()
        for channel in conn.channels:
            channel.close()
        self._stuck_rings.append(([g for grefs in conn.grefs for g in grefs], conn.pages))
        self._conn = None
        if self._release_stuck():
            # The backend still maps a ring page: it is not reused until the backend unmaps
            # (Linux gnttab_end_foreign_access defers the same way). Normal at an unplug, where
            # the backend unmaps once we are Closed.
            self._log.info("backend still maps the ring; freed once it unmaps")

    def _release_stuck(self) -> int:
        """End what a backend mapped when we tore down, now that it may have unmapped; free
        the ring pages whose grants all ended. Returns how many grants are still mapped."""
        left_rings: list[tuple[list[int], list[Page]]] = []
        for grefs, pages in self._stuck_rings:
            left = []
            for gref in grefs:
                try:
                    self.dom.grants.end_access(gref)
                except (GrantError, HvError):
                    left.append(gref)
            if left:
                left_rings.append((left, pages))
            else:
                self.dom.free_pages(pages)
        self._stuck_rings = left_rings
        return sum(len(g) for g, _ in left_rings) + self.engine.release_stuck()

    async def run_handshake(self) -> None:
        """Drive the xenbus handshake for the device's life. A xenstore that refuses us (the
        toolstack destroyed the device or the domain) ends it quietly: there is nothing left
        to negotiate, and `detach` still tears down."""
        try:
            await run_handshake(self.xs, self)
        except (XsError, XenstoreConnectionError) as exc:
            self._log.warning("xenbus handshake stopped: xenstore refused", error=str(exc))

    async def start(self) -> None:
        """Probe: a frontend left in a later state by a previous instance (a crashed guest
        driver) starts over at Initialising; the backend RESETs on seeing it. Closed is left
        alone: the xenbus rules REINIT from there once the backend is Closed too."""
        keys = await read_keys(self.xs, self.device.frontend, ["backend", "state"])
        if keys["backend"] != self.device.backend:
            raise DeviceNotFound(
                f"no vbd {self.device}: {self.device.frontend}/backend is "
                f"{keys['backend']!r}, not {self.device.backend!r}"
            )
        state = xenbus.parse_state(keys["state"])
        if state not in (xenbus.Initialising, xenbus.Closed):
            self._log.info("frontend restarted", previous=state.short)
            await self.xs.write(f"{self.device.frontend}/state", str(int(xenbus.Initialising)))

    async def detach(self) -> None:
        """Close the device through xenbus (Closing → Closed) and fail unsent I/Os. A device
        whose nodes are gone (the toolstack destroyed it, or the whole domain) just tears down."""
        self._wanted = False
        self._wake(self.engine.fail_pending(int(BLKIF_RSP_ERROR), "the device is detached"))
        try:
            await self._close_through_xenbus()
        except (XsError, XenstoreConnectionError) as exc:
            self._log.info("device gone from xenstore while detaching", error=str(exc))
        finally:
            self._teardown("detached")
            self._wake(self.engine.fail_pending(int(BLKIF_RSP_ERROR), "the device is detached"))
            if left := self._release_stuck():
                self._log.warning("backend still maps grants at detach; pages leaked", grants=left)

    async def _close_through_xenbus(self) -> None:
        state = await read_state(self.xs, self.device.frontend)
        conn = self._conn
        if state in (xenbus.Initialised, xenbus.Connected) and conn is not None and conn.live:
            await self.xs.write(f"{self.device.frontend}/state", str(int(xenbus.Closing)))
            # Wait for the backend to take part (it unmaps our grants), unless it is gone.
            with trio.move_on_after(DETACH_TIMEOUT):
                async with trio.open_nursery() as nursery:

                    async def closed() -> None:
                        # Closed as published (the handshake writes it after CLOSE ran).
                        path = f"{self.device.frontend}/state"
                        with contextlib.suppress(XsError, XenstoreConnectionError):
                            async with self.xs.watch(path) as events:
                                async for _ in events:
                                    state = await read_state(self.xs, self.device.frontend)
                                    if state in (xenbus.Closed, xenbus.Unknown):
                                        break
                        nursery.cancel_scope.cancel()

                    async def backend_died() -> None:
                        # A backend that closes its ports is taking part; one whose link is
                        # gone never will.
                        await conn.gone.wait()
                        if self.dom.link_to(self.device.backend_domid) is None:
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(closed)
                    nursery.start_soon(backend_died)
