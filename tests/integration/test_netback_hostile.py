"""Hostile frontends: netback drops or disables only the offending vif; other guests carry on.

Guest 1 misbehaves; guests 2 and 3 exchange frames before, during and after. Slot counts
follow Linux netback (`xenvif_count_requests`): up to 19 slots per packet are served, 20 and
21 are dropped with NETIF_RSP_ERROR on every slot, 22 or more disable the vif.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from backends.netback import Vif
from backends.switch import LiveSwitch
from tests.integration.conftest import Xenstored
from tests.integration.test_netback import TRANSPORTS, StubFront, StubQueue, frame, front, netback
from xenpv.abi.netif import (
    NETIF_RSP_ERROR,
    NetifTxRequest,
    NETTXF_extra_info,
    NETTXF_more_data,
    encode_tx_request,
)
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.xenbus.core import Connected
from xenpv.xenbus.handshake import read_state
from xenpv.xenstore.client import XenstoreClient

TIMEOUT = 30


def slots_of(
    q: StubQueue,
    data: bytes,
    sizes: list[int],
    *,
    offsets: list[int] | None = None,
    first_size: int | None = None,
    gref: int | None = None,
) -> list[bytes]:
    """A packet whose fragments have `sizes`, each on its own data page."""
    out = []
    at = 0
    for n, size in enumerate(sizes):
        page, own_gref = q.data[n]
        offset = offsets[n] if offsets else 0
        chunk = data[at : at + min(size, 4096 - offset)]  # a hostile slot may run past its page
        page.view[offset : offset + len(chunk)] = chunk
        page.written(offset, len(chunk))
        at += size
        flags = NETTXF_more_data if n < len(sizes) - 1 else 0
        total = first_size if first_size is not None else sum(sizes)
        request = NetifTxRequest(
            own_gref if gref is None else gref, offset, flags, q.next_id, total if n == 0 else size
        )
        q.next_id += 1
        out.append(encode_tx_request(request))
    return out


async def exchange(b: StubFront, c: StubFront, seq: int) -> None:
    """Guests 2 and 3 still talk to each other."""
    there = frame(2, 3, 1500, seq)
    assert await b.send(there) == [0]
    assert (await c.receive()).data == there
    back = frame(3, 2, 9000, seq + 1)
    assert await c.send(back) == [0, 0, 0]
    assert (await b.receive()).data == back


def corrupt_tx_prod(q: StubQueue) -> None:
    struct.pack_into("<I", q.tx_page.view, 0, q.tx.req_prod_pvt + 1000)
    q.tx_page.written(0, 4)
    assert q.chan_tx is not None
    q.chan_tx.notify()


def fatal_cases() -> dict[str, Callable[[StubQueue], None]]:
    def cross_frag(q: StubQueue) -> None:
        q.put_raw(slots_of(q, bytes(300), [200, 100], offsets=[0, 4000]))

    def cross_first(q: StubQueue) -> None:
        q.put_raw(slots_of(q, bytes(200), [200], offsets=[3950]))

    def slots22(q: StubQueue) -> None:
        q.put_raw(slots_of(q, frame(1, 2, 2200), [100] * 22))

    def missing_extra(q: StubQueue) -> None:
        q.put_raw([encode_tx_request(NetifTxRequest(q.data[0][1], 0, NETTXF_extra_info, 1, 60))])

    def bad_gso(q: StubQueue) -> None:
        first = encode_tx_request(NetifTxRequest(q.data[0][1], 0, NETTXF_extra_info, 1, 60))
        q.put_raw([first, bytes([1, 0, 0, 0, 1, 0, 0, 0])])  # GSO of size 0

    return {
        "fragment-crosses-4k": cross_frag,
        "first-slot-crosses-4k": cross_first,
        "22-slots": slots22,
        "bogus-tx-req-prod": corrupt_tx_prod,
        "missing-extra": missing_extra,
        "gso-size-0": bad_gso,
    }


FATAL = fatal_cases()


@asynccontextmanager
async def three_guests(
    xenstored: Xenstored, transport: str
) -> AsyncIterator[
    tuple[
        XenstoreClient,
        dict[int, Vif],
        LiveSwitch[VirtioNetHdr],
        tuple[StubFront, StubFront, StubFront],
    ]
]:
    """netback serving guests 1 (the hostile one), 2 and 3, each stub frontend connected."""
    async with netback(xenstored, transport, {1: 4096, 2: 4096, 3: 4096}) as (
        xs,
        doms,
        vifs,
        switch,
    ):
        fronts = (front(xs, doms, 1), front(xs, doms, 2), front(xs, doms, 3))
        for f in fronts:
            await f.connect()
        yield xs, vifs, switch, fronts


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_fatal_errors_disable_only_that_vif(xenstored: Xenstored, transport: str) -> None:
    """Each fatal case in turn: the vif goes down alone, and comes back on reconnect."""
    with trio.fail_after(TIMEOUT * 2):
        async with three_guests(xenstored, transport) as (xs, vifs, sw, (a, b, c)):
            await exchange(b, c, 0)
            for n, (case, misbehave) in enumerate(FATAL.items()):
                misbehave(a.queues[0])
                await vifs[1].wait_until(lambda v: v.fatal is not None)
                assert vifs[1].fatal is not None, case
                assert "vif1.0" not in sw.core.ports  # carrier off
                assert await read_state(xs, a.device.backend) == Connected  # the vif stays
                for seq in range(2, 6, 2):
                    await exchange(b, c, seq)
                assert vifs[2].fatal is None and vifs[3].fatal is None

                # The frontend starts over on new rings: the vif works again.
                await a.reconnect()
                await vifs[1].wait_until(lambda v: v.connected)
                assert vifs[1].connections == n + 2 and vifs[1].fatal is None
                data = frame(1, 2, 5000, n)
                assert await a.send(data) == [0, 0]
                assert (await b.receive()).data == data


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_bogus_rx_index_disables_only_that_vif(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with three_guests(xenstored, transport) as (_, vifs, sw, (a, b, c)):
            learn = frame(1, 2, 60)  # the switch learns guest 1's address
            assert await a.send(learn) == [0]
            assert (await b.receive()).data == learn
            assert (await c.receive()).data == learn  # flooded: guest 2 was unknown too
            q = a.queues[0]
            struct.pack_into("<I", q.rx_page.view, 0, q.rx.req_prod_pvt + 5000)
            q.rx_page.written(0, 4)
            assert await b.send(frame(2, 1, 100)) == [0]  # rx work for vif1 finds the ring broken
            await vifs[1].wait_until(lambda v: v.fatal is not None)
            assert "bogus ring requests" in (vifs[1].fatal or "")
            assert "vif1.0" not in sw.core.ports
            await exchange(b, c, 0)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dropped_packets_keep_the_vif(xenstored: Xenstored, transport: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with three_guests(xenstored, transport) as (_, vifs, _, (a, b, c)):
            await exchange(b, c, 0)  # the switch knows guests 2 and 3 from here on
            q = a.queues[0]

            async def send_raw(slots: list[bytes]) -> list[int]:
                q.put_raw(slots)
                return [s for _i, s in await q.tx_responses(len(slots))]

            # 19 slots: served like any packet.
            nineteen = frame(1, 2, 1900, 19)
            assert await send_raw(slots_of(q, nineteen, [100] * 19)) == [0] * 19
            assert (await b.receive()).data == nineteen
            # 20 and 21 slots: every slot answered ERROR, nothing delivered.
            for count in (20, 21):
                assert (
                    await send_raw(slots_of(q, frame(1, 2, 100 * count), [100] * count))
                    == [NETIF_RSP_ERROR] * count
                )
            # A grant reference the frontend never granted.
            assert await send_raw(slots_of(q, frame(1, 2, 600), [600], gref=7777)) == [
                NETIF_RSP_ERROR
            ]
            # A bad grant in the middle of a chain: the whole packet is dropped.
            good, bad = slots_of(q, frame(1, 2, 700), [500, 200])
            bad = encode_tx_request(NetifTxRequest(7777, 0, 0, q.next_id - 1, 200))
            assert await send_raw([good, bad]) == [NETIF_RSP_ERROR] * 2
            # A runt, and fragments larger than the packet ("first->size overflowed").
            assert await send_raw(slots_of(q, bytes(8), [8])) == [NETIF_RSP_ERROR]
            oversize = slots_of(q, frame(1, 2, 300), [100, 100, 100], first_size=150)
            assert await send_raw(oversize) == [NETIF_RSP_ERROR] * 3
            await exchange(b, c, 2)

            # The vif is still up; the next good frame is the next thing guest 2 receives.
            after = frame(1, 2, 3000, 77)
            assert await a.send(after) == [0]
            assert (await b.receive()).data == after
            stats = vifs[1].stats()
            assert vifs[1].fatal is None and stats.tx_packets == 2
            assert (
                stats.tx_errors == 6 and stats.tx_too_many_slots == 2 and stats.tx_copy_errors == 2
            )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_garbage_tx_slots(xenstored: Xenstored, transport: str) -> None:
    """Seeded garbage on the tx ring: every round ends with all slots answered or a fatal
    error naming a protocol rule (never an internal error); other guests are untouched."""
    rng = random.Random(6)
    outcomes: list[str | None] = []
    with trio.fail_after(TIMEOUT * 2):
        async with three_guests(xenstored, transport) as (_, vifs, _, (a, b, c)):
            for round_ in range(8):
                q = a.queues[0]
                grefs = [gref for _page, gref in q.data] + [0, 7777]
                slots = []
                for _ in range(rng.randrange(1, 40)):
                    raw = bytearray(rng.randbytes(12))
                    if rng.random() < 0.95:  # mostly plausible grants, flags and sizes
                        struct.pack_into("<I", raw, 0, rng.choice(grefs))
                        struct.pack_into("<H", raw, 4, rng.choice([0, 0, 100, 2000]))
                        struct.pack_into("<H", raw, 6, rng.choice([0, 0, 0, 1, 2, 4, 4, 4, 8]))
                        struct.pack_into("<H", raw, 10, rng.randrange(0, 2000))
                    slots.append(bytes(raw))
                q.put_raw(slots)

                async with trio.open_nursery() as race:

                    async def answered(q: StubQueue = q, n: int = len(slots)) -> None:
                        await q.tx_responses(n)
                        race.cancel_scope.cancel()

                    async def disabled() -> None:
                        await vifs[1].wait_until(lambda v: v.fatal is not None)
                        race.cancel_scope.cancel()

                    race.start_soon(answered)
                    race.start_soon(disabled)
                outcomes.append(vifs[1].fatal)
                if vifs[1].fatal is not None:
                    assert "internal error" not in vifs[1].fatal
                await exchange(b, c, 10 * round_)
                await a.reconnect()
                await vifs[1].wait_until(lambda v: v.connected)
            assert None in outcomes and len(set(outcomes)) > 2  # answered rounds and fatal ones
