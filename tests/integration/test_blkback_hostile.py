"""Hostile frontends: every bad request is answered with an error, a broken ring closes that
device only, and another guest's I/O on the same backend carries on throughout."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from backends.blkback import BlkbackDevice
from tests.integration.conftest import Xenstored
from tests.integration.test_blkback import (
    TRANSPORT_IDS,
    TRANSPORTS,
    MiniFront,
    backend,
    pattern,
    setup,
    vbd,
    wait_backend,
)
from xenpv.abi.blkif import (
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifRequest,
    BlkifSegment,
    encode_indirect_pages,
)
from xenpv.abi.ring import OFF_REQ_PROD
from xenpv.toolstack.devices import VbdConfig, create_vbd, destroy_device
from xenpv.xenbus.core import Closing, Connected, InitWait

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)

_HEAD = struct.Struct("<BBHxxxxQQ")  # native blkif_request header
_SEG = struct.Struct("<IBBxx")


def raw_request(op: int, nr: int, id: int, sector: int, segs: list[tuple[int, int, int]]) -> bytes:
    data = _HEAD.pack(op, nr, 0, id, sector) + b"".join(_SEG.pack(*s) for s in segs)
    return data.ljust(112, b"\0")


class GoodGuest:
    """Streams tagged writes and read-backs until told to stop; counts verified rounds."""

    def __init__(self, front: MiniFront) -> None:
        self.front = front
        self.rounds = 0
        self.progress = trio.Event()

    async def run(self, stop: trio.Event) -> None:
        tag = 0
        while not stop.is_set():
            tag += 1
            offset = (tag % 16) * 65536
            data = pattern(1000 + tag, 16384)
            assert await self.front.write(offset, data, page=0) == BLKIF_RSP_OKAY
            assert await self.front.read(offset, len(data), page=8) == data
            self.rounds += 1
            self.progress.set()

    async def wait_rounds(self, n: int) -> None:
        target = self.rounds + n
        while self.rounds < target:
            self.progress = trio.Event()
            await self.progress.wait()


async def test_hostile_requests_and_broken_ring(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(60):
        async with (
            setup(xenstored, xs_workdir, transport, VbdConfig(None, 2 << 20), (0, 1, 2)) as (
                xs,
                (dom0, dom1, dom2),
            ),
            trio.open_nursery() as nursery,
        ):
            bad_dev = BlkbackDevice(dom0, xs, vbd(1))
            nursery.start_soon(bad_dev.run)
            good_dev = BlkbackDevice(dom0, xs, vbd(2))
            nursery.start_soon(good_dev.run)

            good = GoodGuest(MiniFront(dom2, xs, vbd(2), npages=32))
            await good.front.start()
            bad = MiniFront(dom1, xs, vbd(1), persistent=True, npages=32)
            await bad.start()
            stop = trio.Event()
            nursery.start_soon(good.run, stop)

            g = bad.grefs[0]
            nid = bad.next_id
            expect = [
                # garbage operations: RESERVED_1, unknown codes
                (raw_request(4, 1, nid(), 0, [(g, 0, 7)]), BLKIF_RSP_EOPNOTSUPP),
                (raw_request(7, 1, nid(), 0, [(g, 0, 7)]), BLKIF_RSP_EOPNOTSUPP),
                (raw_request(255, 0, nid(), 0, []), BLKIF_RSP_EOPNOTSUPP),
                # segment counts: none, too many for a direct request
                (raw_request(BLKIF_OP_READ, 0, nid(), 0, []), BLKIF_RSP_ERROR),
                (raw_request(BLKIF_OP_WRITE, 12, nid(), 0, [(g, 0, 7)] * 11), BLKIF_RSP_ERROR),
                # sectors within the frame: first > last, last beyond the 4 KiB frame
                (raw_request(BLKIF_OP_READ, 1, nid(), 0, [(g, 5, 3)]), BLKIF_RSP_ERROR),
                (raw_request(BLKIF_OP_READ, 1, nid(), 0, [(g, 0, 8)]), BLKIF_RSP_ERROR),
                # out of the device, at the very end of the sector space
                (raw_request(BLKIF_OP_READ, 1, nid(), 4096, [(g, 0, 0)]), BLKIF_RSP_ERROR),
                (raw_request(BLKIF_OP_WRITE, 1, nid(), 2**64 - 1, [(g, 0, 7)]), BLKIF_RSP_ERROR),
                # grants: never issued, outside the table
                (raw_request(BLKIF_OP_READ, 1, nid(), 0, [(7000, 0, 7)]), BLKIF_RSP_ERROR),
                (raw_request(BLKIF_OP_WRITE, 1, nid(), 0, [(2**32 - 1, 0, 7)]), BLKIF_RSP_ERROR),
            ]
            responses = await bad.run([r for r, _ in expect])
            assert [r.status for r in responses] == [s for _, s in expect]
            assert [r.id for r in responses] == [
                int.from_bytes(r[8:16], "little") for r, _ in expect
            ]

            # a grant made out to another domain (dom2), and a read into a read-only grant
            other = dom1.alloc_pages(2)
            to_dom2 = dom1.grants.grant_access(2, other[0].frame)
            read_only = dom1.grants.grant_access(0, other[1].frame, readonly=True)
            seg_other = (BlkifSegment(to_dom2, 0, 7),)
            seg_ro = (BlkifSegment(read_only, 0, 7),)
            assert await bad.one(BlkifRequest(BLKIF_OP_WRITE, nid(), 0, seg_other)) == -1
            assert await bad.one(BlkifRequest(BLKIF_OP_READ, nid(), 0, seg_ro)) == -1
            # ... while writing *from* a read-only grant is fine
            assert await bad.one(BlkifRequest(BLKIF_OP_WRITE, nid(), 0, seg_ro)) == 0

            # indirect: bad pages, bad descriptors inside, bad indirect_op, too many segments
            page = dom1.alloc_pages(1)[0]
            iref = dom1.grants.grant_access(0, page.frame)
            page.view[:4096] = encode_indirect_pages([BlkifSegment(g, 6, 2)] * 3)[0]
            page.written(0, 4096)
            raw_indirect = bytearray(
                bad.protocol.encode_request(
                    BlkifIndirectRequest(BLKIF_OP_READ, nid(), 0, 3, (iref,))
                )
            )
            raw_indirect[1] = 3  # indirect_op FLUSH_DISKCACHE: only READ/WRITE may be wrapped
            indirect_cases = [
                BlkifIndirectRequest(BLKIF_OP_READ, nid(), 0, 3, (iref,)),
                BlkifIndirectRequest(BLKIF_OP_READ, nid(), 0, 3, (6999,)),
                BlkifIndirectRequest(BLKIF_OP_WRITE, nid(), 0, 300, (iref,)),
                BlkifIndirectRequest(BLKIF_OP_WRITE, nid(), 0, 0, (iref,)),
            ]
            for request in indirect_cases:
                assert await bad.one(request) == BLKIF_RSP_ERROR, request
            (resp,) = await bad.run([bytes(raw_indirect)])
            assert resp.status == BLKIF_RSP_ERROR
            assert await bad.one(BlkifDiscardRequest(nid(), 4000, 200)) == BLKIF_RSP_ERROR

            # the hostile device still works for honest requests
            assert await bad.write(0, pattern(7, 8192), page=2) == BLKIF_RSP_OKAY
            assert await bad.read(0, 8192, page=10) == pattern(7, 8192)
            await good.wait_rounds(2)

            # bogus ring indexes: req_prod far ahead of what the ring can hold
            q = bad.queues[0]
            struct.pack_into("<I", q.buffer.view, OFF_REQ_PROD, (q.ring.req_prod_pvt + 1000))
            q.buffer.written(OFF_REQ_PROD, 4)
            q.channel.notify()
            assert await wait_backend(xs, vbd(1), Closing) == Closing
            assert bad_dev.broken is not None and "bogus ring requests" in bad_dev.broken
            assert bad_dev.connection is None
            await good.wait_rounds(3)  # the other guest never noticed
            assert good_dev.connection is not None and good_dev.broken is None
            stop.set()
            nursery.cancel_scope.cancel()


async def test_hostile_handshake_keys(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """Bad ring keys: xenbus_dev_fatal (Closing) for that device; the other one connects."""
    cases: list[tuple[int, dict[str, str | int]]] = [
        (1, {"ring-ref": "abc"}),
        (1, {"ring-ref": 7000}),  # a grant never issued
        (1, {"event-channel": 999}),  # no such unbound port
        (1, {"protocol": "pdp11-abi"}),
        (1, {"multi-queue-num-queues": 9}),
        (1, {"ring-page-order": 9}),
        (2, {"queue-1/ring-ref": 7000}),  # queue 0 fine, queue 1 not: undo queue 0
        (2, {"queue-1/event-channel": "queue-0"}),
    ]
    with trio.fail_after(60):
        async with (
            setup(xenstored, xs_workdir, transport, VbdConfig(None, 1 << 20), (0, 1, 2)) as (
                xs,
                (dom0, dom1, dom2),
            ),
            backend(xs, dom0, vbd(2)),
        ):
            good = MiniFront(dom2, xs, vbd(2), npages=8)
            await good.start()
            for queues, keys in cases:
                device = vbd(1)
                await destroy_device(xs, device)
                await create_vbd(xs, device, VbdConfig(None, 1 << 20))
                front = MiniFront(dom1, xs, device, npages=1, queues=queues)
                # publish the lie before Initialised, in the same transaction
                async with backend(xs, dom0, device) as dev:
                    await front.setup(extra=keys)
                    state = await wait_backend(xs, device, Connected, Closing)
                    assert state == Closing, keys
                    assert dev.connection is None
                assert await good.write(0, pattern(9, 4096)) == BLKIF_RSP_OKAY
                assert await good.read(0, 4096, page=4) == pattern(9, 4096)


async def test_bad_toolstack_configuration(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """Unservable `xenpv-*` keys: the device goes Closing instead of advertising nonsense."""
    with trio.fail_after(30):
        async with setup(xenstored, xs_workdir, transport, VbdConfig(None, 1 << 20)) as (
            xs,
            (dom0, _dom1),
        ):
            device = vbd(1)
            await xs.write(f"{device.backend}/xenpv-max-queues", "0")
            async with backend(xs, dom0, device) as dev:
                assert await wait_backend(xs, device, InitWait, Closing) == Closing
                assert await xs.try_read(f"{device.backend}/multi-queue-max-queues") is None
                assert dev.connection is None


async def test_fuzzed_slots_each_get_one_answer(
    xenstored: Xenstored, xs_workdir: Path, transport: str, kind: str
) -> None:
    """Hundreds of random slots (plausible ops and counts, grefs good and bad, sectors around
    the end of the disk): every one is answered exactly once with a blkif status, and the
    device keeps serving honest I/O afterwards."""
    rng = random.Random(5)
    with trio.fail_after(60):
        async with (
            setup(xenstored, xs_workdir, transport, VbdConfig(None, 1 << 20)) as (
                xs,
                (dom0, dom1),
            ),
            backend(xs, dom0, vbd(1)) as dev,
        ):
            front = MiniFront(dom1, xs, vbd(1), persistent=True, npages=16)
            await front.start()
            grefs = [*front.grefs, 0, 1, 7000, 2**32 - 1]
            for _batch in range(20):
                slots = []
                for _ in range(16):
                    op = rng.choice([0, 1, 1, 2, 3, 4, 5, 6, rng.randrange(256)])
                    nseg = rng.choice([0, 1, 2, 11, 12, rng.randrange(256)])
                    sector = rng.choice([0, 8, 2040, 2047, 2048, rng.randrange(2**64)])
                    segs = []
                    for _ in range(min(nseg, 11)):
                        first = rng.choice([0, 0, 3, 7, rng.randrange(256)])
                        last = rng.choice([7, first, first + 1, rng.randrange(256)]) & 0xFF
                        segs.append((rng.choice(grefs), first, last))
                    slot = bytearray(raw_request(op, nseg, front.next_id(), sector, segs))
                    if rng.random() < 0.2:  # garbage in the tail too
                        slot[24:] = rng.randbytes(len(slot) - 24)
                    slots.append(bytes(slot))
                responses = await front.run(slots)
                assert all(r.status in (0, -1, -2) for r in responses)
                assert front.queues[0].responses == {}  # no extra, no duplicate answers
            assert dev.broken is None and dev.connection is not None
            assert await front.write(0, pattern(8, 8192)) == BLKIF_RSP_OKAY
            assert await front.read(0, 8192, page=4) == pattern(8, 8192)
