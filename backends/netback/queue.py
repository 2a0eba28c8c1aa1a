"""One netback queue at the trio edge: event channels, grant copies, the switch.

A queue owns a tx ring and an rx ring (each a single 4 KiB page the frontend granted) and one
or two event channels (`feature-split-event-channels`). Tasks:
- event dispatch: each event on the tx (rx) channel rings the tx (rx) doorbell; a shared
  channel rings both;
- tx: drain the ring with `TxCore` (budgeted batches), grant-copy every accepted packet of the
  batch in one `grant_copy` call, answer, notify once per batch, then hand each frame with its
  `VirtioNetHdr` metadata to the vif's switch port;
- rx: frames the vif's switch port receives are spread over queues by flow hash and kept in a
  per-queue backlog bounded like Linux's `rx_queue_max` (half a ring of pages: 512 KiB). A
  full backlog stops the vif's switch reader, as netback stops the netdev queue
  (`netif_tx_stop_queue`): frames then wait in the switch's egress queue for this port, which
  tail-drops and counts like a full qdisc, until the guest posts buffers again. Whenever
  enough rx requests are posted, a batch of frames is placed, copied in one `grant_copy`,
  answered and notified once. When they are not, the queue sets `req_event` to
  `req_cons + needed` (as `xenvif_rx_ring_slots_available` does) and waits for the frontend's
  event; a frontend without `feature-rx-notify` is polled every 30 ms (Linux's drain timeout
  for such frontends).
Frontend faults surface as `TxFatal` / `RxFatal`; a vanished peer as `PeerGone` /
`EventChannelClosed`. The vif stops the whole data path on any of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from backends.netback.offload import OffloadError, RxOffload, rx_metadata, tx_metadata
from backends.netback.rx import RxCore, RxFrame, RxPlacement
from backends.netback.tx import TxCore, TxFatal, TxPacket
from backends.switch import Frame, SwitchError, SwitchPort
from xenpv.abi.errors import RingError
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.hv import CopyDirection, CopyGroup, Domain, EventChannel

TX_BUDGET: Final = 64  # packets per tx round (Linux: NAPI weight 64)
RX_BATCH: Final = 64  # frames per rx round
RX_QUEUE_MAX: Final = 128 * 4096  # XENVIF_RX_QUEUE_BYTES: half an rx ring of pages
RX_POLL_NO_NOTIFY: Final = 0.03  # seconds, netback's drain timeout without feature-rx-notify
_FROM_REMOTE: Final = int(CopyDirection.FROM_REMOTE)
_TO_REMOTE: Final = int(CopyDirection.TO_REMOTE)


class Doorbell:
    """A sticky wake-up flag: `ring()` never blocks; `wait()` returns once per ring burst."""

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event = trio.Event()

    def ring(self) -> None:
        self._flag = True
        self._event.set()

    async def wait(self) -> None:
        while not self._flag:
            await self._event.wait()
        self._flag = False
        self._event = trio.Event()


class NetbackQueue:
    """The data path of one queue; `run()` until cancelled or a fault is raised."""

    def __init__(
        self,
        *,
        index: int,
        dom: Domain,
        frontend: int,
        tx: TxCore,
        rx: RxCore,
        tx_channel: EventChannel,
        rx_channel: EventChannel,
        port: SwitchPort[VirtioNetHdr],
        offload: RxOffload,
        rx_notify: bool,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.index = index
        self.dom = dom
        self.frontend = frontend
        self.tx = tx
        self.rx = rx
        self.tx_channel = tx_channel
        self.rx_channel = rx_channel
        self.port = port
        self.offload = offload
        self.rx_notify = rx_notify
        self.on_progress = on_progress
        self.tx_bell = Doorbell()
        self.rx_bell = Doorbell()
        self.backlog: deque[RxFrame] = deque()
        self.backlog_bytes = 0
        self._room = trio.Event()  # set while the backlog has room
        self._room.set()

    # --- rx backlog (called by the vif's switch reader) ------------------------------------

    def enqueue(self, frame: Frame, meta: VirtioNetHdr | None) -> None:
        counters = self.rx.counters
        try:
            data, flags, gso = rx_metadata(frame, meta, self.offload)
        except OffloadError:
            counters.rx_dropped_offload += 1
            return
        item = RxFrame(data, flags, gso)
        if not self.rx.fits_ever(item):
            counters.rx_dropped_too_big += 1
            return
        if self.backlog_bytes >= RX_QUEUE_MAX:  # callers wait_room() first; count if not
            counters.rx_dropped_no_buffers += 1
            return
        self.backlog.append(item)
        self.backlog_bytes += len(data)
        if self.backlog_bytes >= RX_QUEUE_MAX:
            self._room = trio.Event()
        self.rx_bell.ring()

    def has_room(self) -> bool:
        """The backlog is below `RX_QUEUE_MAX` (the netdev queue is awake)."""
        return self.backlog_bytes < RX_QUEUE_MAX

    async def wait_room(self) -> None:
        """Return once the backlog is below `RX_QUEUE_MAX` (the netdev queue is awake)."""
        await self._room.wait()

    # --- tasks -----------------------------------------------------------------------------

    async def run(self) -> None:
        # Requests may already be waiting (netfront posts rx buffers as it connects); the tx
        # loop's first pass looks without waiting.
        self.rx_bell.ring()
        async with trio.open_nursery() as nursery:
            if self.tx_channel is self.rx_channel:
                nursery.start_soon(self._dispatch, self.tx_channel, (self.tx_bell, self.rx_bell))
                nursery.start_soon(self._tx_loop, self.tx_bell.wait)
            else:
                # Split channels: the tx loop waits on its own channel; no dispatcher task in
                # between, which would cost a task switch (~20 µs) per tx event.
                nursery.start_soon(self._dispatch, self.rx_channel, (self.rx_bell,))
                nursery.start_soon(self._tx_loop, self.tx_channel.wait)
            nursery.start_soon(self._rx_loop)

    async def _dispatch(self, channel: EventChannel, bells: tuple[Doorbell, ...]) -> None:
        while True:
            await channel.wait()
            for bell in bells:
                bell.ring()

    async def _tx_loop(self, wait: Callable[[], Awaitable[None]]) -> None:
        """Serve the tx ring each time `wait()` returns (an event, or the bell the event
        dispatcher rings); the first pass runs at once (requests may be waiting)."""
        tx = self.tx
        first = True
        while True:
            if not first:
                await wait()
            first = False
            while True:
                packets = tx.take(TX_BUDGET)
                if packets:
                    await self._copy_tx(packets)
                # A grant copy on the shared-memory transport never blocks: yield anyway, so
                # a frontend that keeps its ring full cannot starve the other vifs.
                await trio.lowlevel.checkpoint()
                if tx.push():
                    self.tx_channel.notify()
                self.on_progress()
                if len(packets) == TX_BUDGET:
                    continue
                try:
                    if not tx.ring.final_check_for_requests():
                        break
                except RingError as exc:
                    raise TxFatal(f"Impossible number of requests: {exc}") from None

    async def _copy_tx(self, packets: list[TxPacket]) -> None:
        groups: list[CopyGroup] = []
        frames: list[bytearray] = []
        from_remote = _FROM_REMOTE
        for packet in packets:
            frame = bytearray(packet.size)
            frames.append(frame)
            groups.append(
                (
                    memoryview(frame),
                    [(from_remote, s.gref, s.offset, s.length, s.at) for s in packet.segments],
                )
            )
        # A frame's slots usually come from one contiguous guest buffer: one copy per run.
        statuses = await self.dom.grant_copy_runs(self.frontend, groups)
        position = 0
        deliver: list[tuple[bytearray, TxPacket]] = []
        for packet, frame in zip(packets, frames, strict=True):
            count = len(packet.segments)
            ok = not any(statuses[position : position + count])
            position += count
            self.tx.complete(packet, ok)
            if ok:
                deliver.append((frame, packet))
        for frame, packet in deliver:
            try:
                meta = tx_metadata(frame, packet.flags, packet.gso)
            except OffloadError:
                self.tx.counters.tx_dropped_offload += 1  # "Can't setup checksum in net_tx_action"
                continue
            try:
                self.port.send(frame, meta)  # no copy: nothing writes the frame after this
            except SwitchError:
                return  # carrier off: the vif is going down

    async def _rx_loop(self) -> None:
        rx = self.rx
        backlog = self.backlog
        to_remote = _TO_REMOTE
        frontend = self.frontend
        while True:
            if not backlog:
                await self.rx_bell.wait()
                continue
            placements: list[RxPlacement] = []
            groups: list[CopyGroup] = []
            available = rx.available()
            while backlog and len(placements) < RX_BATCH:
                needed = rx.slots_needed(backlog[0])
                if available < needed:
                    break
                item = backlog.popleft()
                self.backlog_bytes -= len(item.data)
                if self.backlog_bytes < RX_QUEUE_MAX:
                    self._room.set()
                available -= needed
                placement = rx.place(item)
                placements.append(placement)
                groups.append(
                    (
                        memoryview(item.data),
                        [(to_remote, s.gref, 0, s.length, s.at) for s in placement.segments],
                    )
                )
            if placements:
                statuses = await self.dom.grant_copy_runs(frontend, groups)
                position = 0
                for placement in placements:
                    count = len(placement.segments)
                    rx.complete(placement, statuses[position : position + count])
                    position += count
                if rx.push():
                    self.rx_channel.notify()
                self.on_progress()
                await trio.lowlevel.checkpoint()  # fairness, as in the tx loop
                continue
            # Not enough buffers for the head frame: ask to be woken when there are.
            needed = rx.slots_needed(backlog[0])
            rx.ring.set_request_event(needed)
            if rx.available() >= needed:
                continue
            if self.rx_notify:
                await self.rx_bell.wait()
            else:
                with trio.move_on_after(RX_POLL_NO_NOTIFY):
                    await self.rx_bell.wait()
