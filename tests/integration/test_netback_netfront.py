"""netback with the real netfront: offload metadata end to end, and a hostile guest beside them.

Two netfront guests (4 KiB and 64 KiB pages) talk through netback and the switch while a third
guest, a stub frontend, breaks the tx protocol: its vif goes down alone and the netfront
guests' traffic (TCP segmentation and partial checksums included) carries on.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from frontends.netfront import Netfront, attach
from tests.integration.conftest import Xenstored
from tests.integration.test_netback import TRANSPORTS, StubFront, frame, front, netback
from tests.integration.test_netback_hostile import FATAL
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.hv import Domain
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreClient


def tcp_frame(src: int, dst: int, payload: bytes) -> bytes:
    """An IPv4/TCP frame whose checksum field holds the pseudo-header sum (csum_blank)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 0x50, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
        bytes([10, 0, 0, src]), bytes([10, 0, 0, dst]),
    )  # fmt: skip
    return frame(dst, src, 14)[:12] + b"\x08\x00" + ip + tcp


@asynccontextmanager
async def netfronts(
    stack: AsyncExitStack, doms: dict[int, Domain], xs: XenstoreClient, domids: tuple[int, ...]
) -> AsyncIterator[list[Netfront]]:
    fronts = []
    for domid in domids:
        f = await stack.enter_async_context(attach(doms[domid], xs, DeviceId("vif", domid, 0, 0)))
        await f.wait_connected()
        fronts.append(f)
    yield fronts


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_netfront_guests_unaffected_by_a_hostile_guest(
    xenstored: Xenstored, transport: str
) -> None:
    with trio.fail_after(60):
        guests = {1: 4096, 2: 65536, 3: 4096}
        async with (
            netback(xenstored, transport, guests) as (xs, doms, vifs, sw),
            AsyncExitStack() as stack,
            netfronts(stack, doms, xs, (1, 2)) as (a, b),
        ):
            hostile: StubFront = front(xs, doms, 3)
            await hostile.connect()

            async def exchange(seq: int) -> None:
                plain = frame(1, 2, 1500, seq)
                await a.send(plain)
                assert (await b.receive()).frame == plain
                big = tcp_frame(2, 1, bytes(range(256)) * 200)  # 51 KiB, TSO
                gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
                await b.send(big, gso=gso, csum_blank=True)
                got = await a.receive()
                assert got.frame == big and got.csum_blank
                assert got.gso is not None and (got.gso.size, got.gso.gso_type) == (1448, 1)

            await exchange(0)
            for n, misbehave in enumerate(FATAL.values()):
                misbehave(hostile.queues[0])
                await vifs[3].wait_until(lambda v: v.fatal is not None)
                assert "vif3.0" not in sw.core.ports
                await exchange(n + 1)
                await hostile.reconnect()
                await vifs[3].wait_until(lambda v: v.connected)
            assert vifs[1].fatal is None and vifs[2].fatal is None
            assert vifs[1].stats().tx_errors == 0 and vifs[2].stats().tx_errors == 0
