"""The trio edge of netfront: rings, grants and event channels of each queue, the handshake,
and the `send` / `receive` API.

One `Netfront` per vif. Each connection (one run of the handshake) owns its queues; a queue
is a tx ring and an rx ring (one 4 KiB frame each, granted to the backend), one event channel
or two (`feature-split-event-channels`), a tx arena of one granule per tx id (at most
TX_ARENA_BYTES per queue: fewer ids than ring slots with 32K/64K granules), and one
rx buffer page per rx slot, of which the first granule is granted: under the 4 KiB baseline
only the first 4 KiB of a 16K/64K page (as Linux netfront), with the negotiated granule
extension the whole page when the granule is the page (docs/net.md, "Grant granules"). Queue
tasks sleep on their event channel and run the sans-IO cores (core.py) when woken.

The granule is negotiated per connection: `granule_order` (attach's argument) is the cap,
None = as large as allowed (the guest's page order), 0 = decline; the order actually used is
`min(page order, cap, backend's max-grant-granule-order)` and is in `info.granule_order`.
A backend that reaches Connected without echoing a non-zero order did not accept it: netfront
then reconnects with 4 KiB grants (`granule_fallback`; docs/net.md, "Spec notes").

Reconnect, like Linux netfront: when the backend closes, the connection's tasks stop, packets
still on the tx ring are dropped (counted in `tx_dropped`), grants are ended (those the
backend still maps are retried later, their pages kept until then), and `send()` waits for the
next connection. Frames already received stay readable through `receive()`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import structlog
import trio

from frontends.netfront.core import (
    MAX_TX_SLOTS,
    Negotiated,
    NetfrontError,
    NetfrontProtocolError,
    RxCore,
    RxFrame,
    TxCore,
)
from frontends.netfront.flowhash import select_queue
from frontends.netfront.keys import (
    BACKEND_FEATURE_KEYS,
    BackendFeatures,
    HandshakeError,
    QueueKeys,
    frontend_keys,
    negotiate_granule,
    negotiate_queues,
    parse_features,
    parse_mac,
    stale_keys,
)
from xenpv.abi.errors import RingError
from xenpv.abi.netif import (
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NetifGsoExtra,
)
from xenpv.abi.netif_ctrl import (
    CTRL_RING_REF,
    EVENT_CHANNEL_CTRL,
    FEATURE_CTRL_RING,
    NETIF_CTRL_RING,
    CtrlRequest,
    CtrlResponse,
    CtrlStatus,
    CtrlType,
    HashAlgorithm,
    HashFlags,
    decode_response,
    encode_request,
)
from xenpv.abi.ring import RING_IDX_MASK, FrontRing
from xenpv.errors import XenpvError
from xenpv.granule import FRONTEND_KEY, MAX_GRANULE_ORDER
from xenpv.hv import (
    GNTST,
    XEN_PAGE_SIZE,
    Domain,
    EventChannel,
    EventChannelClosed,
    GrantError,
    Page,
)
from xenpv.hv.errors import HvError
from xenpv.metrics.counters import NetfrontStats
from xenpv.metrics.registry import REGISTRY
from xenpv.tap import Tap
from xenpv.xenbus.core import Action, Closed, Closing, Connected, DeviceId, Role, Unknown
from xenpv.xenbus.handshake import KeyValues, is_online, read_keys, read_state
from xenpv.xenbus.keys import NET_MAX_QUEUES
from xenpv.xenstore.client import XenstoreClient
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

TX_ARENA_BYTES = 4 << 20  # per queue: all 256 tx ids up to 16 KiB granules, 64 with 64 KiB
RX_CHANNEL_DEPTH = 1024  # received frames waiting for receive() before rx stops refilling
SHUTDOWN_TIMEOUT = 5.0


def tx_ids(ring_slots: int, granule: int) -> int:
    """Tx ids (= tx arena granules) of a queue: the ring's slots, bounded by TX_ARENA_BYTES."""
    return max(MAX_TX_SLOTS, min(ring_slots, TX_ARENA_BYTES // granule))


def default_max_queues() -> int:
    """Linux: xennet_max_queues defaults to the number of online CPUs, capped at 8."""
    return max(1, min(os.cpu_count() or 1, NET_MAX_QUEUES))


@dataclass(eq=False)
class _Queue:
    index: int
    tx: TxCore
    rx: RxCore
    arena: Page
    ring_pages: list[Page]
    rx_pages: list[Page]
    tx_grefs: list[int]  # one read-only grant per tx arena granule, for the connection
    tx_ring_gref: int
    rx_ring_gref: int
    evtchn_tx: EventChannel
    evtchn_rx: EventChannel
    lock: trio.Lock = field(default_factory=trio.Lock)
    space: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    broken: str | None = None
    unpushed: bool = False  # requests put by send(more=True), not pushed yet

    @property
    def split(self) -> bool:
        return self.evtchn_rx is not self.evtchn_tx


@dataclass(eq=False)
class _Connection:
    generation: int
    features: BackendFeatures
    queues: list[_Queue]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dead: bool = False
    backend_connected: bool = False
    granule: int = XEN_PAGE_SIZE  # the negotiated grant size of this connection
    unpushed: list[_Queue] = field(default_factory=list)  # queues with unpushed requests
    ctrl: _CtrlRing | None = None  # the control ring, if the backend offers one


@dataclass(eq=False)
class _CtrlRing:
    """The control ring (io/netif.h): one page, one port, one request in flight at a time."""

    page: Page
    gref: int
    channel: EventChannel
    ring: FrontRing
    lock: trio.Lock = field(default_factory=trio.Lock)
    next_id: int = 0


@dataclass(eq=False)
class _Deferred:
    """Grants the backend still maps, and the pages to free once they have all ended."""

    grefs: list[int]
    pages: list[Page]


class Netfront:
    """A vif frontend. Create with `attach()`; `send`, `receive`, `wait_connected`."""

    role: Role = "frontend"

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        *,
        granule_order: int | None = None,
        max_queues: int | None = None,
    ) -> None:
        if device.cls != "vif":
            raise NetfrontError(f"netfront drives vifs, not {device}")
        self.dom = dom
        self.xs = xs
        self.device = device
        if granule_order is not None and not 0 <= granule_order <= MAX_GRANULE_ORDER:
            raise NetfrontError(f"granule_order {granule_order} not in 0..{MAX_GRANULE_ORDER}")
        self.granule_cap = granule_order  # None: as large as allowed; 0: decline
        self.granule_order = 0  # negotiated per connection (_setup)
        self.granule_fallback: str | None = None  # why 4 KiB grants are forced from now on
        self.granule = XEN_PAGE_SIZE << self.granule_order  # the negotiated grant size
        self.max_queues = max_queues if max_queues is not None else default_max_queues()
        self.mac = b""
        self._info: Negotiated | None = None  # the last connection's parameters
        self._conn: _Connection | None = None
        self._generation = 0
        self._changed = trio.Event()
        self._rx_send, self._rx_recv = trio.open_memory_channel[RxFrame](RX_CHANNEL_DEPTH)
        self._rx_queued = 0  # frames in the receive() channel
        self._rx_sink: Callable[[RxFrame], bool] | None = None
        self._nursery: trio.Nursery | None = None
        self._deferred: list[_Deferred] = []
        self._wanted = True
        self._closed = False
        # Per queue index, for the device's life (every connection counts into them).
        self._counters: list[NetfrontStats] = []
        self.tap: Tap | None = None  # the attached TAP device (`xenpv-tap`), if any
        self.setup_error: str | None = None  # why the last SETUP refused to connect

    # -- public API -------------------------------------------------------------------------

    async def send(
        self,
        frame: bytes | bytearray | memoryview,
        *,
        gso: NetifGsoExtra | None = None,
        csum_blank: bool = False,
        data_validated: bool = False,
        more: bool = False,
    ) -> None:
        """Queue one Ethernet frame for transmission (returns once it is on a tx ring).

        Waits for ring space (backpressure) and, while disconnected, for the next connection.
        `gso`: a TCP segmentation request (the frame is one big TCP packet, `gso.size` the
        MSS); `csum_blank`: the L4 checksum field holds only the pseudo-header sum.
        `more=True` is Linux's `netdev_xmit_more()`: another frame follows at once, so the
        requests are put on the ring but not pushed (no notification) until a send without
        `more`, a `flush()`, or a wait for ring space. One notification per burst instead of
        per frame is what lets the backend take the burst in one pass. `frame` is copied
        before `send` returns, so the caller may reuse its buffer.
        """
        view = memoryview(frame).cast("B")
        length = len(view)
        while True:
            conn = await self._usable()
            self._check_offloads(conn.features, length, gso, conn.granule)
            queue = conn.queues[select_queue(view, len(conn.queues))]
            pieces = queue.tx.plan(length, gso)
            need = len(pieces)
            self._reap(queue)
            if queue.lock.locked() or not queue.tx.room(need, gso is not None):
                async with queue.lock:
                    while not queue.tx.room(need, gso is not None):
                        if conn.dead or queue.broken is not None:
                            break
                        self._push_tx(queue)  # deferred requests must reach the backend first
                        if self._wait_for_answers(queue):
                            continue
                        await queue.space.park()
                    if conn.dead:
                        continue
                    self._post(conn, queue, view, pieces, gso, csum_blank, data_validated)
            elif not conn.dead:
                self._post(conn, queue, view, pieces, gso, csum_blank, data_validated)
            else:
                continue
            if not more:
                self._flush_conn(conn)
            await trio.lowlevel.checkpoint()
            return

    def flush(self) -> None:
        """Push (and notify) tx requests that `send(..., more=True)` left unpushed."""
        conn = self._conn
        if conn is not None and not conn.dead:
            self._flush_conn(conn)

    async def receive(self) -> RxFrame:
        """The next received frame (`.frame` bytes, plus offload metadata).

        Frames received before a detach can still be read; after that, `NetfrontError`."""
        try:
            frame = await self._rx_recv.receive()
        except trio.EndOfChannel:
            raise NetfrontError("netfront is closed") from None
        self._rx_queued -= 1
        return frame

    def receive_nowait(self) -> RxFrame:
        """A frame already received, or trio.WouldBlock."""
        try:
            frame = self._rx_recv.receive_nowait()
        except trio.EndOfChannel:
            raise NetfrontError("netfront is closed") from None
        self._rx_queued -= 1
        return frame

    def set_rx_sink(self, sink: Callable[[RxFrame], bool] | None) -> None:
        """Hand received frames straight to `sink`, in netfront's rx task, while none wait
        in the `receive()` channel. `sink` returns False when it cannot take a frame now:
        that frame and the ones after it then go to the channel, in order, until a reader
        has drained it. The TAP attach uses this to write frames to the kernel without a
        task switch (~20 µs) per batch; None turns it off."""
        self._rx_sink = sink

    async def wait_connected(self) -> None:
        """Wait until rings are set up and the backend is Connected."""
        while True:
            conn = self._conn
            if conn is not None and not conn.dead and conn.backend_connected:
                return
            if self._closed:
                raise NetfrontError("netfront is closed")
            await self._changed.wait()

    async def wait_disconnected(self) -> None:
        """Wait until the current connection (if any) is gone."""
        while self.connected:
            await self._changed.wait()

    @property
    def closed(self) -> bool:
        """The frontend was detached (`attach` block left)."""
        return self._closed

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.dead and conn.backend_connected

    @property
    def info(self) -> Negotiated:
        """What the last connection negotiated; an error before the first one."""
        if self._info is None:
            raise NetfrontError("not connected yet: await wait_connected() first")
        return self._info

    def stats(self) -> dict[str, int]:
        """Counters (docs/metrics.md) summed over every queue of every connection so far."""
        totals: dict[str, int] = dict.fromkeys(NetfrontStats.__slots__, 0)
        for counters in self._counters:
            for name in totals:
                totals[name] += getattr(counters, name)
        return totals

    def _queue_counters(self, index: int) -> NetfrontStats:
        """Queue `index`'s record, registered when a connection first has that queue."""
        while len(self._counters) <= index:
            key = (
                self.dom.domid,
                self.device.backend_domid,
                self.device.devid,
                len(self._counters),
            )
            self._counters.append(REGISTRY.register_queue(REGISTRY.netfront, key, NetfrontStats()))
        return self._counters[index]

    # -- handshake driver (xenpv.xenbus.handshake.HandshakeDriver) ---------------------------

    async def perform(self, action: Action) -> KeyValues | None:
        if action is Action.SETUP:
            return await self._setup()
        if action is Action.CLOSE:
            unplugged = not await is_online(self.xs, self.device)
            self._teardown("backend closed the device")
            if unplugged:
                # The toolstack is removing the device: never start over, and senders
                # waiting for a connection fail now rather than when the task is cancelled.
                self._wanted = False
                self._closed = True
                self._set_changed()
            return {}
        if action is Action.REINIT:
            if not self._wanted:
                return None
            self._retry_deferred()
            return {}
        return {}

    # -- connection life cycle ---------------------------------------------------------------

    async def _setup(self) -> KeyValues | None:
        self._teardown("new connection")
        self._retry_deferred()
        xs, device = self.xs, self.device
        try:
            self.mac = parse_mac((await read_keys(xs, device.frontend, ["mac"]))["mac"])
            features = parse_features(
                await read_keys(xs, device.backend, list(BACKEND_FEATURE_KEYS))
            )
            if not features.rx_copy:
                raise HandshakeError("backend does not offer feature-rx-copy")
        except HandshakeError as exc:
            log.error("netfront.setup_failed", device=str(device), error=str(exc))
            self.setup_error = str(exc)
            self._set_changed()
            return None
        nr_queues = negotiate_queues(self.max_queues, features)
        cap = 0 if self.granule_fallback is not None else self.granule_cap
        self.granule_order = negotiate_granule(self.dom.page_size, features, cap)
        self.granule = XEN_PAGE_SIZE << self.granule_order
        queues: list[_Queue] = []
        try:
            for index in range(nr_queues):
                queues.append(await self._make_queue(index, features))
        except HvError as exc:
            log.error("netfront.setup_failed", device=str(device), error=str(exc))
            self.setup_error = str(exc)
            self._set_changed()
            for queue in queues:
                self._release_queue(queue)
            return None
        ctrl = None
        if (await read_keys(xs, device.backend, [FEATURE_CTRL_RING]))[FEATURE_CTRL_RING] == "1":
            try:
                ctrl = await self._make_ctrl_ring()
            except HvError as exc:  # no control ring is no reason to refuse the device
                log.warning("netfront.no_ctrl_ring", device=str(device), error=str(exc))
        for name in [*stale_keys(NET_MAX_QUEUES), CTRL_RING_REF, EVENT_CHANNEL_CTRL]:
            with suppress(XsError):
                await xs.rm(f"{device.frontend}/{name}")
        self._generation += 1
        self.setup_error = None
        conn = _Connection(self._generation, features, queues, granule=self.granule, ctrl=ctrl)
        for queue in queues:
            queue.rx.post()  # the backend sees them when it connects; nobody to notify yet
        assert self._nursery is not None
        await self._nursery.start(self._run_connection, conn)
        self._conn = conn
        self._info = Negotiated(
            mac=":".join(f"{b:02x}" for b in self.mac),
            queues=nr_queues,
            split_event_channels=features.split_event_channels,
            sg=features.sg,
            gso_tcpv4=features.gso_tcpv4,
            gso_tcpv6=features.gso_tcpv6,
            ipv6_csum_offload=features.ipv6_csum_offload,
            rx_copy=features.rx_copy,
            grant_size=self.granule,
            granule_order=self.granule_order,
            backend_max_granule_order=features.max_granule_order,
            granule_fallback=self.granule_fallback,
            page_size=self.dom.page_size,
            backend_id=device.backend_domid,
            generation=conn.generation,
        )
        self._set_changed()
        log.info("netfront.setup", device=str(device), **self._info.summary())
        keys = [
            QueueKeys(q.tx_ring_gref, q.rx_ring_gref, q.evtchn_tx.port, q.evtchn_rx.port)
            for q in queues
        ]
        published: dict[str, str | int | bytes] = dict(
            frontend_keys(
                keys,
                split_event_channels=features.split_event_channels,
                granule_order=None if features.max_granule_order is None else self.granule_order,
            )
        )
        if ctrl is not None:
            published[CTRL_RING_REF] = ctrl.gref
            published[EVENT_CHANNEL_CTRL] = ctrl.channel.port
        return published

    async def _make_ctrl_ring(self) -> _CtrlRing:
        backend = self.device.backend_domid
        page = self.dom.alloc_buffer(1)
        try:
            ring = FrontRing(page, NETIF_CTRL_RING)
            gref = self.dom.grants.grant_access(backend, page.frame)
        except HvError:
            self.dom.free_pages([page])
            raise
        try:
            channel = await self.dom.alloc_unbound(backend)
        except HvError:
            self._end_grants([gref], [page])
            raise
        return _CtrlRing(page, gref, channel, ring)

    # -- the control ring ---------------------------------------------------------------------

    async def control(self, kind: CtrlType, data: tuple[int, int, int] = (0, 0, 0)) -> CtrlResponse:
        """Send one control request once connected and return the backend's response.
        NetfrontError if the backend offers no control ring or the connection ends."""
        await self.wait_connected()
        conn = self._conn
        if conn is None or conn.ctrl is None:
            raise NetfrontError("the backend offers no control ring (feature-ctrl-ring)")
        ctrl = conn.ctrl
        async with ctrl.lock:
            request_id = ctrl.next_id
            ctrl.next_id = (request_id + 1) & 0xFFFF
            try:
                ctrl.ring.put_request(encode_request(CtrlRequest(request_id, kind, data)))
                if ctrl.ring.push_requests():
                    ctrl.channel.notify()
                while True:
                    raw = ctrl.ring.take_response()
                    if raw is not None:
                        response = decode_response(raw)
                        if response.id != request_id:
                            raise NetfrontError(
                                f"control ring: response id {response.id}, expected {request_id}"
                            )
                        return response
                    if not ctrl.ring.final_check_for_responses():
                        await ctrl.channel.wait()
            except (EventChannelClosed, RingError) as exc:
                raise NetfrontError(f"control ring: {exc}") from None

    async def set_hash(
        self,
        *,
        key: bytes,
        flags: HashFlags,
        mapping: Sequence[int] | None = None,
        algorithm: HashAlgorithm = HashAlgorithm.TOEPLITZ,
    ) -> None:
        """Configure the backend's rx hash through the control ring, in the order io/netif.h
        and Linux netback expect: algorithm, flags, key (in a granted page), mapping size and
        table (granted). `mapping` None: hash modulo the queue count. NetfrontError names the
        request the backend refused and its status."""
        steps: list[tuple[CtrlType, tuple[int, int, int], bytes | None]] = [
            (CtrlType.SET_HASH_ALGORITHM, (int(algorithm), 0, 0), None),
            (CtrlType.SET_HASH_FLAGS, (int(flags), 0, 0), None),
            (CtrlType.SET_HASH_KEY, (0, len(key), 0), key),
            (CtrlType.SET_HASH_MAPPING_SIZE, (len(mapping or ()), 0, 0), None),
        ]
        if mapping:
            table = struct.pack(f"<{len(mapping)}I", *mapping)
            steps.append((CtrlType.SET_HASH_MAPPING, (0, len(mapping), 0), table))
        for kind, data, page_data in steps:
            if not page_data:
                response = await self.control(kind, data)
            else:
                response = await self._control_with_page(kind, data, page_data)
            if response.status != CtrlStatus.SUCCESS:
                try:
                    why = CtrlStatus(response.status).name
                except ValueError:
                    why = f"status {response.status}"
                raise NetfrontError(f"control ring: {kind.name} refused: {why}")

    async def _control_with_page(
        self, kind: CtrlType, data: tuple[int, int, int], content: bytes
    ) -> CtrlResponse:
        """A request whose data[0] is a read-only grant of a page holding `content`."""
        if len(content) > XEN_PAGE_SIZE:
            raise NetfrontError(f"control ring: {len(content)} bytes do not fit one page")
        page = self.dom.alloc_buffer(1)
        page.view[: len(content)] = content
        page.written(0, len(content))
        gref = self.dom.grants.grant_access(self.device.backend_domid, page.frame, readonly=True)
        try:
            return await self.control(kind, (gref, data[1], data[2]))
        finally:
            self._end_grants([gref], [page])

    async def _make_queue(self, index: int, features: BackendFeatures) -> _Queue:
        dom = self.dom
        backend = self.device.backend_domid
        granule = self.granule
        granted: list[int] = []
        pages: list[Page] = []
        channels: list[EventChannel] = []
        try:
            tx_page = dom.alloc_buffer(1)
            pages.append(tx_page)
            rx_page = dom.alloc_buffer(1)
            pages.append(rx_page)
            tx_ring = FrontRing(tx_page, NETIF_TX_RING)
            rx_ring = FrontRing(rx_page, NETIF_RX_RING)
            tx_gref = dom.grants.grant_access(backend, tx_page.frame)
            granted.append(tx_gref)
            rx_gref = dom.grants.grant_access(backend, rx_page.frame)
            granted.append(rx_gref)
            frames = self.granule // XEN_PAGE_SIZE
            nr_ids = tx_ids(tx_ring.nr_ents, self.granule)
            arena = dom.alloc_buffer(nr_ids * frames)
            pages.append(arena)
            tx_grefs = []
            for slot_id in range(nr_ids):
                gref = dom.grants.grant_access(
                    backend, arena.frame + slot_id * frames, readonly=True, order=self.granule_order
                )
                granted.append(gref)
                tx_grefs.append(gref)
            if self.granule <= dom.page_size:
                buffers = dom.alloc_pages(rx_ring.nr_ents)
            else:
                buffers = [dom.alloc_buffer(frames) for _ in range(rx_ring.nr_ents)]
            pages.extend(buffers)
            rx_grefs = []
            for page in buffers:
                gref = dom.grants.grant_access(backend, page.frame, order=self.granule_order)
                granted.append(gref)
                rx_grefs.append(gref)
            evtchn_tx = await dom.alloc_unbound(backend)
            channels.append(evtchn_tx)
            evtchn_rx = evtchn_tx
            if features.split_event_channels:
                evtchn_rx = await dom.alloc_unbound(backend)
                channels.append(evtchn_rx)
        except BaseException:
            for channel in channels:
                channel.close()
            self._end_grants(granted, pages)
            raise
        counters = self._queue_counters(index)
        return _Queue(
            index,
            TxCore(tx_ring, self.granule, nr_ids, counters),
            RxCore(
                rx_ring, [p.view[:granule] for p in buffers], rx_grefs, granule, index, counters
            ),
            arena,
            [tx_page, rx_page],
            buffers,
            tx_grefs,
            tx_gref,
            rx_gref,
            evtchn_tx,
            evtchn_rx,
        )

    async def _run_connection(
        self, conn: _Connection, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with conn.scope:
            async with trio.open_nursery() as nursery:
                for queue in conn.queues:
                    if queue.split:
                        nursery.start_soon(self._service, queue, queue.evtchn_tx, True, False)
                        nursery.start_soon(self._service, queue, queue.evtchn_rx, False, True)
                    else:
                        nursery.start_soon(self._service, queue, queue.evtchn_tx, True, True)
                task_status.started()

    async def _service(self, queue: _Queue, channel: EventChannel, tx: bool, rx: bool) -> None:
        """One event channel's handler: tx completions and/or rx work, then sleep."""
        try:
            while True:
                await channel.wait()
                if tx:
                    self._tx_gc(queue)
                if rx:
                    await self._rx_work(queue)
        except EventChannelClosed as exc:
            log.info("netfront.evtchn_closed", device=str(self.device), why=str(exc))
        except (RingError, NetfrontProtocolError) as exc:
            self._break_queue(queue, exc)

    def _break_queue(self, queue: _Queue, exc: Exception) -> None:
        # Linux netfront marks the device broken; traffic resumes after a reconnect.
        queue.broken = str(exc)
        queue.space.unpark_all()
        log.error("netfront.broken", device=str(self.device), queue=queue.index, error=str(exc))

    def _tx_gc(self, queue: _Queue) -> None:
        """xennet_tx_buf_gc: collect answered slots, wake senders.

        Unlike Linux netfront (which asks for an event at the very next answer), it asks
        for the next event only once every request now outstanding is answered, as virtio's
        delayed tx callback does: while traffic flows, `send` collects answers as it goes
        (`_reap`), so the backend does not notify every batch; a sender that waits for ring
        space asks for the next answer itself. Every answer is still collected within one
        event: the last outstanding one always notifies."""
        tx = queue.tx
        ring = tx.ring
        while True:
            tx.collect()  # the arena's grants stay for the connection: nothing to end
            outstanding = (ring.req_prod_pvt - ring.rsp_cons) & RING_IDX_MASK
            if not ring.final_check_for_responses(max(1, outstanding)):
                break
        queue.space.unpark_all()

    def _reap(self, queue: _Queue) -> None:
        """Collect tx answers already on the ring, without waiting for an event."""
        if queue.broken is not None:
            return
        try:
            if queue.tx.ring.unconsumed_responses():
                queue.tx.collect()
        except (RingError, NetfrontProtocolError) as exc:
            self._break_queue(queue, exc)

    def _wait_for_answers(self, queue: _Queue) -> bool:
        """Before a sender parks for ring space: ask for an event at the very next answer.
        True if answers are already there (collected; check the room again)."""
        try:
            if not queue.tx.ring.final_check_for_responses():
                return False
            queue.tx.collect()
        except (RingError, NetfrontProtocolError) as exc:
            self._break_queue(queue, exc)
        return True

    async def _rx_work(self, queue: _Queue) -> None:
        """xennet_poll: reassemble, hand frames on, refill the ring."""
        rx = queue.rx
        out = self._rx_send
        frames: list[RxFrame] = []
        while True:
            rx.take(frames.append)
            for frame in frames:
                sink = self._rx_sink
                if sink is not None and not self._rx_queued and sink(frame):
                    continue
                try:
                    out.send_nowait(frame)
                except trio.WouldBlock:
                    await out.send(frame)  # a slow reader stops the refill: backpressure
                self._rx_queued += 1
            if frames:
                await trio.lowlevel.checkpoint()  # once per batch: let readers run
            frames.clear()
            if rx.post():
                with suppress(EventChannelClosed):
                    queue.evtchn_rx.notify()
            if not rx.ring.final_check_for_responses():
                break

    def _post(
        self,
        conn: _Connection,
        queue: _Queue,
        view: memoryview,
        pieces: list[tuple[int, int, int]],
        gso: NetifGsoExtra | None,
        csum_blank: bool,
        data_validated: bool,
    ) -> None:
        if queue.broken is not None:
            queue.tx.counters.tx_dropped += 1
            return
        tx = queue.tx
        granule = tx.granule
        arena = queue.arena
        arena_view = arena.view
        tx_grefs = queue.tx_grefs
        ids = tx.alloc_ids(len(pieces))
        count = len(ids)
        position = 0
        k = 0
        while k < count:
            last = k
            if pieces[0][1] == 0:
                # Cut at granule boundaries from offset 0 (as `plan` does), pieces with
                # consecutive ids lie back to back in the arena: one copy and one `written`
                # per run of ids. Ids freed in order come back in order, so a frame is
                # usually a single run.
                while last + 1 < count and ids[last + 1] == ids[last] + 1:
                    last += 1
            start = ids[k] * granule + pieces[k][1]
            size = (last - k) * granule + pieces[last][2]
            arena_view[start : start + size] = view[position : position + size]
            arena.written(start, size)
            position += size
            k = last + 1
        grefs = [tx_grefs[slot_id] for slot_id in ids]
        tx.put_packet(
            ids, grefs, pieces, gso=gso, csum_blank=csum_blank, data_validated=data_validated
        )
        if not queue.unpushed:
            queue.unpushed = True
            conn.unpushed.append(queue)

    def _flush_conn(self, conn: _Connection) -> None:
        for queue in conn.unpushed:
            self._push_tx(queue)
        conn.unpushed.clear()

    def _push_tx(self, queue: _Queue) -> None:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY on the tx ring (a no-op with nothing new)."""
        queue.unpushed = False
        if queue.broken is None and queue.tx.push():
            with suppress(EventChannelClosed):
                queue.evtchn_tx.notify()

    def _check_offloads(
        self, features: BackendFeatures, length: int, gso: NetifGsoExtra | None, granule: int
    ) -> None:
        if gso is not None:
            offered = (
                features.gso_tcpv4
                if gso.gso_type == XEN_NETIF_GSO_TYPE_TCPV4
                else features.gso_tcpv6
            )
            if not offered:
                raise NetfrontError(f"the backend does not offer GSO type {gso.gso_type}")
        if length > granule and not features.sg:
            raise NetfrontError(
                f"a {length}-byte frame needs several slots; the backend has no feature-sg"
            )

    async def _usable(self) -> _Connection:
        while True:
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if self._closed:
                raise NetfrontError("netfront is closed")
            await self._changed.wait()

    def _set_changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _teardown(self, reason: str) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.dead = True
        conn.scope.cancel()
        for queue in conn.queues:
            self._release_queue(queue)
            queue.space.unpark_all()
        if conn.ctrl is not None:
            conn.ctrl.channel.close()
            self._end_grants([conn.ctrl.gref], [conn.ctrl.page])
        self._set_changed()
        log.info("netfront.teardown", device=str(self.device), reason=reason)

    def _release_queue(self, queue: _Queue) -> None:
        """Close the channels, end every grant, free the pages (later, if still mapped)."""
        self._reap(queue)  # answers not collected yet are not drops
        queue.evtchn_tx.close()
        queue.evtchn_rx.close()
        self._end_grants([queue.tx_ring_gref, queue.rx_ring_gref], queue.ring_pages)
        queue.tx.abandon()  # packets on the tx ring are dropped (counted)
        self._end_grants([*queue.tx_grefs, *queue.rx._grefs], [queue.arena, *queue.rx_pages])

    def _end_grants(self, grefs: list[int], pages: list[Page]) -> None:
        """End grants; free `pages` once every one of them has ended (maybe later)."""
        self._deferred.append(_Deferred(list(grefs), list(pages)))
        self._retry_deferred()

    def _retry_deferred(self) -> None:
        still: list[_Deferred] = []
        for item in self._deferred:
            left = []
            for gref in item.grefs:
                try:
                    self.dom.grants.end_access(gref)
                except GrantError as exc:
                    if exc.status == GNTST.GNTST_eagain:  # the backend still maps it
                        left.append(gref)
            item.grefs = left
            if left:
                still.append(item)
            elif item.pages:
                with suppress(HvError):
                    self.dom.free_pages(item.pages)
        self._deferred = still

    async def _watch_backend(self) -> None:
        """Notice the backend reaching Connected (the handshake table has no reaction to it)."""
        path = f"{self.device.backend}/state"
        async with self.xs.watch(path) as events:
            async for _event in events:
                conn = self._conn
                state = await read_state(self.xs, self.device.backend)
                fresh = conn is not None and conn is self._conn and not conn.backend_connected
                if fresh and state == Connected:
                    assert conn is not None
                    if not await self._granule_echoed(conn):
                        await self._fall_back_to_baseline(conn)
                        continue
                    conn.backend_connected = True
                    self._set_changed()

    async def _granule_echoed(self, conn: _Connection) -> bool:
        """A backend that accepted our granule echoes it; one that reached Connected without
        the echo ignored our key (it predates the extension; the `max-grant-granule-order`
        we read was a predecessor's), so our grants do not match what it expects."""
        if conn.granule == XEN_PAGE_SIZE:
            return True
        order = (conn.granule // XEN_PAGE_SIZE).bit_length() - 1
        raw = await self.xs.try_read(f"{self.device.backend}/{FRONTEND_KEY}")
        return raw is not None and raw.strip() == str(order).encode()

    async def _fall_back_to_baseline(self, conn: _Connection) -> None:
        """Close and reconnect with 4 KiB grants (for the rest of this attach)."""
        reason = (
            f"backend reached Connected without echoing {FRONTEND_KEY} = "
            f"{(conn.granule // XEN_PAGE_SIZE).bit_length() - 1}: reconnecting with 4 KiB grants"
        )
        log.error("netfront.granule_not_echoed", device=str(self.device), reason=reason)
        self.granule_fallback = reason
        with suppress(XsError):
            await self.xs.write(f"{self.device.frontend}/state", str(int(Closing)))

    async def _shutdown(self) -> None:
        """Leave the device like Linux netfront's remove: Closing, wait, Closed."""
        self._wanted = False
        xs, device = self.xs, self.device
        with trio.move_on_after(SHUTDOWN_TIMEOUT), suppress(XenpvError):
            if await xs.try_read(f"{device.frontend}/state") is not None:
                await xs.write(f"{device.frontend}/state", str(int(Closing)))
                async with xs.watch(f"{device.backend}/state") as events:
                    async for _event in events:
                        if await read_state(xs, device.backend) in (Closing, Closed, Unknown):
                            break
                self._teardown("frontend detached")
                if await xs.try_read(f"{device.frontend}/state") is not None:
                    await xs.write(f"{device.frontend}/state", str(int(Closed)))
                async with xs.watch(f"{device.backend}/state") as events:
                    async for _event in events:
                        self._retry_deferred()
                        if not self._deferred:
                            break
                        if await read_state(xs, device.backend) in (Closed, Unknown):
                            self._retry_deferred()
                            break
        self._teardown("frontend detached")
        self._retry_deferred()
        self._closed = True
        self._set_changed()
        self._rx_send.close()
