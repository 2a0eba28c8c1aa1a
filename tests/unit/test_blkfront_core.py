"""The blkfront engine (frontends/blkfront/core.py) against an in-memory blkif backend.

The backend here is a minimal sans-IO blkback: it reads the guest's grant table and memory
directly (as the shared-memory transport lets a real backend do), so every request the
engine builds is decoded by the real codec and checked against the guest's grants.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.blkfront.core import BlkIo, Engine, Negotiated
from frontends.blkfront.errors import BlkfrontProtocolError
from xenpv.abi.blkif import (
    BLKIF_ARM,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifRequest,
    BlkifResponse,
    decode_indirect_pages,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.hv.grant import GrantTable
from xenpv.hv.memory import DomainMemory, Page

GUEST, BACKEND = 1, 0


class Backend:
    """Serves the rings of one connection from `disk`; records what it saw."""

    def __init__(
        self,
        memory: DomainMemory,
        grants: GrantTable,
        pages: list[Page],
        disk: bytearray,
        *,
        indirect: int,
        sector_size: int = 512,
    ) -> None:
        self.memory, self.grants, self.disk = memory, grants, disk
        self.rings = [BackRing(p, BLKIF_ARM.ring_layout) for p in pages]
        self.indirect = indirect
        self.sector_size = sector_size
        self.ops: list[int] = []
        self.max_segments = 0

    def frame(self, gref: int, write: bool) -> int:
        status, frame, _ = self.grants.check(gref, BACKEND, write)
        assert status == 0, f"grant {gref}: status {status}"
        return frame

    def serve(self, q: int, limit: int | None = None, *, respond: bool = True) -> int:
        ring = self.rings[q]
        served = 0
        while (limit is None or served < limit) and (raw := ring.take_request()) is not None:
            req = BLKIF_ARM.decode_request(raw, max_indirect_segments=self.indirect)
            served += 1
            self.ops.append(req.operation)
            status = BLKIF_RSP_OKAY
            if isinstance(req, BlkifIndirectRequest):
                pages = [
                    bytes(self.memory.view[self.frame(g, False) * 4096 :][:4096])
                    for g in req.indirect_grefs
                ]
                segs = decode_indirect_pages(pages, req)
                op = req.indirect_op
            elif isinstance(req, BlkifDiscardRequest):
                start = req.sector_number * 512
                self.disk[start : start + req.nr_sectors * 512] = bytes(req.nr_sectors * 512)
                segs, op = (), BLKIF_OP_DISCARD
            else:
                segs, op = req.segments, req.operation
            self.max_segments = max(self.max_segments, len(segs))
            position = req.sector_number * 512
            if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
                total = sum(s.nr_sectors for s in segs) * 512
                assert position % self.sector_size == 0 and total % self.sector_size == 0
            for seg in segs:
                at = self.frame(seg.gref, op == BLKIF_OP_READ) * 4096 + seg.first_sect * 512
                n = seg.nr_sectors * 512
                if op == BLKIF_OP_READ:
                    self.memory.view[at : at + n] = self.disk[position : position + n]
                else:
                    self.disk[position : position + n] = self.memory.view[at : at + n]
                position += n
            if respond:
                ring.put_response(
                    BLKIF_ARM.encode_response(BlkifResponse(req.id, req.operation, status))
                )
        ring.push_responses()
        return served


@dataclass
class Guest:
    memory: DomainMemory
    grants: GrantTable
    engine: Engine

    def connect(
        self,
        *,
        disk: bytearray,
        queues: int = 1,
        order: int = 0,
        indirect: int = 0,
        persistent: bool = False,
        sector_size: int = 512,
        flush: bool = True,
    ) -> Backend:
        pages = [self.memory.alloc_buffer(1 << order) for _ in range(queues)]
        rings = [FrontRing(p, BLKIF_ARM.ring_layout) for p in pages]
        neg = Negotiated(
            protocol=BLKIF_ARM,
            queues=queues,
            ring_page_order=order,
            sectors=len(disk) // 512,
            sector_size=sector_size,
            persistent=persistent,
            indirect_segments=indirect,
            flush_op=int(BLKIF_OP_FLUSH_DISKCACHE) if flush else None,
            discard=True,
        )
        self.engine.connect(neg, rings)
        self.ring_pages = pages
        return Backend(
            self.memory, self.grants, pages, disk, indirect=indirect, sector_size=sector_size
        )

    def drop(self) -> None:
        self.engine.disconnect()
        self.memory.free_pages(self.ring_pages)


def guest(page_size: int) -> Guest:
    memory = DomainMemory(GUEST, 16 << 20, page_size, 8192)
    grants = GrantTable(GUEST, memory.table, 8192, memory.nr_frames)
    return Guest(memory, grants, Engine(memory, grants, BACKEND))


def run(g: Guest, backend: Backend) -> list[BlkIo]:
    done: list[BlkIo] = []
    for _ in range(1000):
        g.engine.dispatch()
        done += g.engine.take_finished()
        served = sum(backend.serve(q) for q in range(len(backend.rings)))
        for q in range(len(backend.rings)):
            done += g.engine.poll(q)
        if not served and not g.engine.pending:
            return done
    raise AssertionError("no progress")


def io(op: int, offset: int, length: int, page_size: int, data: bytes = b"") -> BlkIo:
    return BlkIo(op, offset // 512, length, offset % page_size, data or bytearray(length))


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
@pytest.mark.parametrize("persistent", [False, True])
def test_64k_io_without_indirect_uses_linked_requests(page_size: int, persistent: bool) -> None:
    g = guest(page_size)
    disk = bytearray(1 << 20)
    backend = g.connect(disk=disk, persistent=persistent)
    payload = random.Random(1).randbytes(65536)
    w = io(BLKIF_OP_WRITE, 65536, 65536, page_size, payload)
    g.engine.submit(w)
    assert run(g, backend) == [w] and w.status == 0
    assert disk[65536:131072] == payload
    assert backend.ops == [BLKIF_OP_WRITE, BLKIF_OP_WRITE] and backend.max_segments == 11
    r = io(BLKIF_OP_READ, 65536 + 512, 8192, page_size)
    g.engine.submit(r)
    assert run(g, backend) == [r] and bytes(r.data) == payload[512 : 512 + 8192]
    g.drop()
    assert g.grants.in_use() == 0  # every data, pool and ring grant was ended


def test_indirect_when_offered_and_flush_discard() -> None:
    g = guest(65536)
    disk = bytearray(2 << 20)
    backend = g.connect(disk=disk, indirect=256, order=2)
    w = io(BLKIF_OP_WRITE, 0, 1 << 20, 65536, bytes([7]) * (1 << 20))
    f = BlkIo(BLKIF_OP_FLUSH_DISKCACHE, 0, 0)
    d = BlkIo(BLKIF_OP_DISCARD, 8, 4096)
    for x in (w, f, d):
        g.engine.submit(x)
    assert run(g, backend) == [w, f, d]
    assert backend.ops == [BLKIF_OP_INDIRECT, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD]
    assert backend.max_segments == 256
    assert disk[:4096] == bytes([7]) * 4096 and disk[4096:8192] == bytes(4096)


def test_flush_without_support_completes_and_eopnotsupp_disables_it() -> None:
    g = guest(4096)
    backend = g.connect(disk=bytearray(1 << 16), flush=False)
    f = BlkIo(BLKIF_OP_FLUSH_DISKCACHE, 0, 0)
    g.engine.submit(f)
    assert run(g, backend) == [f] and f.status == 0 and backend.ops == []
    g.drop()
    backend = g.connect(disk=bytearray(1 << 16), flush=True)
    f = BlkIo(BLKIF_OP_FLUSH_DISKCACHE, 0, 0)
    g.engine.submit(f)
    g.engine.dispatch()
    req = backend.rings[0].take_request()
    assert req is not None
    backend.rings[0].put_response(
        BLKIF_ARM.encode_response(BlkifResponse(0, 3, BLKIF_RSP_EOPNOTSUPP))
    )
    backend.rings[0].push_responses()
    assert g.engine.poll(0) == [f] and f.status == BLKIF_RSP_EOPNOTSUPP
    assert g.engine.flush_op is None


def forged_answer_breaks_then_reissues(
    fill: bytes, forge: Callable[[BlkifRequest], BlkifResponse], error: str
) -> None:
    """A 4 KiB write of `fill` in flight, answered with `forge(its request)`: the poll raises
    a protocol error matching `error` and acknowledges nothing; after a reconnect the write
    is reissued and lands."""
    g = guest(4096)
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    w = io(BLKIF_OP_WRITE, 0, 4096, 4096, fill * 4096)
    g.engine.submit(w)
    g.engine.dispatch()
    raw = backend.rings[0].take_request()
    assert raw is not None
    request = BLKIF_ARM.decode_request(raw)
    assert isinstance(request, BlkifRequest)
    backend.rings[0].put_response(BLKIF_ARM.encode_response(forge(request)))
    backend.rings[0].push_responses()
    with pytest.raises(BlkfrontProtocolError, match=error):
        g.engine.poll(0)
    assert not w.done  # nothing acknowledged that the backend did not do
    g.drop()
    backend = g.connect(disk=disk)
    assert run(g, backend) == [w] and w.status == 0 and disk[:4096] == fill * 4096


def test_unknown_or_stale_response_id_is_a_protocol_error_and_recovery_reissues() -> None:
    forged_answer_breaks_then_reissues(
        b"\x55", lambda request: BlkifResponse(request.id + 1, 1, 0), "no pending request"
    )


def test_planted_lost_reissue_acknowledges_the_newest_unfinished_write_unwritten() -> None:
    """The test-only planted bug (docs/faults.md, "Simulation"): at a disconnect the newest
    unfinished write completes OKAY without reaching the disk; the others are re-issued."""
    memory = DomainMemory(GUEST, 16 << 20, 4096, 8192)
    grants = GrantTable(GUEST, memory.table, 8192, memory.nr_frames)
    g = Guest(memory, grants, Engine(memory, grants, BACKEND, planted_lost_reissue=True))
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    first = io(BLKIF_OP_WRITE, 0, 4096, 4096, b"\x11" * 4096)
    second = io(BLKIF_OP_WRITE, 4096, 4096, 4096, b"\x22" * 4096)
    g.engine.submit(first)
    g.engine.submit(second)
    g.engine.dispatch()
    g.drop()  # the backend never served the ring
    assert g.engine.take_finished() == [second] and second.status == 0
    backend = g.connect(disk=disk)
    assert run(g, backend) == [first] and first.status == 0
    assert disk[:4096] == b"\x11" * 4096 and disk[4096:8192] == bytes(4096)


CONFIGS = st.fixed_dictionaries(
    {
        "page_size": st.sampled_from([4096, 16384, 65536]),
        "persistent": st.booleans(),
        "indirect": st.sampled_from([0, 32, 256]),
        "order": st.sampled_from([0, 1, 4]),
        "queues": st.sampled_from([1, 3]),
        "sector_size": st.sampled_from([512, 4096]),
    }
)
SLOT = 256 << 10
SLOTS = 8


@settings(max_examples=40, deadline=None)
@given(
    config=CONFIGS, seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 30), max_size=3)
)
def test_random_io_with_reconnects_completes_each_once(
    config: dict[str, Any], seed: int, cuts: list[int]
) -> None:
    """Random batches on disjoint regions; the backend is torn down after serving a few
    requests (some answered, some not): every I/O completes exactly once, with the right data."""
    rng = random.Random(seed)
    page_size, block = config["page_size"], config["sector_size"]
    g = guest(page_size)
    disk = bytearray(SLOT * SLOTS)
    model = bytearray(disk)
    setup = {k: v for k, v in config.items() if k != "page_size"}
    backend = g.connect(disk=disk, **setup)
    completions: list[BlkIo] = []
    submitted: list[tuple[BlkIo, bytes | None]] = []
    for batch in range(3):
        for slot in rng.sample(range(SLOTS), 4):
            length = rng.randrange(1, SLOT // block + 1) * block
            length = min(length, rng.choice([block, 4096, 65536, SLOT]))
            length = max(block, length - length % block)
            offset = slot * SLOT + rng.randrange(0, (SLOT - length) // block + 1) * block
            if rng.random() < 0.5:
                data = rng.randbytes(length)
                model[offset : offset + length] = data
                x = io(BLKIF_OP_WRITE, offset, length, page_size, data)
                submitted.append((x, None))
            else:
                x = io(BLKIF_OP_READ, offset, length, page_size)
                submitted.append((x, bytes(model[offset : offset + length])))
            g.engine.submit(x)
        if batch < len(cuts):
            g.engine.dispatch()
            for q in range(len(backend.rings)):
                backend.serve(q, cuts[batch], respond=rng.random() < 0.5)
                completions += g.engine.poll(q)
            g.drop()
            backend = g.connect(disk=disk, **setup)
        completions += run(g, backend)
    ids = [id(x) for x in completions]
    assert len(ids) == len(set(ids)) == len(submitted)
    for x, expected in submitted:
        assert x.status == 0
        if expected is not None:
            assert bytes(x.data) == expected
    assert disk == model
    g.drop()
    assert g.grants.in_use() == 0


@pytest.mark.parametrize("persistent", [False, True])
def test_grant_exhaustion_waits_for_completions_or_fails_the_impossible(persistent: bool) -> None:
    memory = DomainMemory(GUEST, 16 << 20, 4096, 128)
    grants = GrantTable(GUEST, memory.table, 128, memory.nr_frames)
    g = Guest(memory, grants, Engine(memory, grants, BACKEND))
    disk = bytearray(4 << 20)
    backend = g.connect(disk=disk, indirect=32, persistent=persistent)
    ios = [io(BLKIF_OP_WRITE, i * 262144, 262144, 4096, bytes([i + 1]) * 262144) for i in range(8)]
    for x in ios:
        g.engine.submit(x)
    done = run(g, backend)  # 64 grants each, 120 usable: they go a few at a time
    assert sorted(map(id, done)) == sorted(map(id, ios)) and all(x.status == 0 for x in ios)
    assert all(disk[i * 262144 : (i + 1) * 262144] == bytes([i + 1]) * 262144 for i in range(8))
    big = io(BLKIF_OP_READ, 0, 1 << 20, 4096)  # 8 requests of 32: issued as grants free up
    g.engine.submit(big)
    assert run(g, backend) == [big] and big.status == 0 and big.data == disk[: 1 << 20]
    g.drop()
    backend = g.connect(disk=disk, indirect=256, persistent=persistent)
    huge = io(BLKIF_OP_READ, 0, 1 << 20, 4096)  # one request of 256 segments > 128 grants
    g.engine.submit(huge)
    assert run(g, backend) == [huge] and huge.status == -1
    assert "out of guest memory or grants" in huge.reason
    small = io(BLKIF_OP_READ, 4096, 4096, 4096)
    g.engine.submit(small)
    assert run(g, backend) == [small] and small.status == 0 and small.data == disk[4096:8192]
    g.drop()
    assert g.grants.in_use() == 0


@pytest.mark.parametrize(("depth", "per_ring"), [(32, 16), (8, 4), (2, 4)])
def test_new_ios_go_to_rings_in_runs_of_half_the_queue_depth(depth: int, per_ring: int) -> None:
    """Runs of half the depth (4 at least): each ring push carries a batch, and the I/Os in
    flight still sit on two rings, so the backend drains one while the other is refilled."""
    memory = DomainMemory(GUEST, 16 << 20, 4096, 8192)
    grants = GrantTable(GUEST, memory.table, 8192, memory.nr_frames)
    g = Guest(memory, grants, Engine(memory, grants, BACKEND, queue_depth=depth))
    disk = bytearray(random.Random(3).randbytes(1 << 20))
    backend = g.connect(disk=disk, queues=4, persistent=True)
    ios = [io(BLKIF_OP_READ, i * 4096, 4096, 4096) for i in range(2 * per_ring)]
    for x in ios:
        g.engine.submit(x)
    assert g.engine.dispatch() == [0, 1]  # both rings pushed, the backend asked for events
    assert [backend.rings[q].unconsumed_requests() for q in range(4)] == [per_ring, per_ring, 0, 0]
    assert sorted(map(id, run(g, backend))) == sorted(map(id, ios))
    assert all(
        x.status == 0 and x.data == disk[i * 4096 : (i + 1) * 4096] for i, x in enumerate(ios)
    )


# -- counters (docs/metrics.md, "blkfront") ------------------------------------------------


def _counted_workload(page_size: int, persistent: bool) -> dict[str, int]:
    """A 64 KiB write (16 chunks of 4 KiB: requests of 11 and 5), an 8 KiB read at 512 bytes
    into a page (3 chunks), a flush and a discard; the queue's counters after them."""
    g = guest(page_size)
    backend = g.connect(disk=bytearray(1 << 20), persistent=persistent)
    for x in (
        io(BLKIF_OP_WRITE, 65536, 65536, page_size, bytes(65536)),
        io(BLKIF_OP_READ, 65536 + 512, 8192, page_size),
        BlkIo(BLKIF_OP_FLUSH_DISKCACHE, 0, 0),
        BlkIo(BLKIF_OP_DISCARD, 8, 4096),
    ):
        g.engine.submit(x)
        run(g, backend)
    (counters,) = g.engine.counters
    return dataclasses.asdict(counters)


