"""netfront against a stand-in backend (real xenstored, two domains, both transports).

`StubBackend` is the smallest netback that speaks the protocol: it advertises features,
maps the rings, binds the event channels, grant-copies tx packets out of the guest and
rx frames into its posted buffers (4 KiB per slot, more_data chains, GSO extras). The real
netback is tested end to end in test_net_integrity.py; this file pins netfront's side.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from frontends.netfront import Netfront, NetfrontError, RxFrame, attach
from tests.integration.blk_env import pair
from tests.integration.conftest import Xenstored
from xenpv.abi.netif import (
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NetifGsoExtra,
    NetifRxResponse,
    NetifTxResponse,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    decode_rx_request,
    encode_extra,
    encode_rx_response,
    encode_tx_response,
    parse_tx_packet,
)
from xenpv.abi.ring import BackRing, shared_indexes
from xenpv.hv import (
    XEN_PAGE_SIZE,
    CopyDirection,
    CopyOp,
    Domain,
    EventChannel,
    EventChannelClosed,
    GrantMapping,
    PeerGone,
)
from xenpv.toolstack.devices import create_vif
from xenpv.xenbus.core import Action, Connected, DeviceId, Initialising, Role
from xenpv.xenbus.handshake import KeyValues, read_keys, read_state, run_handshake
from xenpv.xenstore.client import XenstoreClient

MAC = "00:16:3e:00:00:01"


@dataclass(eq=False)
class StubQueue:
    tx: BackRing
    rx: BackRing
    maps: list[GrantMapping]
    evtchn_tx: EventChannel
    evtchn_rx: EventChannel
    rx_space: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    pending: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.echo_send, self.echo_recv = trio.open_memory_channel[Received](100000)

    def split_rx(self) -> bool:
        return self.evtchn_rx is not self.evtchn_tx


@dataclass
class Received:
    frame: bytes
    gso: NetifGsoExtra | None
    flags: int
    queue: int


class StubBackend:
    role: Role = "backend"

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        nursery: trio.Nursery,
        *,
        split: bool = True,
        max_queues: int = 1,
        echo: bool = True,
    ) -> None:
        self.dom, self.xs, self.device, self.nursery = dom, xs, device, nursery
        self.split, self.max_queues, self.echo = split, max_queues, echo
        self.queues: list[StubQueue] = []
        self.scope: trio.CancelScope | None = None
        self.received_send, self.received = trio.open_memory_channel[Received](100000)
        self.connects = 0
        self.hold_tx = False  # True: take tx requests but never answer them
        self.took = trio.lowlevel.ParkingLot()  # unparked whenever tx requests were taken
        self.bad_tx_id = False  # hostile: answer tx requests with ids that are not in flight
        self.rx_copy = True  # False: a backend netfront must refuse (no rx-copy support)

    async def perform(self, action: Action) -> KeyValues | None:
        if action in (Action.ADVERTISE, Action.RESET):
            await self.close()
            return {
                "feature-sg": 1,
                "feature-gso-tcpv4": 1,
                "feature-gso-tcpv6": 1,
                "feature-rx-copy": int(self.rx_copy),
                "feature-ipv6-csum-offload": 1,
                "feature-split-event-channels": int(self.split),
                "multi-queue-max-queues": self.max_queues,
            }
        if action is Action.CONNECT:
            await self.connect()
        elif action is Action.CLOSE:
            await self.close()
        return {}

    async def connect(self) -> None:
        fe = self.device.frontend_domid
        top = await read_keys(self.xs, self.device.frontend, ["multi-queue-num-queues"])
        count = int(top["multi-queue-num-queues"] or 1)
        for n in range(count):
            prefix = f"{self.device.frontend}/queue-{n}" if count > 1 else self.device.frontend
            names = ["tx-ring-ref", "rx-ring-ref", "event-channel"]
            names += ["event-channel-tx", "event-channel-rx"]
            keys = await read_keys(self.xs, prefix, names)
            tx_map = await self.dom.map_grants(fe, [int(keys["tx-ring-ref"] or -1)])
            rx_map = await self.dom.map_grants(fe, [int(keys["rx-ring-ref"] or -1)])
            if keys["event-channel-tx"] is not None:
                assert self.split
                ev_tx = await self.dom.bind_interdomain(fe, int(keys["event-channel-tx"]))
                ev_rx = await self.dom.bind_interdomain(fe, int(keys["event-channel-rx"] or 0))
            else:
                ev_tx = ev_rx = await self.dom.bind_interdomain(fe, int(keys["event-channel"] or 0))
            self.queues.append(
                StubQueue(
                    BackRing(tx_map, NETIF_TX_RING),
                    BackRing(rx_map, NETIF_RX_RING),
                    [tx_map, rx_map],
                    ev_tx,
                    ev_rx,
                )
            )
        self.connects += 1
        self.scope = trio.CancelScope()
        self.nursery.start_soon(self._run, self.scope)

    async def _run(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for index, queue in enumerate(self.queues):
                    nursery.start_soon(self._service, index, queue, queue.evtchn_tx)
                    nursery.start_soon(self._echo, index, queue)
                    if queue.split_rx():
                        nursery.start_soon(self._rx_events, queue)

    async def close(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
            self.scope = None
        for queue in self.queues:
            queue.evtchn_tx.close()
            queue.evtchn_rx.close()
            queue.rx_space.unpark_all()
            for mapping in queue.maps:
                await mapping.unmap()
        self.queues = []

    async def _rx_events(self, queue: StubQueue) -> None:
        with suppress(EventChannelClosed):  # the stub is closing the connection
            while True:
                await queue.evtchn_rx.wait()
                queue.rx_space.unpark_all()

    async def _service(self, index: int, queue: StubQueue, channel: EventChannel) -> None:
        fe = self.device.frontend_domid
        try:
            while True:
                await channel.wait()
                queue.rx_space.unpark_all()
                while True:
                    queue.pending += queue.tx.take_requests()
                    self.took.unpark_all()
                    while queue.pending and not self.hold_tx:
                        packet = parse_tx_packet(queue.pending)
                        assert packet is not None, "netfront pushed half a packet"
                        del queue.pending[: packet.slots]
                        data = bytearray(packet.size)
                        ops = []
                        position = 0
                        for request, size in zip(packet.requests, packet.sizes, strict=True):
                            view = memoryview(data)[position : position + size]
                            ops.append(
                                CopyOp(
                                    CopyDirection.FROM_REMOTE,
                                    fe,
                                    request.gref,
                                    request.offset,
                                    size,
                                    view,
                                )
                            )
                            position += size
                        assert all(s == 0 for s in await self.dom.grant_copy(ops))
                        first = packet.requests[0]
                        put = queue.tx.put_response
                        first_id = first.id if not self.bad_tx_id else (first.id + 100) % 256
                        put(encode_tx_response(NetifTxResponse(first_id, NETIF_RSP_OKAY)))
                        for _extra in packet.extras:
                            put(encode_tx_response(NetifTxResponse(0, NETIF_RSP_NULL)))
                        for request in packet.requests[1:]:
                            put(encode_tx_response(NetifTxResponse(request.id, NETIF_RSP_OKAY)))
                        gso = next((e for e in packet.extras if isinstance(e, NetifGsoExtra)), None)
                        got = Received(bytes(data), gso, first.flags, index)
                        self.received_send.send_nowait(got)
                        if self.echo:  # FIFO per queue: echoes keep the order
                            queue.echo_send.send_nowait(got)
                    if queue.tx.push_responses():
                        channel.notify()
                    if not queue.tx.final_check_for_requests():
                        break
        except (EventChannelClosed, PeerGone):
            pass  # the stub is closing the connection

    async def _echo(self, index: int, queue: StubQueue) -> None:
        async for got in queue.echo_recv:
            csum = bool(got.flags & NETTXF_csum_blank)
            try:
                await self.inject(got.frame, gso=got.gso, csum_blank=csum, queue=index)
            except (EventChannelClosed, PeerGone):
                return  # the stub is closing the connection

    async def inject(
        self,
        frame: bytes,
        *,
        gso: NetifGsoExtra | None = None,
        csum_blank: bool = False,
        queue: int = 0,
    ) -> None:
        """Deliver a frame to the guest: one 4 KiB chunk per rx request."""
        q = self.queues[queue]
        chunks = [frame[i : i + XEN_PAGE_SIZE] for i in range(0, len(frame), XEN_PAGE_SIZE)]
        need = len(chunks) + (gso is not None)
        while q.rx.unconsumed_requests() < need:
            q.rx.final_check_for_requests()
            if q.rx.unconsumed_requests() >= need:
                break
            await q.rx_space.park()
        requests = [decode_rx_request(r) for r in q.rx.take_requests(need)]
        data_requests = [requests[0], *requests[1 + (gso is not None) :]]
        ops = [
            CopyOp(
                CopyDirection.TO_REMOTE,
                self.device.frontend_domid,
                r.gref,
                0,
                len(c),
                memoryview(c),
            )
            for r, c in zip(data_requests, chunks, strict=True)
        ]
        assert all(s == 0 for s in await self.dom.grant_copy(ops))
        for n, (request, chunk) in enumerate(zip(data_requests, chunks, strict=True)):
            flags = NETRXF_more_data if n < len(chunks) - 1 else 0
            if n == 0:
                if csum_blank:
                    flags |= NETRXF_csum_blank | NETRXF_data_validated
                if gso is not None:
                    flags |= NETRXF_extra_info
            q.rx.put_response(encode_rx_response(NetifRxResponse(request.id, 0, flags, len(chunk))))
            if n == 0 and gso is not None:
                q.rx.put_response(encode_extra(NetifGsoExtra(gso.size, gso.gso_type)))
        if q.rx.push_responses():
            q.evtchn_rx.notify()


@dataclass
class Setup:
    xs: XenstoreClient
    backend_dom: Domain
    front_dom: Domain
    device: DeviceId
    stub: StubBackend
    nursery: trio.Nursery
    backend_scope: trio.CancelScope

    async def replace_backend(self) -> StubBackend:
        """The backend process goes away and a new one (echoing) picks the device up."""
        self.backend_scope.cancel()
        await self.stub.close()
        stub = StubBackend(self.backend_dom, self.xs, self.device, self.nursery, echo=True)
        self.nursery.start_soon(run_handshake, self.xs, stub)
        return stub


@asynccontextmanager
async def setup(
    tmp: Path,
    xenstored: Xenstored,
    transport: str,
    *,
    page_size: int = XEN_PAGE_SIZE,
    max_queues: int = 1,
    split: bool = True,
    echo: bool = True,
) -> AsyncIterator[Setup]:
    async with AsyncExitStack() as stack:
        p = await stack.enter_async_context(
            pair(
                tmp,
                xenstored.unix,
                transport,
                page_size,
                guest_memory=64 << 20,
                backend_memory=16 << 20,
            )
        )
        xs = p.xs
        device = DeviceId("vif", 1, 0, 0)
        await create_vif(xs, device, mac=MAC)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stub = StubBackend(
            p.backend, xs, device, nursery, split=split, max_queues=max_queues, echo=echo
        )
        scope = trio.CancelScope()

        async def backend() -> None:
            with scope:
                await run_handshake(xs, stub)

        nursery.start_soon(backend)
        try:
            yield Setup(xs, p.backend, p.guest, device, stub, nursery, scope)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def connected(
    tmp: Path,
    xenstored: Xenstored,
    transport: str,
    *,
    queues: int = 1,
    backend_queues: int = 1,
    page_size: int = XEN_PAGE_SIZE,
    split: bool = True,
    echo: bool = True,
) -> AsyncIterator[tuple[Setup, Netfront]]:
    """`setup`, and netfront (asking for `queues`) attached and connected to the stub."""
    async with (
        setup(
            tmp,
            xenstored,
            transport,
            page_size=page_size,
            max_queues=backend_queues,
            split=split,
            echo=echo,
        ) as s,
        attach(s.front_dom, s.xs, s.device, max_queues=queues) as front,
    ):
        await front.wait_connected()
        yield s, front


def frame_of(size: int, seq: int, rng: random.Random, sport: int = 1000) -> bytes:
    """An Ethernet/IPv4/TCP-looking frame (so flow hashing sees ports) with a sequence tag."""
    head = bytes.fromhex("00163e00000200163e0000010800")
    ip = bytes([0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
    tcp = sport.to_bytes(2, "big") + (80).to_bytes(2, "big") + bytes(8) + b"\x50" + bytes(7)
    body = seq.to_bytes(4, "big") + rng.randbytes(max(0, size - 58))
    return (head + ip + tcp + body)[:size]


@pytest.mark.parametrize(("queues", "split"), [(1, False), (1, True), (2, True)])
async def test_handshake_keys_and_echo(
    tmp_path: Path, xenstored: Xenstored, transport: str, queues: int, split: bool
) -> None:
    rng = random.Random(queues * 2 + split)
    with trio.fail_after(40):
        async with connected(
            tmp_path,
            xenstored,
            transport,
            queues=queues,
            backend_queues=4 if queues > 1 else 1,
            split=split,
        ) as (s, front):
            assert await read_state(s.xs, s.device.frontend) == Connected
            fe = s.device.frontend
            if queues == 1:
                keys = await read_keys(
                    s.xs,
                    fe,
                    ["tx-ring-ref", "event-channel", "event-channel-tx", "multi-queue-num-queues"],
                )
                assert keys["tx-ring-ref"] is not None and keys["multi-queue-num-queues"] is None
                assert (keys["event-channel"] is None) == split
            else:
                keys = await read_keys(s.xs, fe, ["multi-queue-num-queues"])
                assert keys["multi-queue-num-queues"] == str(queues)
                assert await s.xs.try_read(f"{fe}/queue-1/event-channel-rx") is not None
            feats = await read_keys(
                s.xs,
                fe,
                ["request-rx-copy", "feature-sg", "feature-gso-tcpv4", "feature-rx-notify"],
            )
            assert set(feats.values()) == {"1"}
            assert front.mac == bytes.fromhex("00163e000001")
            assert front.info.queues == queues and front.info.split_event_channels == split

            sizes = [60, 1514, 4096, 4097, 9000, 30000, 65535]
            sent = []
            for seq, size in enumerate(sizes * 3):
                frame = frame_of(size, seq, rng, sport=1000 + seq % 7)
                gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
                await front.send(frame, gso=gso, csum_blank=gso is not None)
                sent.append((frame, gso))
            got = [await front.receive() for _ in sent]
            # per flow (sport), order is preserved; across flows, queues may interleave
            for sport in range(1000, 1007):
                mine = [f for f, _g in sent if f[34:36] == sport.to_bytes(2, "big")]
                echoed = [r.frame for r in got if r.frame[34:36] == sport.to_bytes(2, "big")]
                assert echoed == mine
            by_frame = {r.frame: r for r in got}
            for frame, gso in sent:
                r = by_frame[frame]
                assert (r.gso is not None) == (gso is not None)
                assert r.csum_blank == (gso is not None)
            wire = [s.stub.received.receive_nowait() for _ in sent]
            assert {w.frame for w in wire} == {f for f, _ in sent}
            if queues > 1:
                assert {w.queue for w in wire} == set(range(queues))
            stats = front.stats()
            assert stats["tx_packets"] == len(sent) and stats["rx_packets"] == len(sent)


@pytest.mark.parametrize("page_size", [16384, 65536])
async def test_large_page_guest(tmp_path: Path, xenstored: Xenstored, page_size: int) -> None:
    rng = random.Random(page_size)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, "shm", page_size=page_size) as (s, front):
            for seq, size in enumerate([60, 4095, 4096, 16385, 65535]):
                frame = frame_of(size, seq, rng)
                await front.send(frame)
                got = await front.receive()
                assert got.frame == frame
                wire = s.stub.received.receive_nowait()
                assert wire.frame == frame
            assert front.info.page_size == page_size and front.info.grant_size == 4096


async def test_backpressure_waits_for_ring_space(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(7)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, transport, echo=False) as (s, front):
            s.stub.hold_tx = True
            frames = [frame_of(9000, seq, rng) for seq in range(100)]  # 3 slots each
            done = trio.Event()

            async def sender() -> None:
                for frame in frames:
                    await front.send(frame)
                done.set()

            s.nursery.start_soon(sender)
            # 85 packets fill 255 of the 256 slots; the sender must then wait
            while s.stub.queues[0].tx.req_cons < 255:
                await s.stub.took.park()
            assert not done.is_set()
            s.stub.hold_tx = False
            s.stub.queues[0].evtchn_tx.raise_event()
            await done.wait()
            wire = [await s.stub.received.receive() for _ in frames]
            assert [w.frame for w in wire] == frames


async def test_reconnect_drops_in_flight_and_resumes(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(11)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, transport, echo=False) as (s, front):
            first = front.info.generation
            await front.send(frame_of(100, 0, rng))
            assert (await s.stub.received.receive()).frame[54:58] == (0).to_bytes(4, "big")
            s.stub.hold_tx = True
            for seq in range(1, 4):
                await front.send(frame_of(2000, seq, rng))  # stuck on the ring
            while s.stub.queues[0].tx.req_cons < 4:
                await s.stub.took.park()

            stub = await s.replace_backend()
            await front.wait_disconnected()
            await front.wait_connected()
            assert front.info.generation == first + 1
            assert front.stats()["tx_dropped"] == 3
            frames = [frame_of(size, 10 + n, rng) for n, size in enumerate([60, 5000, 65535])]
            for frame in frames:
                await front.send(frame)
            assert [(await front.receive()).frame for _ in frames] == frames
            assert [(await stub.received.receive()).frame for _ in frames] == frames
            # grants of the old connection are all gone once the old backend unmapped
            assert not front._deferred


async def test_hostile_backend_breaks_only_until_reconnect(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(13)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, transport, echo=False) as (s, front):
            s.stub.bad_tx_id = True
            await front.send(frame_of(100, 0, rng))
            await s.stub.received.receive()
            queue = front._conn.queues[0] if front._conn else None
            assert queue is not None
            while queue.broken is None:  # the bogus response arrives with the next event
                await queue.space.park()
            assert "not in flight" in queue.broken
            await front.send(frame_of(100, 1, rng))  # no exception: dropped and counted
            assert front.stats()["tx_dropped"] >= 1
            # a new backend: traffic resumes on new rings
            stub = await s.replace_backend()
            await front.wait_disconnected()
            await front.wait_connected()
            frame = frame_of(3000, 2, rng)
            await front.send(frame)
            assert (await front.receive()).frame == frame
            # a bogus rsp_prod on the rx ring: that queue breaks, nothing raises to the user
            stub.queues[0].rx.buffer.view[8:12] = (0x7FFFFFFF).to_bytes(4, "little")
            stub.queues[0].rx.buffer.written(8, 4)
            stub.queues[0].evtchn_rx.notify()
            queue = front._conn.queues[0] if front._conn else None
            assert queue is not None
            while queue.broken is None:
                await queue.space.park()
            assert "illegal number of responses" in queue.broken


async def test_backend_without_rx_copy_is_refused(tmp_path: Path, xenstored: Xenstored) -> None:
    with trio.fail_after(30):
        async with setup(tmp_path, xenstored, "shm") as s:
            s.stub.rx_copy = False
            async with attach(s.front_dom, s.xs, s.device, max_queues=1) as front:
                # the backend reaches InitWait; the frontend refuses and stays Initialising
                while front.setup_error is None:
                    await front._changed.wait()
                assert "feature-rx-copy" in front.setup_error
                assert await read_state(s.xs, s.device.frontend) == Initialising
                assert await s.xs.try_read(f"{s.device.frontend}/tx-ring-ref") is None
                assert not front.connected
                with pytest.raises(NetfrontError, match="not connected yet"):
                    front.info  # noqa: B018


async def test_send_more_defers_the_push_until_a_send_without_it(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """`send(more=True)` puts requests on the ring without pushing them (Linux's xmit_more);
    the next send without `more` pushes every queue it left pending, in order per flow."""
    rng = random.Random(5)
    with trio.fail_after(40):
        async with connected(
            tmp_path, xenstored, transport, queues=2, backend_queues=2, echo=False
        ) as (s, front):
            frames = [frame_of(1500, seq, rng, sport=2000 + seq % 5) for seq in range(12)]
            for frame in frames[:-1]:
                await front.send(frame, more=True)
            for _ in range(20):  # give a wrongly notified backend every chance to run
                await trio.lowlevel.checkpoint()
            assert [shared_indexes(q.tx.buffer)[0] for q in s.stub.queues] == [0, 0]
            with pytest.raises(trio.WouldBlock):
                s.stub.received.receive_nowait()
            await front.send(frames[-1])
            wire = [await s.stub.received.receive() for _ in frames]
            assert {w.queue for w in wire} == {0, 1}  # both queues' requests were pushed
            for sport in range(2000, 2005):
                mine = [f for f in frames if f[34:36] == sport.to_bytes(2, "big")]
                assert [w.frame for w in wire if w.frame[34:36] == mine[0][34:36]] == mine


async def test_send_more_pushes_before_waiting_for_space_and_flush_ends_a_burst(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """A burst longer than the ring never deadlocks (requests are pushed before a send waits
    for room), and `flush()` pushes the tail of a burst that ends with `more=True`."""
    rng = random.Random(6)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, transport, echo=False) as (s, front):
            frames = [frame_of(9000, seq, rng) for seq in range(100)]  # 3 slots each
            for frame in frames:
                await front.send(frame, more=True)
            assert front.stats()["tx_packets"] == 100
            # The sends that waited for room pushed what was before them; the last ones
            # (at least the 100th) are on the ring but unpublished.
            assert shared_indexes(s.stub.queues[0].tx.buffer)[0] < 300
            front.flush()
            wire = [await s.stub.received.receive() for _ in frames]
            assert [w.frame for w in wire] == frames


async def test_rx_sink_takes_frames_in_order_and_the_channel_keeps_the_rest(
    tmp_path: Path, xenstored: Xenstored
) -> None:
    """`set_rx_sink`: received frames go to the sink while the receive() channel is empty; a
    frame it refuses waits in the channel, in order with the frames after it, until read.

    The sink refuses every frame while it holds three: whether netfront offers it frames 4
    and 5 depends on whether the reader has emptied the channel by then (both are right),
    and either way those frames reach the reader, in order."""
    rng = random.Random(8)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, "shm") as (_setup, front):
            frames = [frame_of(1500, seq, rng) for seq in range(8)]
            sunk: list[bytes] = []
            arrived = trio.Event()
            all_sunk = trio.Event()

            def sink(rx: RxFrame) -> bool:
                if len(sunk) == 3 and not (arrived.is_set() and rx.frame == frames[6]):
                    arrived.set()
                    return False  # "would block": this frame takes the channel
                sunk.append(rx.frame)
                if len(sunk) == 5:
                    all_sunk.set()
                return True

            front.set_rx_sink(sink)
            for frame in frames[:6]:
                await front.send(frame)
            await arrived.wait()
            got = [(await front.receive()).frame for _ in range(3)]
            assert sunk == frames[:3] and got == frames[3:6]
            for frame in frames[6:]:  # the channel is empty again: the sink takes these
                await front.send(frame)
            await all_sunk.wait()
            assert sunk == frames[:3] + frames[6:]
            front.set_rx_sink(None)
            await front.send(frames[0])
            assert (await front.receive()).frame == frames[0]


async def test_every_tx_answer_is_collected_without_further_sends(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """netfront asks for a tx event only when all outstanding requests are answered and
    collects the rest as it sends: after a burst, with no more sends, every slot comes back."""
    rng = random.Random(9)
    with trio.fail_after(40):
        async with connected(tmp_path, xenstored, transport, echo=False) as (s, front):
            frames = [frame_of(size, seq, rng) for seq, size in enumerate([60, 9000, 65535] * 9)]
            for frame in frames:
                gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if len(frame) > 9000 else None
                await front.send(frame, gso=gso, csum_blank=gso is not None)
            wire = [await s.stub.received.receive() for _ in frames]
            assert [w.frame for w in wire] == frames
            assert front._conn is not None
            queue = front._conn.queues[0]
            while queue.tx.in_flight():
                await queue.space.park()  # woken by the tx event handler
            assert front.stats()["tx_errors"] == 0
