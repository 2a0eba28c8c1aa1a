"""A hostile peer at either end of a blkif ring (`xenpv.faults.hostile` on the ring's
`RingTamper` seam), against the OTHER end's real defences: blkback's ring checks and request
core, and the blkfront engine (sans-IO, through the in-memory harness of
tests/unit/test_blkfront_core.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backends.blkback.request import IoKind, IoRequest, Rejected
from frontends.blkfront.errors import BlkfrontProtocolError
from tests.unit.faults_helpers import fault
from tests.unit.test_blkback_request import core, enc, seg
from tests.unit.test_blkfront_core import forged_answer_breaks_then_reissues, guest, io, run
from xenpv.abi.blkif import (
    BLKIF_NATIVE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BlkifRequest,
)
from xenpv.abi.errors import RingError
from xenpv.abi.ring import BackRing, FrontRing, set_tamper
from xenpv.faults.hostile import BAD_ID, HostileRings
from xenpv.hv import LocalBuffer


@pytest.fixture
def hostile() -> Iterator[HostileRings]:
    rings = HostileRings(seed=1)
    set_tamper(rings)
    try:
        yield rings
    finally:
        set_tamper(None)


def _rings() -> tuple[FrontRing, BackRing]:
    buffer = LocalBuffer(4096)
    return FrontRing(buffer, BLKIF_NATIVE.ring_layout), BackRing(buffer, BLKIF_NATIVE.ring_layout)


def _write(id: int, sector: int = 8) -> bytes:
    return enc(BlkifRequest(BLKIF_OP_WRITE, id, sector, (seg(3),)))


# -- a hostile frontend: blkback's defences ----------------------------------------------------


def test_a_producer_index_past_the_ring_halts_only_that_ring(hostile: HostileRings) -> None:
    hostile.start(fault("ring.prod-corrupt", "device:g:vbd:xvda", offset=1000), None)
    front, back = _rings()
    front.put_request(_write(1))
    assert front.push_requests() is True  # the bogus index is published, and notified
    with pytest.raises(RingError, match="bogus ring requests"):
        back.take_request()
    assert back.broken is not None  # every later call raises again: the device closes
    with pytest.raises(RingError):
        back.push_responses()


@pytest.mark.parametrize("kind", ["ring.segment-out-of-range", "ring.sector-out-of-range"])
def test_an_out_of_range_request_gets_an_error_response(hostile: HostileRings, kind: str) -> None:
    hostile.start(fault(kind, "device:g:vbd:xvda", count=1), None)
    front, back = _rings()
    front.put_request(_write(1))
    front.put_request(_write(2, sector=24))
    front.push_requests()
    first, second = back.take_request(), back.take_request()
    assert first is not None and second is not None
    rejected = core().decode(first)
    assert isinstance(rejected, Rejected) and rejected.status == BLKIF_RSP_ERROR
    assert rejected.id == 1  # answered by id: the frontend fails that I/O only
    fine = core().decode(second)  # count = 1: the next request is left alone
    assert isinstance(fine, IoRequest) and fine.kind is IoKind.WRITE


def test_double_fetch_the_backend_acts_on_its_first_copy(hostile: HostileRings) -> None:
    hostile.start(fault("ring.double-fetch", "device:g:vbd:xvda"), None)
    front, back = _rings()
    front.put_request(_write(5, sector=8))
    front.push_requests()
    taken = back.take_request()
    assert taken is not None
    again = BLKIF_NATIVE.decode_request(bytes(back.slot(0)[: BLKIF_NATIVE.request_size]))
    assert isinstance(again, BlkifRequest)  # the slot was rewritten after the read...
    assert (again.operation, again.sector_number, again.id) == (BLKIF_OP_READ, 16, BAD_ID)
    plan = core().decode(taken)  # ...and blkback decodes the copy it took once
    assert isinstance(plan, IoRequest)
    assert (plan.kind, plan.offset, plan.id) == (IoKind.WRITE, 8 * 512, 5)


def test_double_fetch_through_the_whole_path_writes_the_first_values(
    hostile: HostileRings,
) -> None:
    hostile.start(fault("ring.double-fetch", "device:g:vbd:xvda"), None)
    g = guest(4096)
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    w = io(BLKIF_OP_WRITE, 4096, 4096, 4096, b"\x66" * 4096)
    g.engine.submit(w)
    assert run(g, backend) == [w] and w.status == 0
    assert disk[4096:8192] == b"\x66" * 4096 and disk[:4096] == bytes(4096)


# -- a hostile backend: blkfront's defences -----------------------------------------------------


def _two_writes(kind: str, hostile: HostileRings) -> None:
    """Two writes answered in one push by a backend with `kind` active: blkfront breaks the
    ring, completes nothing twice, and after a reconnect every write completes once."""
    g = guest(4096)
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    writes = [io(BLKIF_OP_WRITE, n * 4096, 4096, 4096, bytes([n + 1]) * 4096) for n in range(2)]
    for w in writes:
        g.engine.submit(w)
    g.engine.dispatch()
    hostile.start(fault(kind, "device:g:vbd:xvda", count=1), None)
    backend.serve(0)
    completed = []
    with pytest.raises(BlkfrontProtocolError):
        completed += g.engine.poll(0)
    hostile.stop("f0.0")
    early = [w for w in writes if w.done]
    assert len(early) <= 1  # duplicate-id: the first one, really answered, may complete
    g.drop()
    backend = g.connect(disk=disk)
    later = run(g, backend)
    assert sorted(map(id, early + later)) == sorted(map(id, writes))  # each exactly once
    assert all(w.status == 0 for w in writes)
    assert disk[:8192] == b"\x01" * 4096 + b"\x02" * 4096


@pytest.mark.parametrize("kind", ["ring.bad-id", "ring.duplicate-id", "ring.cons-corrupt"])
def test_bad_duplicate_ids_and_a_runaway_rsp_prod_break_the_ring(
    hostile: HostileRings, kind: str
) -> None:
    _two_writes(kind, hostile)


def test_a_stale_id_breaks_the_ring_and_nothing_is_acknowledged_early(
    hostile: HostileRings,
) -> None:
    g = guest(4096)
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    hostile.start(fault("ring.stale-id", "device:g:vbd:xvda", probability=0.0), None)
    earlier = [io(BLKIF_OP_WRITE, n * 4096, 4096, 4096, b"\x01" * 4096) for n in range(4)]
    for w in earlier:
        g.engine.submit(w)
    assert len(run(g, backend)) == 4  # answered normally; their ids are remembered
    hostile.stop("f0.0")
    hostile.start(fault("ring.stale-id", "device:g:vbd:xvda", "f1.0", count=1), None)
    # Two in flight: the LIFO free list hands them the newest free ids; the stale answer
    # carries an older one that no request on the ring has.
    second = io(BLKIF_OP_WRITE, 4096, 4096, 4096, b"\x02" * 4096)
    third = io(BLKIF_OP_WRITE, 8192, 4096, 4096, b"\x03" * 4096)
    assert len(hostile.answered) >= 4
    g.engine.submit(second)
    g.engine.submit(third)
    g.engine.dispatch()
    backend.serve(0)
    with pytest.raises(BlkfrontProtocolError, match="no pending request"):
        g.engine.poll(0)
    hostile.stop("f1.0")
    early = [w for w in (second, third) if w.done]
    g.drop()
    backend = g.connect(disk=disk)
    later = run(g, backend)
    assert sorted(map(id, early + later)) == sorted(map(id, [second, third]))
    assert disk[4096:12288] == b"\x02" * 4096 + b"\x03" * 4096


def test_other_devices_are_left_alone(hostile: HostileRings) -> None:
    hostile.current_device = lambda: "vbd/3/51712"
    hostile.start(fault("ring.bad-id", "device:g:vbd:xvda", count=1), "vbd/2/51712")
    g = guest(4096)
    disk = bytearray(1 << 16)
    backend = g.connect(disk=disk)
    w = io(BLKIF_OP_WRITE, 0, 4096, 4096, b"\x07" * 4096)
    g.engine.submit(w)
    assert run(g, backend) == [w] and w.status == 0  # not the target device's task


def test_an_id_in_flight_answered_with_another_operation_breaks_the_ring() -> None:
    from xenpv.abi.blkif import BlkifResponse

    # The right id, the wrong operation: Linux "response has incorrect operation".
    forged_answer_breaks_then_reissues(
        b"\x09", lambda request: BlkifResponse(request.id, BLKIF_OP_READ, 0), "incorrect operation"
    )