@pytest.mark.parametrize("page_size", [4096, 16384, 65536])
@pytest.mark.parametrize("persistent", [False, True])
def test_counters_of_a_fixed_workload_are_its_arithmetic(page_size: int, persistent: bool) -> None:
    counts = _counted_workload(page_size, persistent)
    assert counts == _counted_workload(page_size, persistent)  # exact: the same every run
    if persistent:
        # The pool grows by whole guest pages: the 11 segments of the first request are
        # granted anew, the second request finds what the last page left over, the read
        # finds the pool full again.
        leftover = -11 % (page_size // 4096)
        hits = min(5, leftover)
        pool = {"persistent_hits": hits + 3, "persistent_misses": 16 - hits}
    else:
        pool = {"persistent_hits": 0, "persistent_misses": 0}
    assert (
        counts
        == {
            "rd_req": 1,
            "wr_req": 2,
            "f_req": 1,
            "ds_req": 1,
            "rd_bytes": 8192,
            "wr_bytes": 65536,
            "segments": 16 + 3,
            "indirect_req": 0,
            "indirect_pages": 0,
            "reissued": 0,
            "errors": 0,
        }
        | pool
    )


def test_counters_of_indirect_requests_retries_and_errors() -> None:
    g = guest(4096)
    disk = bytearray(2 << 20)
    backend = g.connect(disk=disk, indirect=256)
    g.engine.submit(io(BLKIF_OP_WRITE, 0, 1 << 20, 4096, bytes(1 << 20)))
    run(g, backend)
    (counters,) = g.engine.counters
    # 256 segments of 4 KiB in one indirect request: 256 * 8 bytes of descriptors, one page.
    assert (counters.wr_req, counters.indirect_req, counters.indirect_pages) == (1, 1, 1)
    assert (counters.segments, counters.wr_bytes) == (256, 1 << 20)
    # Two writes on the ring when the connection ends: both are issued again.
    w = [io(BLKIF_OP_WRITE, n * 4096, 4096, 4096, b"\x01" * 4096) for n in (0, 1)]
    for x in w:
        g.engine.submit(x)
    g.engine.dispatch()
    g.drop()
    backend = g.connect(disk=disk, indirect=256)
    assert g.engine.counters == [counters]  # the same record across connections
    assert run(g, backend) == w and counters.reissued == 2 and counters.wr_req == 1 + 2 + 2
    # A response with an error status.
    g.engine.submit(io(BLKIF_OP_READ, 0, 4096, 4096))
    g.engine.dispatch()
    raw = backend.rings[0].take_request()
    assert raw is not None
    request = BLKIF_ARM.decode_request(raw)
    backend.rings[0].put_response(
        BLKIF_ARM.encode_response(BlkifResponse(request.id, BLKIF_OP_READ, -1))
    )
    backend.rings[0].push_responses()
    (failed,) = g.engine.poll(0)
    assert failed.status == -1 and counters.errors == 1 and counters.rd_req == 1
