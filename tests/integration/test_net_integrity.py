"""End to end: netfront → netback → switch → netback → netfront, every frame verified.

Two guests of each page size (4K, 16K, 64K) exchange frames of 60..65535 bytes (scatter-gather,
GSO) through the real netback and the learning switch of the backend domain; frames arrive
intact and in order per flow; broadcast and unknown unicast flood, learned unicast does not.
All domains live in this process (the multi-process path is test_net_processes.py).
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from backends import netback
from backends.switch import LiveSwitch
from frontends.netfront import Netfront, RxFrame, attach
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import open_unix_domains
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.hv import XEN_PAGE_SIZE, Domain, StaticDirectory
from xenpv.toolstack.devices import create_vif
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreClient, connect

BROADCAST = b"\xff" * 6
ETH_P_TEST = 0x88B5  # IEEE local experimental: an opaque payload nobody parses
SIZES = [60, 61, 1514, 4095, 4096, 4097, 9000, 16384, 32768, 65535]


def mac_of(domid: int) -> bytes:
    return bytes([0x00, 0x16, 0x3E, 0x00, 0x00, domid])


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@dataclass
class Net:
    xs: XenstoreClient
    backend: Domain
    guests: list[Domain]
    fronts: list[Netfront]
    switch: LiveSwitch[Any]
    nursery: trio.Nursery


def memory_for(page_size: int) -> int:
    # rx buffers are one guest page each (256 per queue), like Linux
    return max(48 << 20, 2 * 256 * page_size + (32 << 20))


@asynccontextmanager
async def network(
    tmp: Path,
    xenstored: Xenstored,
    transport: str,
    page_sizes: list[int],
    *,
    max_queues: int | None = None,
    taps: dict[int, str] | None = None,
) -> AsyncIterator[Net]:
    """A backend domain 0 (netback + switch) and one guest per page size (domids 1, 2, ...)."""
    directory = StaticDirectory()
    async with AsyncExitStack() as stack:
        sizes = [XEN_PAGE_SIZE, *page_sizes]
        specs = [
            (domid, size, 32 << 20 if domid == 0 else memory_for(size))
            for domid, size in enumerate(sizes)
        ]
        doms = await open_unix_domains(stack, directory, tmp, transport, specs)
        xs = await stack.enter_async_context(connect(xenstored.unix))
        switch: LiveSwitch[Any] = LiveSwitch(queue_depth=1024)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        fronts = []
        for dom in doms[1:]:
            device = DeviceId("vif", dom.domid, 0, 0)
            tap = (taps or {}).get(dom.domid)
            await create_vif(xs, device, mac=mac_text(mac_of(dom.domid)), tap=tap)
            nursery.start_soon(netback.serve, doms[0], xs, device, switch)
            front = await stack.enter_async_context(attach(dom, xs, device, max_queues=max_queues))
            fronts.append(front)
        for front in fronts:
            await front.wait_connected()
        yield Net(xs, doms[0], doms[1:], fronts, switch, nursery)


def opaque_frame(
    dst: bytes, src: bytes, flow: int, seq: int, size: int, rng: random.Random
) -> bytes:
    head = dst + src + struct.pack("!H", ETH_P_TEST) + struct.pack("!HI", flow, seq)
    return (head + rng.randbytes(size))[:size]


def tcp_frame(dst: bytes, src: bytes, sport: int, seq: int, size: int, rng: random.Random) -> bytes:
    """A well-formed IPv4/TCP frame of `size` bytes (payload starts with `seq`)."""
    payload = seq.to_bytes(4, "big") + rng.randbytes(size - 58)
    tcp = struct.pack("!HHIIBBHHH", sport, 5001, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + 20 + len(payload),
        0,
        0x4000,
        64,
        6,
        0,
        bytes([10, 9, 0, src[-1]]),
        bytes([10, 9, 0, dst[-1]]),
    )
    return dst + src + b"\x08\x00" + ip + tcp + payload


async def collect(front: Netfront, want: int, into: list[RxFrame]) -> None:
    """Receive until `want` frames addressed to this guest (or broadcast) arrived."""
    while sum(1 for f in into if f.frame[:6] in (front.mac, BROADCAST)) < want:
        into.append(await front.receive())


async def test_all_page_size_pairs_intact_and_in_order(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(transport)
    page_sizes = [4096, 4096, 16384, 16384, 65536, 65536]  # every ordered pair, same sizes too
    with trio.fail_after(90):
        async with network(tmp_path, xenstored, transport, page_sizes, max_queues=2) as net:
            fronts = net.fronts
            sent: dict[tuple[int, int], list[bytes]] = {}
            received: list[list[RxFrame]] = [[] for _ in fronts]

            async def sender(a: int) -> None:
                for b in range(len(fronts)):
                    if a == b:
                        continue
                    for flow in range(2):
                        frames = sent.setdefault((a, b), [])
                        for seq, size in enumerate(SIZES):
                            if flow == 0:
                                frame = opaque_frame(
                                    fronts[b].mac, fronts[a].mac, flow, seq, size, rng
                                )
                                await fronts[a].send(frame)
                            else:
                                frame = tcp_frame(
                                    fronts[b].mac, fronts[a].mac, 4000 + a, seq, size, rng
                                )
                                gso = (
                                    NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
                                    if size > 1514
                                    else None
                                )
                                await fronts[a].send(frame, gso=gso, csum_blank=True)
                            frames.append(frame)

            # the first frames to each guest are unknown unicast (flooded); prime the switch
            for front in fronts:
                await front.send(opaque_frame(BROADCAST, front.mac, 9, 0, 60, rng))
            per_receiver = (len(fronts) - 1) * 2 * len(SIZES) + len(fronts) - 1
            async with trio.open_nursery() as nursery:
                for i, front in enumerate(fronts):
                    nursery.start_soon(collect, front, per_receiver, received[i])
                for a in range(len(fronts)):
                    nursery.start_soon(sender, a)
            for b, front in enumerate(fronts):
                mine = [f for f in received[b] if f.frame[:6] == front.mac]
                for a in range(len(fronts)):
                    if a == b:
                        continue
                    got = [f.frame for f in mine if f.frame[6:12] == fronts[a].mac]
                    want = sent[(a, b)]
                    # per flow in order: opaque flow and TCP flow separately
                    assert [g for g in got if g[12:14] != b"\x08\x00"] == [
                        w for w in want if w[12:14] != b"\x08\x00"
                    ], f"guest {a} -> {b} opaque flow"
                    assert [g for g in got if g[12:14] == b"\x08\x00"] == [
                        w for w in want if w[12:14] == b"\x08\x00"
                    ], f"guest {a} -> {b} tcp flow"
                gso = [f for f in mine if f.gso is not None]
                assert gso and all(f.gso is not None and f.gso.size == 1448 for f in gso)
                assert all(f.csum_blank for f in gso)
            for front in fronts:
                stats = front.stats()
                assert stats["rx_errors"] == 0 and stats["tx_errors"] == 0


async def test_flooding_and_mac_learning(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(3)
    with trio.fail_after(60):
        async with network(tmp_path, xenstored, transport, [4096] * 3, max_queues=1) as net:
            a, b, c = net.fronts
            # unknown unicast to B floods: C sees it too
            unknown = opaque_frame(b.mac, a.mac, 1, 0, 100, rng)
            await a.send(unknown)
            assert (await b.receive()).frame == unknown
            assert (await c.receive()).frame == unknown
            # broadcast from B reaches A and C, never B itself; the switch learns B
            bcast = opaque_frame(BROADCAST, b.mac, 2, 0, 1000, rng)
            await b.send(bcast)
            assert (await a.receive()).frame == bcast
            assert (await c.receive()).frame == bcast
            # learned unicast A -> B: C must not see it; a broadcast marker follows it
            known = opaque_frame(b.mac, a.mac, 1, 1, 5000, rng)
            marker = opaque_frame(BROADCAST, a.mac, 3, 0, 60, rng)
            await a.send(known)
            await a.send(marker)
            assert (await b.receive()).frame == known
            assert (await b.receive()).frame == marker
            assert (await c.receive()).frame == marker
            with pytest.raises(trio.WouldBlock):
                b.receive_nowait()
            with pytest.raises(trio.WouldBlock):
                c.receive_nowait()
            entries = {e.mac: e.port for e in net.switch.core.fdb()}
            assert set(entries) == {a.mac, b.mac}
