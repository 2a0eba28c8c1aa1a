"""netback against a real xenstored and real domains, driven by a stub frontend.

The stub frontend (`StubFront`) speaks netif straight from the headers (no netfront), so the
tests control every slot: it is both the well-behaved guest and the hostile one. Every test
runs on the socket-copy and on the shared-memory transport.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from backends.netback import Vif, advertise_keys
from backends.switch import LiveSwitch
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import open_unix_domains
from xenpv.abi.netif import (
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_EXTRA_FLAG_MORE,
    NetifGsoExtra,
    NetifRxRequest,
    NetifTxRequest,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    decode_extra,
    decode_rx_response,
    decode_tx_response,
    encode_extra,
    encode_rx_request,
    encode_tx_request,
)
from xenpv.abi.ring import FrontRing
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.ethernet import flow_hash
from xenpv.hv import Domain, EventChannel, Page, StaticDirectory
from xenpv.toolstack.devices import create_vif, destroy_device
from xenpv.xenbus.core import Connected, DeviceId, Initialising, InitWait, XenbusState
from xenpv.xenbus.handshake import publish, read_state
from xenpv.xenstore.client import XenstoreClient, connect
from xenpv.xenstore.wire import XsError

TRANSPORTS = ["socket", "shm"]
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental
TIMEOUT = 30


def mac(domid: int) -> bytes:
    return bytes([2, 0, 0, 0, 0, domid])


def frame(src: int, dst: int, size: int, seq: int = 0) -> bytes:
    head = mac(dst) + mac(src) + ETHERTYPE + struct.pack("!I", seq)
    body = bytes((seq + i) & 0xFF for i in range(size - len(head)))
    return head + body


async def wait_state(xs: XenstoreClient, directory: str, *states: XenbusState) -> None:
    async with xs.watch(f"{directory}/state") as events:
        async for _ in events:
            if await read_state(xs, directory) in states:
                return


@dataclass
class Received:
    data: bytes
    flags: int
    gso: NetifGsoExtra | None
    statuses: list[int] = field(default_factory=list)


class StubQueue:
    """One queue's rings, channels, tx data pages and rx buffers in the frontend domain."""

    def __init__(self, dom: Domain, backend: int, rx_buffers: int) -> None:
        self.dom = dom
        self.backend = backend
        self.tx_page = dom.alloc_buffer(1)
        self.rx_page = dom.alloc_buffer(1)
        self.tx_ref = dom.grants.grant_access(backend, self.tx_page.frame)
        self.rx_ref = dom.grants.grant_access(backend, self.rx_page.frame)
        self.tx = FrontRing(self.tx_page, NETIF_TX_RING)
        self.rx = FrontRing(self.rx_page, NETIF_RX_RING)
        self.data: list[tuple[Page, int]] = []
        for _ in range(24):  # enough 4 KiB frames for a 64 KiB frame plus slack
            page = dom.alloc_buffer(1)
            self.data.append((page, dom.grants.grant_access(backend, page.frame, readonly=True)))
        self.buffers: list[tuple[Page, int]] = []
        for _ in range(rx_buffers):
            page = dom.alloc_buffer(1)
            self.buffers.append((page, dom.grants.grant_access(backend, page.frame)))
        self.next_id = 0
        self.posted: deque[int] = deque()  # rx request ids in ring order
        self.rx_notify = True  # notify when posting rx buffers (feature-rx-notify)
        self.chan_tx: EventChannel | None = None
        self.chan_rx: EventChannel | None = None

    async def bind(self, split: bool) -> dict[str, int]:
        self.chan_tx = await self.dom.alloc_unbound(self.backend)
        self.chan_rx = await self.dom.alloc_unbound(self.backend) if split else self.chan_tx
        keys = {"tx-ring-ref": self.tx_ref, "rx-ring-ref": self.rx_ref}
        if split:
            keys |= {"event-channel-tx": self.chan_tx.port, "event-channel-rx": self.chan_rx.port}
        else:
            keys["event-channel"] = self.chan_tx.port
        return keys

    def post(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.posted.append(i)
            self.rx.put_request(encode_rx_request(NetifRxRequest(i, self.buffers[i][1])))
        if self.rx.push_requests() and self.rx_notify:
            assert self.chan_rx is not None
            self.chan_rx.notify()

    def put_raw(self, slots: Sequence[bytes]) -> None:
        for raw in slots:
            self.tx.put_request(raw)
        if self.tx.push_requests():
            assert self.chan_tx is not None
            self.chan_tx.notify()

    def packet(self, data: bytes, flags: int = 0, gso: NetifGsoExtra | None = None) -> list[bytes]:
        """netfront-style slots: 4 KiB chunks at offset 0 of granted pages."""
        chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)] or [b""]
        slots: list[bytes] = []
        for n, chunk in enumerate(chunks):
            page, gref = self.data[n]
            page.view[: len(chunk)] = chunk
            page.written(0, len(chunk))
            f = (flags if n == 0 else 0) | (NETTXF_more_data if n < len(chunks) - 1 else 0)
            if n == 0 and gso is not None:
                f |= NETTXF_extra_info
            size = len(data) if n == 0 else len(chunk)
            slots.append(encode_tx_request(NetifTxRequest(gref, 0, f, self.next_id, size)))
            self.next_id = (self.next_id + 1) & 0xFFFF
            if n == 0 and gso is not None:
                slots.append(encode_extra(gso))
        return slots

    async def tx_responses(self, count: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        assert self.chan_tx is not None
        while True:
            while len(out) < count and (raw := self.tx.take_response()) is not None:
                response = decode_tx_response(raw)
                out.append((response.id, response.status))
            if len(out) >= count:
                return out
            if not self.tx.final_check_for_responses():
                await self.chan_tx.wait()

    async def receive(self) -> Received:
        assert self.chan_rx is not None
        got = Received(b"", 0, None)
        parts: list[bytes] = []
        used: list[int] = []
        first = True
        expect_extra = False
        more = True
        while more or expect_extra:
            raw = self.rx.take_response()
            if raw is None:
                if not self.rx.final_check_for_responses():
                    await self.chan_rx.wait()
                continue
            if expect_extra:
                extra = decode_extra(raw)
                assert isinstance(extra, NetifGsoExtra)
                got.gso = extra
                expect_extra = bool(extra.flags & XEN_NETIF_EXTRA_FLAG_MORE)
                used.append(self.posted.popleft())
                continue
            response = decode_rx_response(raw)
            assert response.id == self.posted.popleft()  # requests are answered in order
            used.append(response.id)
            got.statuses.append(response.status)
            if response.status > 0:
                page = self.buffers[response.id][0]
                parts.append(bytes(page.view[response.offset : response.offset + response.status]))
            if first:
                got.flags = response.flags
                expect_extra = bool(response.flags & NETRXF_extra_info)
                first = False
            more = bool(response.flags & NETRXF_more_data)
        got.data = b"".join(parts)
        self.post(used)  # recycle the buffers, as netfront does
        return got


class StubFront:
    """A minimal, fully controllable netfront."""

    def __init__(
        self,
        dom: Domain,
        xs: XenstoreClient,
        device: DeviceId,
        *,
        queues: int = 1,
        split: bool = False,
        sg: bool = True,
        gso: bool = True,
        rx_buffers: int = 64,
        rx_notify: bool = True,
        extra_keys: dict[str, str | int] | None = None,
    ) -> None:
        self.dom, self.xs, self.device = dom, xs, device
        self.nqueues, self.split, self.sg, self.gso = queues, split, sg, gso
        self.rx_buffers = rx_buffers
        self.rx_notify = rx_notify
        self.extra_keys = extra_keys or {}
        self.queues: list[StubQueue] = []

    async def connect(self) -> None:
        await wait_state(self.xs, self.device.backend, InitWait)
        keys: dict[str, str | int] = {
            "request-rx-copy": 1,
            "feature-rx-notify": int(self.rx_notify),
            "feature-sg": int(self.sg),
            "feature-gso-tcpv4": int(self.gso),
            "feature-gso-tcpv6": int(self.gso),
        }
        if self.nqueues > 1:
            keys["multi-queue-num-queues"] = self.nqueues
        self.queues = []
        for n in range(self.nqueues):
            queue = StubQueue(self.dom, self.device.backend_domid, self.rx_buffers)
            queue.rx_notify = self.rx_notify
            prefix = f"queue-{n}/" if self.nqueues > 1 else ""
            for name, value in (await queue.bind(self.split)).items():
                keys[prefix + name] = value
            self.queues.append(queue)
        keys.update(self.extra_keys)
        await publish(self.xs, self.device.frontend, keys, state=Connected)
        await wait_state(self.xs, self.device.backend, Connected)
        for queue in self.queues:
            queue.post(range(self.rx_buffers))

    async def reconnect(self) -> None:
        """Start over on fresh rings (netfront after a fatal error: Initialising again)."""
        await publish(self.xs, self.device.frontend, {}, state=Initialising)
        await self.connect()

    async def send(
        self, data: bytes, *, flags: int = 0, gso: NetifGsoExtra | None = None, queue: int = 0
    ) -> list[int]:
        q = self.queues[queue]
        slots = q.packet(data, flags, gso)
        q.put_raw(slots)
        return [status for _id, status in await q.tx_responses(len(slots))]

    async def receive(self, queue: int = 0) -> Received:
        return await self.queues[queue].receive()


@asynccontextmanager
async def world(
    workdir: Path, transport: str, page_sizes: dict[int, int]
) -> AsyncIterator[dict[int, Domain]]:
    directory = StaticDirectory()
    async with AsyncExitStack() as stack:
        # netfront posts 256 rx pages per queue (2 queues by default), like Linux
        specs = [
            (domid, page_size, max(16 << 20, 2 * 256 * page_size + (16 << 20)))
            for domid, page_size in page_sizes.items()
        ]
        opened = await open_unix_domains(stack, directory, workdir, transport, specs)
        yield {dom.domid: dom for dom in opened}


@asynccontextmanager
async def netback(
    xenstored: Xenstored,
    transport: str,
    guests: dict[int, int],
    **options: Any,
) -> AsyncIterator[
    tuple[XenstoreClient, dict[int, Domain], dict[int, Vif], LiveSwitch[VirtioNetHdr]]
]:
    """dom0 with a switch and one vif per guest domain (guests: domid → page size)."""
    async with (
        connect(xenstored.unix) as xs,
        world(xenstored.workdir, transport, {0: 4096, **guests}) as doms,
        trio.open_nursery() as nursery,
    ):
        switch: LiveSwitch[VirtioNetHdr] = LiveSwitch()
        vifs: dict[int, Vif] = {}
        for domid in guests:
            device = DeviceId("vif", domid, 0, 0)
            await create_vif(xs, device, mac=":".join(f"{b:02x}" for b in mac(domid)))
            vifs[domid] = Vif(doms[0], xs, device, switch, **options)
            nursery.start_soon(vifs[domid].run)
        yield xs, doms, vifs, switch
        nursery.cancel_scope.cancel()


def front(xs: XenstoreClient, doms: dict[int, Domain], domid: int, **kw: Any) -> StubFront:
    return StubFront(doms[domid], xs, DeviceId("vif", domid, 0, 0), **kw)


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("pages", [(4096, 4096), (16384, 65536)], ids=["4k-4k", "16k-64k"])
async def test_handshake_and_frames_between_guests(
    xenstored: Xenstored, transport: str, pages: tuple[int, int]
) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: pages[0], 2: pages[1]}) as (
            xs,
            doms,
            vifs,
            sw,
        ):
            device = DeviceId("vif", 1, 0, 0)
            await wait_state(xs, device.backend, InitWait)
            names = await xs.directory(device.backend)
            advertised = [n for n in names if n in advertise_keys()]
            assert advertised == list(advertise_keys())  # written in netback's order
            assert (await xs.read(f"{device.backend}/multi-queue-max-queues")) == b"4"

            a, b = front(xs, doms, 1), front(xs, doms, 2)
            await a.connect()
            await b.connect()
            await vifs[1].wait_until(lambda v: v.connected)
            await vifs[2].wait_until(lambda v: v.connected)
            assert sorted(sw.core.ports) == ["vif1.0", "vif2.0"]
            sizes = [60, 1500, 4096, 4097, 9000, 32768, 65535]
            for seq, size in enumerate(sizes):
                sent = frame(1, 2, size, seq)
                assert await a.send(sent) == [0] * (-(-size // 4096))
                got = await b.receive()
                assert got.data == sent and got.flags & 3 == 0 and got.gso is None
            back = frame(2, 1, 1000, 99)
            assert await b.send(back) == [0]
            assert (await a.receive()).data == back
            stats = vifs[1].stats()
            assert stats.tx_packets == len(sizes) and stats.tx_bytes == sum(sizes)
            assert vifs[2].stats().rx_packets == len(sizes)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_offload_metadata_crosses_the_switch(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096, 2: 4096, 3: 4096}) as (
            xs,
            doms,
            vifs,
            _,
        ):
            a, b, c = (
                front(xs, doms, 1),
                front(xs, doms, 2),
                front(xs, doms, 3, sg=False, gso=False),
            )
            for f in (a, b, c):
                await f.connect()
            payload = bytes(range(256)) * 12
            tcp = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 0x50, 0x18, 1000, 0, 0) + payload
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                             bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
            data = mac(2) + mac(1) + b"\x08\x00" + ip + tcp
            gso = NetifGsoExtra(1448, 1)
            assert await a.send(data, flags=1, gso=gso) == [0, 1]  # the extra: NETIF_RSP_NULL
            got = await b.receive()
            assert got.data == data and got.gso == NetifGsoExtra(1448, 1)
            assert got.flags & 3 == 3  # csum_blank | data_validated
            # The same frame to a frontend without GSO and SG: dropped and counted (the first
            # frame was flooded to it too: its destination was not learned yet).
            to_c = mac(3) + data[6:]
            assert await a.send(to_c, flags=1, gso=gso) == [0, 1]
            await vifs[3].wait_until(lambda v: v.stats().rx_dropped_offload == 2)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_rx_buffers_backlog_then_drop(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096, 2: 4096}) as (xs, doms, vifs, _):
            a, b = front(xs, doms, 1), front(xs, doms, 2, rx_buffers=0)
            await a.connect()
            await b.connect()
            # The backlog (512 KiB) and the switch's egress queue (256 frames) fill up, then
            # the switch drops: 450 frames of 9000 bytes are more than both can hold.
            count = 450
            for seq in range(count):
                assert await a.send(frame(1, 2, 9000, seq)) == [0, 0, 0]
            dropped = vifs[2].stats().rx_dropped_no_buffers
            assert 0 < dropped < count - 256
            # Buffers arrive: the backlog (the oldest frames) is delivered in order.
            queue = b.queues[0]
            queue.buffers = [
                (p, doms[2].grants.grant_access(0, p.frame)) for p in doms[2].alloc_pages(16)
            ]
            queue.post(range(16))
            for seq in range(5):
                assert (await b.receive()).data == frame(1, 2, 9000, seq)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_frontend_without_rx_notify_is_polled(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096, 2: 4096}) as (xs, doms, vifs, _):
            a, b = front(xs, doms, 1), front(xs, doms, 2, rx_buffers=0, rx_notify=False)
            await a.connect()
            await b.connect()
            assert vifs[2]._conn is not None and not vifs[2]._conn.config.rx_notify
            sent = [frame(1, 2, 3000, seq) for seq in range(3)]
            for data in sent:
                assert await a.send(data) == [0]
            queue = b.queues[0]
            queue.buffers = [
                (p, doms[2].grants.grant_access(0, p.frame)) for p in doms[2].alloc_pages(8)
            ]
            queue.post(range(8))  # no event: netback finds the buffers by polling
            for data in sent:
                assert (await b.receive()).data == data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_multi_queue_split_event_channels(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096, 2: 4096}) as (xs, doms, vifs, _):
            a = front(xs, doms, 1, queues=2, split=True)
            b = front(xs, doms, 2, queues=3, split=True)
            await a.connect()
            await b.connect()
            await vifs[2].wait_until(lambda v: v.connected)
            assert vifs[2]._conn is not None and len(vifs[2]._conn.queues) == 3
            for seq in range(12):
                data = frame(1, 2, 200 + seq, seq)
                assert await a.send(data, queue=seq % 2) == [0]
                got = await b.receive(flow_hash(data) % 3)
                assert got.data == data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused_connect_goes_closing(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096}) as (xs, doms, vifs, _):
            bad = front(xs, doms, 1, extra_keys={"request-rx-copy": 0})
            device = bad.device
            await wait_state(xs, device.backend, InitWait)
            queue = StubQueue(doms[1], 0, 0)
            keys = await queue.bind(False)
            await publish(xs, device.frontend, {**keys, "request-rx-copy": 0}, state=Connected)
            await wait_state(xs, device.backend, XenbusState.XenbusStateClosing)
            error = await xs.read("/local/domain/0/error/backend/vif/1/0/error")
            assert b"rx-copy" in error
            assert not vifs[1].connected


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_serve_returns_when_device_removed(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            connect(xenstored.unix) as xs,
            world(xenstored.workdir, transport, {0: 4096, 1: 4096}) as doms,
        ):
            from backends.netback import serve

            device = DeviceId("vif", 1, 0, 0)
            await create_vif(xs, device, mac="02:00:00:00:00:01")
            switch: LiveSwitch[VirtioNetHdr] = LiveSwitch()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, doms[0], xs, device, switch)
                stub = StubFront(doms[1], xs, device)
                await stub.connect()
                assert switch.core.ports == ("vif1.0",)
                await destroy_device(xs, device)
            assert not switch.core.ports  # serve returned on its own, carrier off


@pytest.mark.parametrize("transport", ["shm"])
async def test_handshake_survives_xenstore_refusals(
    xenstored: Xenstored, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused xenstore read (e.g. a frontend hiding its nodes) ends no serve(): retried."""
    import backends.netback.device as vif_module
    from xenpv.xenbus import handshake as xenbus_io

    real = xenbus_io.run_handshake
    refusals = [XsError("EACCES", "frontend state")]

    async def flaky(xs: XenstoreClient, driver: Any) -> None:
        if refusals:
            raise refusals.pop()
        await real(xs, driver)

    monkeypatch.setattr(vif_module, "run_handshake", flaky)
    monkeypatch.setattr(vif_module, "HANDSHAKE_RETRY", 0)
    with trio.fail_after(TIMEOUT):
        async with netback(xenstored, transport, {1: 4096, 2: 4096}) as (xs, doms, vifs, _):
            assert set(vifs) == {1, 2}
            a, b = front(xs, doms, 1), front(xs, doms, 2)
            await a.connect()
            await b.connect()
            data = frame(1, 2, 100)
            assert await a.send(data) == [0]
            assert (await b.receive()).data == data
            assert not refusals
