"""The netif control ring between netfront and netback (io/netif.h; `xenpv.abi.netif_ctrl`):
a multi-queue guest sets a Toeplitz key, hash types and a mapping table through the ring, and
every TCP flow sent to it arrives on the rx queue the table names for the flow's hash; a bad
request is refused with the header's status."""

from __future__ import annotations

import struct
from contextlib import AsyncExitStack

import pytest
import trio

from frontends.netfront import NetfrontError, attach
from tests.integration.conftest import Xenstored
from tests.integration.test_netback import mac, netback
from xenpv.abi import netif_ctrl
from xenpv.abi.netif_ctrl import ALL_HASH_FLAGS, CtrlStatus, CtrlType, HashFlags
from xenpv.xenbus.core import DeviceId

KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)  # the RSS verification key
MAPPING = [3, 2, 1, 0, 0, 1, 2, 3, 1, 1, 3, 3, 0, 2, 0, 2]


def tcp_frame(src: int, dst: int, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 65535, 0, 0) + bytes(32)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
        bytes([10, 0, 0, src]), bytes([10, 0, 0, dst]),
    )  # fmt: skip
    return mac(dst) + mac(src) + b"\x08\x00" + ip + tcp


def expected_queue(frame: bytes) -> int:
    found = netif_ctrl.hash_input(frame, ALL_HASH_FLAGS)
    assert found is not None and found[1] == HashFlags.IPV4_TCP
    return MAPPING[netif_ctrl.toeplitz_hash(KEY, found[0]) % len(MAPPING)]


async def test_rx_steered_by_the_hash_the_frontend_set(xenstored: Xenstored) -> None:
    with trio.fail_after(60):
        async with (
            netback(xenstored, "socket", {1: 4096, 2: 4096}) as (xs, doms, _vifs, _switch),
            AsyncExitStack() as stack,
        ):
            sender = await stack.enter_async_context(
                attach(doms[1], xs, DeviceId("vif", 1, 0, 0), max_queues=1)
            )
            guest = await stack.enter_async_context(
                attach(doms[2], xs, DeviceId("vif", 2, 0, 0), max_queues=4)
            )
            await sender.wait_connected()
            await guest.wait_connected()
            assert guest.info.queues == 4
            assert await xs.read_text(f"{guest.device.backend}/feature-ctrl-ring") == "1"

            # What the backend supports, asked as Linux frontends ask.
            flags = await guest.control(CtrlType.GET_HASH_FLAGS)
            assert (flags.status, flags.data) == (CtrlStatus.SUCCESS, int(ALL_HASH_FLAGS))
            size = await guest.control(CtrlType.GET_HASH_MAPPING_SIZE)
            assert size.status == CtrlStatus.SUCCESS and size.data >= len(MAPPING)
            # Flags before an algorithm, a queue number past the queues: refused.
            early = await guest.control(CtrlType.SET_HASH_FLAGS, (int(HashFlags.IPV4), 0, 0))
            assert early.status == CtrlStatus.INVALID_PARAMETER
            unknown = await guest.control(CtrlType.ADD_GREF_MAPPING)
            assert unknown.status == CtrlStatus.NOT_SUPPORTED
            with pytest.raises(NetfrontError, match="SET_HASH_MAPPING refused: INVALID_PARAMETER"):
                await guest.set_hash(key=KEY, flags=ALL_HASH_FLAGS, mapping=[0, 4])

            await guest.set_hash(key=KEY, flags=ALL_HASH_FLAGS, mapping=MAPPING)
            frames = [tcp_frame(1, 2, 40000 + n, 5001) for n in range(32)]
            assert len({expected_queue(f) for f in frames}) == 4  # every queue is used
            for f in frames:
                await sender.send(f)
            for _ in frames:
                received = await guest.receive()
                assert received.queue == expected_queue(received.frame)
