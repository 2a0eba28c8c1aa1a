"""One vif in the backend domain: the xenbus driver, its connection, and its data path.

`Vif` implements `xenpv.xenbus.handshake.HandshakeDriver` for the backend role:
- ADVERTISE / RESET: tear down whatever is left and return the feature keys (keys.py; a
  malformed `xenpv-*` key is refused as below);
- CONNECT: read and validate the frontend's keys, map each queue's tx and rx ring (one page
  each, attached at the shared `rsp_prod` and refused if `req_prod` is more than a ring ahead,
  as `xenvif_map_data_rings`), bind the event channel(s), attach the vif to the switch as
  port `vif<domid>.<devid>` ("carrier on") and start the queues. A refusal is Linux's
  `xenbus_dev_fatal`: the reason is written to `/local/domain/<be>/error/<backend path>/error`
  and the backend switches to Closing (the frontend then closes and may start over);
- CLOSE: tear the data path down.

Control ring (io/netif.h; `xenpv.abi.netif_ctrl`): `feature-ctrl-ring` = 1 is advertised; a
frontend that writes `ctrl-ring-ref` and `event-channel-ctrl` gets its page mapped at CONNECT
and its hash requests answered; once it set an algorithm, frames to the guest are steered to
the rx queue its hash and mapping table pick instead of the flow hash.

Grant granules (docs/granule-extension.md, docs/net.md "Grant granules"): ADVERTISE also writes
`max-grant-granule-order` (`max_granule_order`, else the toolstack's
`xenpv-max-grant-granule-order`, else 4); CONNECT accepts the frontend's `grant-granule-order`
(above the maximum this backend advertised, or junk: refused as above) and echoes it in the
backend directory with the switch to Connected. Rings stay one order-0 frame; a ring grant of
any other size is refused.
`granule_extension=False` makes a backend that predates the extension (no key written, the
frontend's key ignored: 4 KiB grants), for interop tests. Unlike a genuinely old backend it
also removes a `max-grant-granule-order` a predecessor left in the backend directory: an old
backend started in place of a new one would leave it, and a frontend would then use granules
the backend does not accept (a gap in the spec: see docs/net.md, "Grant granules").

A lost link to the frontend (its process died, or the domain link failed: docs/faults.md,
"Link faults") ends the data path as a dead frontend does; if the backend is still Connected
then, it does what a restarted backend does (`backend_start`): tear down and write Closed.
The frontend closes, starts over at Initialising, and the handshake runs again; a frontend
that really died starts at Initialising anyway. A CONNECT whose mappings fail because the
frontend is unreachable waits `UNREACHABLE_BACKOFF` before refusing, so a partition does not
spin the handshake.

A fatal frontend error on any queue (`xenvif_fatal_tx_err`: bad slot layout, broken ring...)
disables the vif: every queue stops, the port leaves the switch (carrier off), the rings stay
as they are and the xenbus state stays Connected until the frontend reconnects. Nothing the
frontend does reaches another vif: each vif has its own tasks, rings, backlog and error
handling, and the switch isolates ports with per-port tail-drop queues.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import structlog
import trio

from backends.netback.keys import (
    FRONTEND_FLAGS,
    QUEUE_KEYS,
    FrontendConfig,
    NetbackConfigError,
    advertise_keys,
    max_granule_order,
    max_queues,
    parse_frontend,
    parse_num_queues,
    queue_dirs,
)
from backends.netback.queue import NetbackQueue
from backends.netback.rx import RxCore, RxFatal
from backends.netback.tx import FATAL_SKB_SLOTS_DEFAULT, TxCore, TxFatal
from backends.switch import Frame, LiveSwitch, SwitchError, SwitchPort
from xenpv import granule
from xenpv.abi.errors import RingError
from xenpv.abi.netif import NETIF_RX_RING, NETIF_TX_RING
from xenpv.abi.netif_ctrl import (
    CTRL_RING_REF,
    EVENT_CHANNEL_CTRL,
    NETIF_CTRL_RING,
    HashSettings,
    decode_request,
    encode_response,
)
from xenpv.abi.ring import BackRing
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.ethernet import flow_hash
from xenpv.hv import (
    XEN_PAGE_SIZE,
    Domain,
    EventChannel,
    EventChannelClosed,
    GrantMapping,
    HvError,
    PeerGone,
)
from xenpv.hv.copyengine import CopyDirection, CopyOp
from xenpv.hv.link import Link
from xenpv.metrics.counters import NetbackStats
from xenpv.metrics.registry import REGISTRY
from xenpv.xenbus import core as xenbus
from xenpv.xenbus.core import Action, Closed, Closing, Connected, DeviceId, InitWait
from xenpv.xenbus.handshake import KeyValues, publish, read_keys, read_state, run_handshake
from xenpv.xenbus.keys import (
    XENPV_MAX_GRANULE_ORDER,
    XENPV_MAX_QUEUES,
    KeyValueError,
    parse_uint,
)
from xenpv.xenstore.client import XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

HANDSHAKE_RETRY = 1.0  # seconds before retrying a handshake xenstore refused
UNREACHABLE_BACKOFF = 0.25  # seconds before refusing a CONNECT the frontend's link failed


@dataclass(slots=True)
class VifStats:
    """Counters of one vif, summed over its queues (tx = from the guest, rx = to it): the
    queues' `NetbackStats` (docs/metrics.md), plus the switch's egress drops for the vif in
    `rx_dropped_no_buffers`, and the last tx warnings."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_slots: int = 0
    tx_errors: int = 0  # packets answered NETIF_RSP_ERROR
    tx_malformed: int = 0
    tx_too_many_slots: int = 0
    tx_copy_errors: int = 0
    tx_dropped_offload: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_slots: int = 0
    rx_dropped_no_buffers: int = 0  # the guest posted too few buffers: switch egress drops
    rx_dropped_too_big: int = 0
    rx_dropped_offload: int = 0
    rx_copy_errors: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Connection:
    config: FrontendConfig
    mappings: list[GrantMapping]
    channels: list[EventChannel]
    queues: list[NetbackQueue]
    port: SwitchPort[VirtioNetHdr] | None = None
    switch_drops: int = 0  # the port's egress tail drops, saved when it leaves the switch
    held: int = 0  # frames the switch reader took from the port and has not enqueued yet
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    # the control ring, if the frontend set one up: its ring, port, and the hash it sets
    ctrl: tuple[BackRing, EventChannel] | None = None
    hash: HashSettings | None = None


