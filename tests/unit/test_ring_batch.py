"""`FrontRing.put_requests` / `BackRing.put_responses`: the batch forms of `put_request` /
`put_response` leave the same bytes, indexes and `written` coverage as one call per entry
(including across the wrap-around), and refuse a batch that does not fit without writing any
of it."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.errors import RingError, RingUsageError
from xenpv.abi.netif import NETIF_RX_RING, NETIF_TX_RING
from xenpv.abi.ring import BackRing, FrontRing, RingLayout

MASK = 0xFFFFFFFF


def _ring_at(layout: RingLayout, start: int) -> tuple[LocalBuffer, FrontRing, BackRing]:
    """A live ring whose indexes all stand at `start` (both ends attached there)."""
    buffer = LocalBuffer(4096)
    FrontRing(buffer, layout)  # SHARED_RING_INIT
    struct.pack_into("<IIII", buffer.view, 0, start, start + 1 & MASK, start, start + 1 & MASK)
    return buffer, FrontRing(buffer, layout, attach=True), BackRing(buffer, layout, attach=True)


def _covered(dirty: list[tuple[int, int]]) -> set[int]:
    return {byte for offset, length in dirty for byte in range(offset, offset + length)}


def _entries(count: int, size: int, seed: int) -> list[bytes]:
    return [bytes((seed + n + k) & 0xFF for k in range(size)) for n in range(count)]


def _put_both_ways(
    one: tuple[LocalBuffer, Callable[[bytes], None]],
    batch: tuple[LocalBuffer, Callable[[Sequence[bytes]], None]],
    entries: list[bytes],
) -> None:
    """Put `entries` one call each into one ring and in one batch into the other: the same
    bytes land, and the same bytes are reported written."""
    (one_buffer, put_one), (batch_buffer, put_batch) = one, batch
    for entry in entries:
        put_one(entry)
    put_batch(entries)
    assert bytes(batch_buffer.view) == bytes(one_buffer.view)
    assert _covered(batch_buffer.dirty) == _covered(one_buffer.dirty)


# The batch-equals-one-by-one properties share their cases: both ring layouts; start indexes
# at 0, mid-ring, near the ring's end (batches cross it) and just before the 32-bit wrap.
batch_cases = given(
    layout=st.sampled_from([NETIF_TX_RING, NETIF_RX_RING]),
    start=st.sampled_from([0, 200, 250, MASK - 3]),
    count=st.integers(1, 40),
    seed=st.integers(0, 255),
)


@settings(max_examples=60, deadline=None)
@batch_cases
def test_put_requests_equals_one_by_one(
    layout: RingLayout, start: int, count: int, seed: int
) -> None:
    entries = _entries(count, layout.req_size, seed)
    one_buffer, one_front, _ = _ring_at(layout, start)
    batch_buffer, batch_front, _ = _ring_at(layout, start)
    one_buffer.dirty.clear()
    batch_buffer.dirty.clear()
    _put_both_ways(
        (one_buffer, one_front.put_request), (batch_buffer, batch_front.put_requests), entries
    )
    assert batch_front.req_prod_pvt == one_front.req_prod_pvt == (start + count) & MASK
    assert len(batch_buffer.dirty) <= 2  # whole slots: one run, two across the wrap
    assert batch_front.push_requests() == one_front.push_requests()


@settings(max_examples=60, deadline=None)
@batch_cases
def test_put_responses_equals_one_by_one(
    layout: RingLayout, start: int, count: int, seed: int
) -> None:
    requests = _entries(count, layout.req_size, seed + 1)
    responses = _entries(count, layout.rsp_size, seed)
    rings = []
    for _ in range(2):
        buffer, front, back = _ring_at(layout, start)
        front.put_requests(requests)
        front.push_requests()
        assert back.take_requests() == requests
        buffer.dirty.clear()
        rings.append((buffer, front, back))
    (one_buffer, _, one_back), (batch_buffer, _, batch_back) = rings
    # Only the bytes of each response are reported (a tx response is 4 of a 12-byte slot).
    _put_both_ways(
        (one_buffer, one_back.put_response), (batch_buffer, batch_back.put_responses), responses
    )
    assert batch_back.rsp_prod_pvt == one_back.rsp_prod_pvt == (start + count) & MASK
    assert batch_back.push_responses() == one_back.push_responses()


def test_put_requests_refuses_an_overfull_batch_without_writing() -> None:
    buffer, front, _ = _ring_at(NETIF_TX_RING, 0)
    front.put_requests(_entries(250, 12, 0))
    before = bytes(buffer.view)
    with pytest.raises(RingUsageError, match="no room for 7"):
        front.put_requests(_entries(7, 12, 9))
    assert bytes(buffer.view) == before and front.req_prod_pvt == 250
    front.put_requests(_entries(6, 12, 9))  # exactly full is fine
    assert front.free_requests() == 0


def test_put_requests_refuses_an_oversized_entry_without_writing() -> None:
    buffer, front, _ = _ring_at(NETIF_RX_RING, 0)
    before = bytes(buffer.view)
    with pytest.raises(RingUsageError, match="9-byte request"):
        front.put_requests([bytes(8), bytes(9)])
    assert bytes(buffer.view) == before and front.req_prod_pvt == 0


def test_put_responses_needs_as_many_consumed_requests() -> None:
    _, front, back = _ring_at(NETIF_RX_RING, 0)
    front.put_requests(_entries(3, 8, 0))
    front.push_requests()
    back.take_request()
    back.take_request()
    with pytest.raises(RingUsageError, match="3 responses for 2 consumed requests"):
        back.put_responses(_entries(3, 8, 0))
    back.put_responses(_entries(2, 8, 0))
    assert back.rsp_prod_pvt == 2


def test_batch_puts_on_a_broken_ring_raise() -> None:
    buffer, front, back = _ring_at(NETIF_RX_RING, 0)
    struct.pack_into("<I", buffer.view, 0, 4000)  # req_prod far beyond the ring
    with pytest.raises(RingError):
        back.unconsumed_requests()
    with pytest.raises(RingError):
        back.put_responses([bytes(8)])
    struct.pack_into("<I", buffer.view, 8, 4000)  # rsp_prod far beyond the requests
    with pytest.raises(RingError):
        front.unconsumed_responses()
    with pytest.raises(RingError):
        front.put_requests([bytes(8)])


@pytest.mark.parametrize("start", [0, MASK - 2])
def test_final_check_for_responses_ahead_notifies_once_that_many_are_pushed(start: int) -> None:
    """rsp_event = rsp_cons + ahead: the back's pushes below it do not notify, the push that
    reaches it does; answers already there are reported at once (no lost wake-up)."""
    _, front, back = _ring_at(NETIF_RX_RING, start)
    front.put_requests(_entries(5, 8, 0))
    front.push_requests()
    back.take_requests()
    assert not front.final_check_for_responses(5)
    back.put_responses(_entries(2, 8, 1))
    assert not back.push_responses()  # 2 of 5: no event
    back.put_responses(_entries(2, 8, 2))
    assert not back.push_responses()  # 4 of 5: still none
    back.put_responses(_entries(1, 8, 3))
    assert back.push_responses()  # the 5th reaches rsp_event
    assert front.final_check_for_responses(5)  # unconsumed answers: work to do now
    assert len(front.take_responses()) == 5
    assert not front.final_check_for_responses()  # the default is the next answer
    front.put_requests(_entries(1, 8, 4))
    front.push_requests()
    back.take_requests()
    back.put_responses(_entries(1, 8, 5))
    assert back.push_responses()


def test_a_short_entry_ends_a_written_stretch_and_only_written_bytes_are_reported() -> None:
    """A GSO packet on the tx ring: request, 8-byte extra, requests. The extra's slot keeps
    its last 4 bytes, which are not reported; the rest is reported in two stretches."""
    buffer, front, _ = _ring_at(NETIF_TX_RING, 0)
    buffer.view[64:4096] = b"\xee" * (4096 - 64)
    buffer.dirty.clear()
    front.put_requests([b"\x01" * 12, b"\x02" * 8, b"\x03" * 12, b"\x04" * 12])
    assert buffer.dirty == [(64, 20), (88, 24)]
    assert bytes(buffer.view[64:112]) == (
        b"\x01" * 12 + b"\x02" * 8 + b"\xee" * 4 + b"\x03" * 12 + b"\x04" * 12
    )


def test_peek_then_consume_requests() -> None:
    """`peek_requests` copies without consuming; `consume_requests` only passes requests the
    back has seen; both refuse more than there is."""
    _, front, back = _ring_at(NETIF_TX_RING, MASK - 1)
    entries = _entries(4, 12, 7)
    front.put_requests(entries)
    front.push_requests()
    assert back.peek_requests(3) == entries[:3]
    assert back.req_cons == MASK - 1  # nothing consumed yet
    with pytest.raises(RingUsageError, match="fewer than 5"):
        back.peek_requests(5)
    back.consume_requests(2)
    assert back.take_request() == entries[2]
    with pytest.raises(RingUsageError, match="cannot consume 2"):
        back.consume_requests(2)
    back.consume_requests(1)
    assert back.unconsumed_requests() == 0
    back.put_responses(_entries(4, 4, 1))  # all four consumed: all four can be answered
    assert back.rsp_prod_pvt == (MASK - 1 + 4) & MASK
