"""The coherence rule on the socket transport, including the ring.h Dekker race.

A consumer re-arms its event index then re-checks the producer index; the producer publishes
its index then reads the event index. With replicas, both reads can be stale and nobody
notifies: a deadlock. The runtime's rule: replica writes ship at the end of the current
batch, and a page update arriving from a peer raises every port bound to that peer that is not
already pending (a spurious event; drivers always re-check). These tests build the stale
interleaving deterministically in one process.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import trio

from tests.integration.hv_pair import domains
from xenpv.hv import (
    CopyDirection,
    CopyOp,
    Domain,
    EventChannel,
    GrantMapping,
    Message,
    Msg,
    Page,
    Verdict,
)

PROD, EVENT = 0, 4


def put(buf: object, off: int, value: int) -> None:
    view = buf.view  # type: ignore[attr-defined]
    struct.pack_into("<I", view, off, value)
    buf.written(off, 4)  # type: ignore[attr-defined]


def get(buf: object, off: int) -> int:
    return int(struct.unpack_from("<I", buf.view, off)[0])  # type: ignore[attr-defined]


class OnePageRing(NamedTuple):
    """Domain 1 (the producer) grants `page` and offers `producer_port`; domain 0 (the
    consumer) maps it as `ring` and binds `consumer_port` to it."""

    page: Page
    gref: int
    producer_port: EventChannel
    ring: GrantMapping
    consumer_port: EventChannel


async def one_page_ring(back: Domain, front: Domain) -> OnePageRing:
    page = front.alloc_pages(1)[0]  # producer (frontend) owns the page
    gref = front.grants.grant_access(0, page.frame)
    producer_port = await front.alloc_unbound(0)
    ring = await back.map_grants(1, [gref])  # consumer (backend) maps it
    consumer_port = await back.bind_interdomain(1, producer_port.port)
    return OnePageRing(page, gref, producer_port, ring, consumer_port)


@pytest.mark.parametrize("coherence_events", [True, False], ids=["rule", "without-rule"])
async def test_dekker_race_needs_update_events(tmp_path: Path, coherence_events: bool) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix", coherence_events=coherence_events) as (
            back,
            front,
        ):
            page, gref, _, ring, consumer_port = await one_page_ring(back, front)

            # No checkpoint between these lines: every read below sees a stale replica.
            put(ring, EVENT, 1)  # consumer: wake me when prod reaches 1
            assert get(ring, PROD) == 0  # consumer re-checks: nothing yet -> will sleep
            put(page, PROD, 1)  # producer publishes a request
            assert get(page, EVENT) == 0  # producer reads a stale event index: no notify

            # A copy round trip: its reply travels behind the producer's UPDATE on the ordered
            # link, so once it returns the write has been applied to the replica.
            buf = bytearray(4)
            await back.grant_copy(
                [CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 4, memoryview(buf))]
            )
            assert get(ring, PROD) == 1
            if coherence_events:
                # The update raised the consumer's port: it wakes and re-checks the ring.
                await consumer_port.wait()
            else:
                # Nothing will ever wake the consumer: this is the deadlock the rule prevents.
                assert not consumer_port.pending
            await ring.unmap()


async def test_writes_arrive_in_order_before_notify(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            page, _, port, ring, channel = await one_page_ring(back, front)
            for value in range(1, 200):
                put(page, 100, value)  # payload first
                put(page, PROD, value)  # then the index
                port.notify()
                await channel.wait()
                # the index is never ahead of the payload
                assert get(ring, PROD) <= get(ring, 100)
            # the mapper's writes travel back the same way
            put(ring, 200, 7)
            channel.notify()
            await port.wait()
            assert get(page, 200) == 7


class WriteAfterMapReply:
    """Fault-seam spy: the granter writes its page right after sending a MAP reply, so the
    UPDATE travels in the same batch as the reply."""

    def __init__(self) -> None:
        self.page: Any = None

    def on_send(self, src: int, dst: int, message: Message) -> Verdict | None:
        if src == 1 and message.kind == Msg.REPLY and self.page is not None:
            page, self.page = self.page, None
            page.view[0] = 0x5A
            page.written(0, 1)
        return None


async def test_update_right_after_map_reply_reaches_the_new_mapping(tmp_path: Path) -> None:
    spy = WriteAfterMapReply()
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix", faults=spy) as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            await back.connect(1)
            spy.page = page
            mapping = await back.map_grants(1, [gref])
            buf = bytearray(1)
            copy = CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 1, memoryview(buf))
            await back.grant_copy([copy])  # a round trip: the UPDATE has been applied
            assert bytes(buf) == b"\x5a"
            assert mapping.view[0] == 0x5A