class Vif:
    """A vif's backend. `await Vif(...).run()` is `serve()`; tests use the object directly."""

    role: xenbus.Role = "backend"

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        switch: LiveSwitch[VirtioNetHdr],
        *,
        max_queues: int | None = None,
        fatal_skb_slots: int = FATAL_SKB_SLOTS_DEFAULT,
        max_granule_order: int | None = None,
        granule_extension: bool = True,
    ) -> None:
        if device.cls != "vif":
            raise ValueError(f"not a vif: {device}")
        self.dom = dom
        self.xs = xs
        self.device = device
        self.switch = switch
        self.port_name = f"vif{device.frontend_domid}.{device.devid}"
        self.max_queues = max_queues
        self.fatal_skb_slots = fatal_skb_slots
        self.max_granule_order = max_granule_order  # None: the toolstack key, else 4
        self.granule_extension = granule_extension
        self.granule_order = 0  # the accepted grant-granule-order of the current connection
        self._advertised_granule: tuple[bool, int | None] = (False, None)
        self.granule = XEN_PAGE_SIZE  # the negotiated grant size (4 KiB baseline)
        self.fatal: str | None = None  # why the data path was disabled, until reconnect
        self.connections = 0  # successful CONNECTs so far
        self.mcast: set[bytes] = set()
        self._conn: _Connection | None = None
        self._conn_link: Link | None = None  # the domain link the connection was set up on
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._xenbus_lock = trio.Lock()  # our xenbus reactions and a lost link's close
        # Per queue index, for the vif's life (every connection counts into them).
        self._counters: list[NetbackStats] = []
        self._retired_switch_drops = 0  # the switch's drops of earlier connections
        self._retired_warnings: list[str] = []
        self.log = log.bind(device=str(device), vif=self.port_name)

    # --- observing -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Rings mapped and the data path running (carrier on)."""
        return self._conn is not None and self._conn.port is not None

    def stats(self) -> VifStats:
        out = VifStats(warnings=list(self._retired_warnings))
        for counters in self._counters:
            for name in NetbackStats.__slots__:
                setattr(out, name, getattr(out, name) + getattr(counters, name))
        out.rx_dropped_no_buffers += self._retired_switch_drops
        if self._conn is not None:
            for queue in self._conn.queues:
                out.warnings.extend(queue.tx.warnings)
            out.rx_dropped_no_buffers += self._switch_drops(self._conn)
        return out

    def _queue_counters(self, index: int) -> NetbackStats:
        """Queue `index`'s record, registered when a connection first has that queue."""
        while len(self._counters) <= index:
            device = self.device
            key = (self.dom.domid, device.frontend_domid, device.devid, len(self._counters))
            self._counters.append(REGISTRY.register_queue(REGISTRY.netback, key, NetbackStats()))
        return self._counters[index]

    def _switch_drops(self, conn: _Connection) -> int:
        if conn.port is None:
            return conn.switch_drops
        with suppress(SwitchError):
            return self.switch.core.counters(self.port_name).tx_dropped
        return 0

    def _leave_switch(self, conn: _Connection) -> None:
        """Carrier off: detach the port, keeping its drop count."""
        if conn.port is not None:
            conn.switch_drops = self._switch_drops(conn)
            conn.port = None
            with suppress(SwitchError):
                self.switch.detach(self.port_name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[Vif], bool]) -> None:
        """Return once `predicate(self)` holds (re-checked on every state or counter change)."""
        while not predicate(self):
            await self._changed.wait()

    # --- life ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the vif until its backend directory is removed (cancel to stop early)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._handshake)
                await self._wait_removed()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._disconnect()
            self._nursery = None

    async def _handshake(self) -> None:
        """run_handshake, restarted if xenstore refuses us something (a frontend can make its
        own nodes unreadable to its backend): that vif gets no service, nothing else breaks."""
        while True:
            try:
                await run_handshake(self.xs, self)
            except XsError as exc:
                self.log.warning("netback.xenstore_refused", error=str(exc))
                await trio.sleep(HANDSHAKE_RETRY)

    async def _wait_removed(self) -> None:
        backend = self.device.backend
        async with self.xs.watch(backend) as events:
            async for path, _token in events:
                # Only the directory's own event can mean it went (a removal fires the
                # watch with its path); the keys this backend writes below it cannot.
                if path == backend and await self.xs.try_read(backend) is None:
                    self.log.info("netback.device_removed")
                    return

    async def perform(self, action: Action) -> KeyValues | None:
        async with self._xenbus_lock:
            return await self._perform(action)

    async def _perform(self, action: Action) -> KeyValues | None:
        if action in (Action.ADVERTISE, Action.RESET):
            await self._disconnect()
            stale = [granule.FRONTEND_KEY]  # the last connection's echo no longer holds
            if not self.granule_extension:  # nor a predecessor's advertisement
                stale.append(granule.BACKEND_MAX_KEY)
            for name in stale:
                with suppress(XsError):
                    await self.xs.rm(f"{self.device.backend}/{name}")
            try:
                self._advertised_granule = (True, await self._max_granule_order())
                return advertise_keys(await self._max_queues(), self._advertised_granule[1])
            except NetbackConfigError as exc:  # the toolstack must fix its keys
                await self._refuse(f"bad toolstack configuration: {exc}")
                return None
        if action is Action.CLOSE:
            await self._disconnect()
            return {}
        if action is Action.CONNECT:
            await self._disconnect()
            try:
                await self._connect()
            except NetbackConfigError as exc:
                await self._refuse(str(exc))
                return None
            except XsError as exc:  # e.g. a frontend that made its keys unreadable to us
                await self._refuse(f"reading the frontend's keys: {exc}")
                return None
            if not self.granule_extension:
                return {}
            return {granule.FRONTEND_KEY: self.granule_order}  # the echo: what was agreed
        return {}

    async def _accepted_granule_max(self) -> int | None:
        """The maximum checked at CONNECT: what this backend advertised (the toolstack key may
        have changed since; the frontend chose against the advertised value)."""
        advertised, value = self._advertised_granule
        return value if advertised else await self._max_granule_order()

    async def _max_granule_order(self) -> int | None:
        """What to advertise as max-grant-granule-order (None: the extension is off)."""
        if not self.granule_extension:
            return None
        if self.max_granule_order is not None:
            return max(0, min(self.max_granule_order, granule.MAX_GRANULE_ORDER))
        return max_granule_order(
            await self.xs.try_read(f"{self.device.backend}/{XENPV_MAX_GRANULE_ORDER}")
        )

    async def _max_queues(self) -> int:
        if self.max_queues is not None:
            return self.max_queues
        return max_queues(await self.xs.try_read(f"{self.device.backend}/{XENPV_MAX_QUEUES}"))

    async def _refuse(self, reason: str) -> None:
        """xenbus_dev_fatal: record the reason, switch to Closing."""
        self.log.warning("netback.connect_refused", reason=reason)
        domain = xenbus.domain_path(self.device.backend_domid)
        relative = self.device.backend.removeprefix(domain + "/")
        with suppress(XsError):
            await self.xs.write(f"{domain}/error/{relative}/error", reason)
        await publish(self.xs, self.device.backend, {}, state=Closing)

    # --- connecting ------------------------------------------------------------------------

    async def _read_config(self) -> FrontendConfig:
        frontend = self.device.frontend
        flags = await read_keys(self.xs, frontend, list(FRONTEND_FLAGS))
        num_queues = parse_num_queues(flags["multi-queue-num-queues"], await self._max_queues())
        dirs = queue_dirs(frontend, num_queues)
        queues = [await read_keys(self.xs, where, list(QUEUE_KEYS)) for where in dirs]
        return parse_frontend(
            flags, list(queues), dirs, max_granule_order=await self._accepted_granule_max()
        )

    async def _connect(self) -> None:
        config = await self._read_config()
        fe = self.device.frontend_domid
        mappings: list[GrantMapping] = []
        channels: list[EventChannel] = []
        rings: list[tuple[BackRing, BackRing, EventChannel, EventChannel]] = []
        try:
            for q in config.queues:
                tx_map = await self.dom.map_grants(fe, [q.tx_ring_ref])
                mappings.append(tx_map)
                rx_map = await self.dom.map_grants(fe, [q.rx_ring_ref])
                mappings.append(rx_map)
                tx_ring = BackRing(tx_map, NETIF_TX_RING, attach=True)
                for what, mapping in (("tx", tx_map), ("rx", rx_map)):
                    if len(mapping.view) != XEN_PAGE_SIZE:  # rings stay order 0
                        raise NetbackConfigError(
                            f"{what}-ring-ref grants {len(mapping.view)} bytes, not one "
                            f"{XEN_PAGE_SIZE}-byte frame (rings are granted with order 0)"
                        )
                rx_ring = BackRing(rx_map, NETIF_RX_RING, attach=True)
                tx_channel = await self.dom.bind_interdomain(fe, q.evtchn_tx)
                channels.append(tx_channel)
                rx_channel = tx_channel
                if q.split:
                    rx_channel = await self.dom.bind_interdomain(fe, q.evtchn_rx)
                    channels.append(rx_channel)
                rings.append((tx_ring, rx_ring, tx_channel, rx_channel))
            ctrl = await self._map_ctrl_ring(mappings, channels)
        except (HvError, RingError) as exc:
            await _release(mappings, channels)
            if isinstance(exc, PeerGone):
                await trio.sleep(UNREACHABLE_BACKOFF)
            raise NetbackConfigError(f"mapping the rings: {exc}") from None
        except NetbackConfigError:
            await _release(mappings, channels)
            raise
        self.granule_order = config.granule_order
        self.granule = config.granule
        try:
            port: SwitchPort[VirtioNetHdr] = self.switch.attach(self.port_name)
        except SwitchError as exc:
            await _release(mappings, channels)
            raise NetbackConfigError(str(exc)) from None
        queues = [
            NetbackQueue(
                index=n,
                dom=self.dom,
                frontend=fe,
                tx=TxCore(
                    tx_ring,
                    granule=self.granule,
                    fatal_skb_slots=self.fatal_skb_slots,
                    mcast=self.mcast,
                    counters=self._queue_counters(n),
                ),
                rx=RxCore(
                    rx_ring,
                    can_sg=config.can_sg,
                    granule=self.granule,
                    counters=self._queue_counters(n),
                ),
                tx_channel=tx_channel,
                rx_channel=rx_channel,
                port=port,
                offload=config.offload,
                rx_notify=config.rx_notify,
                on_progress=self._notify,
            )
            for n, (tx_ring, rx_ring, tx_channel, rx_channel) in enumerate(rings)
        ]
        conn = _Connection(config, mappings, channels, queues, port, ctrl=ctrl)
        if ctrl is not None:
            conn.hash = HashSettings(num_queues=len(queues))
        port.set_direct(functools.partial(self._deliver_direct, conn))
        self._conn = conn
        self._conn_link = self.dom.link_to(fe)
        self.fatal = None
        self.connections += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._run_datapath, conn)
        self.log.info(
            "netback.connected",
            queues=len(queues),
            split=[q.split for q in config.queues],
            sg=config.can_sg,
            offload=str(config.offload),
            granule=self.granule,
        )
        self._notify()

    async def _run_datapath(self, conn: _Connection) -> None:
        reason: str | None = None
        fatal = False
        try:
            with conn.scope:
                try:
                    async with trio.open_nursery() as nursery:
                        for queue in conn.queues:
                            nursery.start_soon(queue.run)
                        nursery.start_soon(self._switch_reader, conn)
                        if conn.ctrl is not None:
                            nursery.start_soon(self._serve_ctrl, conn)
                except* (TxFatal, RxFatal) as group:
                    reason, fatal = str(_leaf(group)), True
                except* (EventChannelClosed, HvError) as group:
                    reason = f"frontend gone: {_leaf(group)}"
                except* Exception as group:  # a bug here must not take other vifs down
                    self.log.error("netback.datapath_crashed", exc_info=group)
                    reason, fatal = f"internal error: {_leaf(group)!r}", True
        finally:
            conn.done.set()
        if reason is not None:
            self._carrier_off(conn, reason, fatal=fatal)
            if not fatal and self._nursery is not None:
                self._nursery.start_soon(self._link_lost, conn)

    async def _link_lost(self, conn: _Connection) -> None:
        """The data path ended because the frontend went away: if only the link to it died
        (the frontend may well be alive), close as a restarted backend does, so that the
        frontend starts over (see the module docstring). A CONNECT whose Connected is not
        published yet (InitWait) is waited for: Closed written first would be overwritten."""
        try:
            async with self.xs.watch(f"{self.device.backend}/state") as events:
                async for _event in events:
                    async with self._xenbus_lock:
                        link = self._conn_link
                        if conn is not self._conn or (link is not None and link.dead is None):
                            return  # reacted to, or the frontend closed its ports on a live link
                        state = await read_state(self.xs, self.device.backend)
                        if state == InitWait:
                            continue
                        if state != Connected:
                            return
                        await self._disconnect()
                        self.log.info("netback.link_lost: closing so the frontend reconnects")
                        await publish(self.xs, self.device.backend, {}, state=Closed)
                        return
        except (XsError, XenstoreConnectionError) as exc:
            self.log.warning("netback.xenstore_refused", error=str(exc))

    async def _switch_reader(self, conn: _Connection) -> None:
        """Spread frames the switch sends to this vif over its queues (by flow hash)."""
        port = conn.port
        assert port is not None
        queues = conn.queues
        count = len(queues)
        try:
            while True:
                batch = await port.receive_batch(64)
                conn.held += len(batch)
                for frame, meta in batch:
                    queue = queues[_rx_queue(conn, frame)] if count > 1 else queues[0]
                    await queue.wait_room()  # netif_tx_stop_queue: the switch queues, then drops
                    queue.enqueue(frame, meta)
                    conn.held -= 1
                self._notify()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return

    def _deliver_direct(self, conn: _Connection, frame: Frame, meta: VirtioNetHdr | None) -> bool:
        """The switch's synchronous path into this vif (`SwitchPort.set_direct`): a frame goes
        straight into its queue's backlog, in the sender's task, unless that backlog is full
        or the reader still holds earlier frames (then it takes the reader's path, in order)."""
        if conn.held:
            return False
        queues = conn.queues
        queue = queues[_rx_queue(conn, frame)] if len(queues) > 1 else queues[0]
        if not queue.has_room():
            return False
        queue.enqueue(frame, meta)
        self._notify()
        return True

    async def _map_ctrl_ring(
        self, mappings: list[GrantMapping], channels: list[EventChannel]
    ) -> tuple[BackRing, EventChannel] | None:
        """Map the frontend's control ring, if it set one up (Linux `connect_ctrl_ring`: both
        keys or neither; junk is fatal). What is mapped goes into `mappings`/`channels`."""
        fe = self.device.frontend_domid
        keys = await read_keys(self.xs, self.device.frontend, [CTRL_RING_REF, EVENT_CHANNEL_CTRL])
        if keys[CTRL_RING_REF] is None or keys[EVENT_CHANNEL_CTRL] is None:
            return None
        try:
            gref = parse_uint(keys[CTRL_RING_REF], CTRL_RING_REF)
            port = parse_uint(keys[EVENT_CHANNEL_CTRL], EVENT_CHANNEL_CTRL)
        except KeyValueError as exc:
            raise NetbackConfigError(str(exc)) from None
        mapping = await self.dom.map_grants(fe, [gref])
        mappings.append(mapping)
        if len(mapping.view) != XEN_PAGE_SIZE:
            raise NetbackConfigError(f"{CTRL_RING_REF} grants {len(mapping.view)} bytes, not 4096")
        ring = BackRing(mapping, NETIF_CTRL_RING, attach=True)
        channel = await self.dom.bind_interdomain(fe, port)
        channels.append(channel)
        return ring, channel

    async def _serve_ctrl(self, conn: _Connection) -> None:
        """Answer control requests in order (Linux `xenvif_ctrl_irq_fn`); a key or mapping
        page is copied from the frontend's grant (GNTTABOP_copy, as netback does)."""
        try:
            await self._serve_ctrl_ring(conn)
        except RingError as exc:  # a broken control ring stops only the control ring
            self.log.warning("netback.ctrl_ring_broken", error=str(exc))

    async def _serve_ctrl_ring(self, conn: _Connection) -> None:
        assert conn.ctrl is not None and conn.hash is not None
        ring, channel = conn.ctrl
        fe = self.device.frontend_domid
        while True:
            while (raw := ring.take_request()) is not None:
                request = decode_request(raw)
                granted = None
                needed = conn.hash.grant_needed(request)
                if needed is not None:
                    buffer = bytearray(needed[1])
                    op = CopyOp(
                        CopyDirection.FROM_REMOTE, fe, needed[0], 0, needed[1], memoryview(buffer)
                    )
                    (status,) = await self.dom.grant_copy([op])
                    granted = bytes(buffer) if status == 0 else None
                response = conn.hash.handle(request, granted)
                self.log.info(
                    "netback.ctrl", type=request.type, status=response.status, data=response.data
                )
                ring.put_response(encode_response(response))
                if ring.push_responses():
                    channel.notify()
            if ring.final_check_for_requests():
                continue
            await channel.wait()

    def _carrier_off(self, conn: _Connection, reason: str, *, fatal: bool) -> None:
        """xenvif_fatal_tx_err / carrier off: the data path stops, the vif leaves the switch."""
        if conn is not self._conn:
            return  # already disconnected
        if fatal:
            self.fatal = reason
            self.log.error("netback.fatal", reason=reason)
        else:
            self.log.info("netback.carrier_off", reason=reason)
        self._leave_switch(conn)
        self._notify()

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.scope.cancel()
        await conn.done.wait()
        self._leave_switch(conn)
        self._retire(conn)
        await _release(conn.mappings, conn.channels)
        self.mcast.clear()  # xenvif_disconnect_data frees the multicast list
        self.fatal = None
        self.log.info("netback.disconnected")
        self._notify()

    def _retire(self, conn: _Connection) -> None:
        self._retired_switch_drops += conn.switch_drops
        for queue in conn.queues:
            self._retired_warnings.extend(queue.tx.warnings)
        del self._retired_warnings[:-16]


def _rx_queue(conn: _Connection, frame: Frame) -> int:
    """The queue a frame to the guest goes to: by the control ring's hash settings if the
    frontend set an algorithm (Linux `xenvif_select_queue`), else by flow hash."""
    if conn.hash is not None and (queue := conn.hash.steer(frame)) is not None:
        return queue
    return flow_hash(frame) % len(conn.queues)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _release(mappings: list[GrantMapping], channels: list[EventChannel]) -> None:
    for channel in channels:
        with suppress(EventChannelClosed):
            channel.close()
    for mapping in mappings:
        with suppress(HvError):
            await mapping.unmap()


async def serve(
    dom: Domain, xs: XenstoreClient, device: DeviceId, switch: LiveSwitch[VirtioNetHdr]
) -> None:
    """Serve one vif for its whole life (handshake, reconnects, backend restarts); return when
    the device directories are removed; cancel to stop. Frontend misbehaviour never raises."""
    await Vif(dom, xs, device, switch).run()
