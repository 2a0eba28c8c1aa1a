"""Shared ring semantics (sans-IO): sizes, init, notify hold-off, wrap-around, broken rings.

Byte-exactness against the C macros is in tests/interop/test_headers_ring.py; here we check
the properties drivers rely on, including a Hypothesis state machine for ordering, no lost
wake-ups and "every changed byte was reported to `written`".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from xenpv.abi.blkif import BLKIF_RING, BLKIF_X86_32
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.errors import AbiError, RingError, RingUsageError
from xenpv.abi.netif import NETIF_RX_RING, NETIF_TX_RING
from xenpv.abi.ring import (
    BackRing,
    FrontRing,
    RingLayout,
    rd32,
    shared_indexes,
)
from xenpv.errors import XenpvError

PAGE = 4096
T = TypeVar("T")
MASK = 0xFFFFFFFF


def _pair(
    pages: int = 1, layout: RingLayout = BLKIF_RING
) -> tuple[LocalBuffer, FrontRing, BackRing]:
    buffer = LocalBuffer(pages * PAGE)
    return buffer, FrontRing(buffer, layout), BackRing(buffer, layout)


def _set_indexes(buffer: LocalBuffer, start: int) -> None:
    """Put a live ring at `start` (req_prod = rsp_prod = start, events start + 1)."""
    struct.pack_into("<IIII", buffer.view, 0, start, start + 1 & MASK, start, start + 1 & MASK)


@pytest.mark.parametrize(("pages", "slots"), [(1, 32), (2, 64), (4, 128), (8, 256), (16, 512)])
def test_blkif_slots_per_ring_order(pages: int, slots: int) -> None:
    assert BLKIF_RING.nr_ents(pages * PAGE) == slots


def test_entry_sizes_and_single_page_slots() -> None:
    assert (BLKIF_RING.req_size, BLKIF_RING.rsp_size, BLKIF_RING.entry_size) == (112, 16, 112)
    assert BLKIF_X86_32.ring_layout.entry_size == 108
    assert BLKIF_X86_32.ring_layout.nr_ents(PAGE) == 32
    assert NETIF_TX_RING.entry_size == 12 and NETIF_TX_RING.nr_ents(PAGE) == 256
    assert NETIF_RX_RING.entry_size == 8 and NETIF_RX_RING.nr_ents(PAGE) == 256
    # a larger negotiated granule (docs/granule-extension.md): size from the buffer, not from 4096
    assert BLKIF_RING.nr_ents(16384) == 128 and BLKIF_RING.nr_ents(65536) == 512


def test_too_small_buffer_is_a_usage_error() -> None:
    with pytest.raises(RingUsageError, match="cannot hold"):
        BLKIF_RING.nr_ents(64 + 111)
    assert BLKIF_RING.nr_ents(64 + 112) == 1


@given(st.integers(min_value=0, max_value=MASK))
@settings(deadline=None)
def test_rd32_is_the_largest_power_of_two_below(x: int) -> None:
    r = rd32(x)
    if x == 0:
        assert r == 0
    else:
        assert r & (r - 1) == 0 and r <= x < 2 * r


def test_init_writes_header_and_reports_it() -> None:
    buffer = LocalBuffer(PAGE, data=b"\xff" * PAGE)
    FrontRing(buffer, BLKIF_RING)
    assert shared_indexes(buffer) == (0, 1, 0, 1)
    assert bytes(buffer.view[16:64]) == bytes(48)  # pvt and __pad zeroed
    assert bytes(buffer.view[64:]) == b"\xff" * (PAGE - 64)  # entries untouched
    assert buffer.dirty == [(0, 64)]


def test_request_response_cycle_and_notify_holdoff() -> None:
    buffer, front, back = _pair()
    front.put_request(b"a" * 112)
    assert front.push_requests() is True  # req_event = 1 lies in (0, 1]
    front.put_request(b"b" * 112)
    assert front.push_requests() is False  # back has not re-armed: no second notify
    assert back.unconsumed_requests() == 2
    assert back.take_request() == b"a" * 112
    assert back.take_request() == b"b" * 112
    assert back.take_request() is None
    assert back.final_check_for_requests() is False
    assert shared_indexes(buffer)[1] == 3  # req_event = req_cons + 1
    back.put_response(b"x" * 16)
    back.put_response(b"y" * 16)
    assert back.push_responses() is True
    assert front.take_response() == b"x" * 16
    assert front.take_response() == b"y" * 16
    assert front.final_check_for_responses() is False
    front.put_request(b"c" * 50)  # shorter than a slot: only those bytes are written
    assert front.push_requests() is True  # the back re-armed
    assert back.take_request() == b"c" * 50 + bytes(62)  # slot 2 was still zero


def test_batch_takes_copy_in_order_and_respect_the_limit() -> None:
    buffer = LocalBuffer(PAGE)
    start = MASK - 2  # the batch crosses the 2**32 wrap
    _set_indexes(buffer, start)
    front = FrontRing(buffer, BLKIF_RING, attach=True, index=start)
    back = BackRing(buffer, BLKIF_RING, attach=True, index=start)
    for i in range(6):
        front.put_request(bytes([i]) * 112)
    front.push_requests()
    assert back.take_requests(limit=2) == [bytes([0]) * 112, bytes([1]) * 112]
    assert back.take_requests() == [bytes([i]) * 112 for i in range(2, 6)]
    assert back.take_requests() == []
    for i in range(6):
        back.put_response(bytes([i]) * 16)
    back.push_responses()
    assert front.take_responses(limit=0) == []
    assert front.take_responses() == [bytes([i]) * 16 for i in range(6)]
    assert front.rsp_cons == back.req_cons == (start + 6) & MASK


def test_final_check_finds_work_that_raced_in() -> None:
    _, front, back = _pair()
    assert back.final_check_for_requests() is False
    front.put_request(b"r")
    assert front.push_requests() is True
    assert back.final_check_for_requests() is True


def test_full_ring_and_answering_unconsumed_requests_are_usage_errors() -> None:
    _, front, back = _pair()
    for i in range(32):
        assert front.free_requests() == 32 - i
        front.put_request(bytes([i]))
    assert front.full()
    with pytest.raises(RingUsageError, match="full"):
        front.put_request(b"x")
    with pytest.raises(RingUsageError, match="no consumed request"):
        back.put_response(b"x")
    front.push_requests()
    assert back.take_request() is not None
    with pytest.raises(RingUsageError, match="does not fit"):
        back.put_response(b"x" * 17)
    with pytest.raises(RingUsageError, match="does not fit"):
        FrontRing(LocalBuffer(), BLKIF_RING).put_request(b"x" * 113)
    assert front.broken is None  # local misuse does not break the ring


@pytest.mark.parametrize("start", [MASK - 40, MASK - 1, MASK, 0])
def test_indexes_wrap_at_2_32(start: int) -> None:
    buffer = LocalBuffer(PAGE)
    _set_indexes(buffer, start)
    front = FrontRing(buffer, BLKIF_RING, attach=True, index=start)
    back = BackRing(buffer, BLKIF_RING, attach=True, index=start)
    for round_ in range(3):
        for i in range(32):
            front.put_request(bytes([round_, i]))
        assert front.full()
        assert front.push_requests() is True  # the back re-armed every round
        assert back.unconsumed_requests() == 32
        got = [back.take_request() for _ in range(32)]
        assert [g[:2] for g in got if g] == [bytes([round_, i]) for i in range(32)]
        assert back.final_check_for_requests() is False
        for i in range(32):
            back.put_response(bytes([i]))
        back.push_responses()
        taken = [front.take_response() for _ in range(32)]
        assert [t[:1] for t in taken if t] == [bytes([i]) for i in range(32)]
        assert front.final_check_for_responses() is False
    assert front.req_prod_pvt == (start + 96) & MASK == back.rsp_prod_pvt


def test_bogus_req_prod_breaks_the_back_ring() -> None:
    buffer, _front, back = _pair()
    struct.pack_into("<I", buffer.view, 0, 33)  # a hostile front: 33 requests on 32 slots
    with pytest.raises(RingError, match="bogus ring requests") as info:
        back.take_request()
    assert isinstance(info.value, XenpvError)
    assert back.broken is not None and "bogus" in back.broken
    struct.pack_into("<I", buffer.view, 0, 1)  # even a later sane value: stays broken
    for call in (back.take_request, back.unconsumed_requests, back.final_check_for_requests):
        with pytest.raises(RingError):
            call()
    with pytest.raises(RingError):
        back.put_response(b"")


def test_req_prod_moving_backwards_breaks_the_back_ring() -> None:
    buffer, front, back = _pair()
    for _ in range(4):
        front.put_request(b"r")
    front.push_requests()
    assert back.take_request() is not None and back.take_request() is not None
    struct.pack_into("<I", buffer.view, 0, 1)  # behind req_cons = 2
    with pytest.raises(RingError, match="moved behind"):
        back.unconsumed_requests()


def test_too_many_responses_break_the_front_ring() -> None:
    buffer, front, _back = _pair()
    front.put_request(b"r")
    front.push_requests()
    struct.pack_into("<I", buffer.view, 8, 2)  # two responses to one request
    with pytest.raises(RingError, match="illegal number of responses"):
        front.take_response()
    assert front.broken is not None
    with pytest.raises(RingError):
        front.put_request(b"r")


def test_back_attach_resumes_at_rsp_prod_like_blkback() -> None:
    buffer, front, back = _pair()
    for i in range(3):
        front.put_request(bytes([i]))
    front.push_requests()
    assert back.take_request() == bytes([0]) + bytes(111)
    back.put_response(b"done0")
    back.push_responses()
    back.take_request()  # consumed but never answered: the new backend must see it again
    again = BackRing(buffer, BLKIF_RING, attach=True)
    assert (again.req_cons, again.rsp_prod_pvt) == (1, 1)
    assert [again.take_request() for _ in range(3)][:2] == [
        bytes([1]) + bytes(111),
        bytes([2]) + bytes(111),
    ]


def test_attach_refuses_inconsistent_rings() -> None:
    buffer = LocalBuffer(PAGE)
    struct.pack_into("<IIII", buffer.view, 0, 40, 1, 0, 1)
    with pytest.raises(RingError, match="bogus"):
        BackRing(buffer, BLKIF_RING, attach=True)
    with pytest.raises(RingError, match="busy ring"):
        FrontRing(buffer, BLKIF_RING, attach=True)
    struct.pack_into("<IIII", buffer.view, 0, 7, 8, 7, 8)
    front = FrontRing(buffer, BLKIF_RING, attach=True)
    assert (front.req_prod_pvt, front.rsp_cons) == (7, 7)
    with pytest.raises(RingUsageError):
        FrontRing(buffer, BLKIF_RING, index=3)


@given(
    req_prod=st.integers(0, MASK),
    rsp_prod=st.integers(0, MASK),
    req_event=st.integers(0, MASK),
    rsp_event=st.integers(0, MASK),
    index=st.integers(0, MASK),
    ops=st.lists(st.sampled_from(["take", "final", "respond", "push"]), max_size=40),
)
@settings(max_examples=200, deadline=None)
def test_hostile_headers_only_ever_raise_ring_errors(
    req_prod: int, rsp_prod: int, req_event: int, rsp_event: int, index: int, ops: list[str]
) -> None:
    """Whatever a peer writes in the header, a ring answers with data or a typed error."""
    buffer = LocalBuffer(PAGE)
    struct.pack_into("<IIII", buffer.view, 0, req_prod, req_event, rsp_prod, rsp_event)
    try:
        back = BackRing(buffer, BLKIF_RING, attach=True, index=index)
        front = FrontRing(buffer, BLKIF_RING, attach=True, index=index)
        for op in ops:
            if op == "take":
                back.take_request()
                front.take_response()
                back.take_requests()
                front.take_responses(limit=3)
            elif op == "final":
                back.final_check_for_requests()
                front.final_check_for_responses()
            elif op == "respond" and back.req_cons != back.rsp_prod_pvt:
                back.put_response(b"r")
            elif op == "push":
                back.push_responses()
    except AbiError:
        pass


class RingPair(RuleBasedStateMachine):
    """A front and a back on one buffer, driven like real drivers, against a simple model."""

    @initialize(
        pages=st.integers(1, 4),
        layout=st.sampled_from([BLKIF_RING, NETIF_TX_RING, NETIF_RX_RING]),
        start=st.one_of(st.just(0), st.integers(MASK - 600, MASK), st.integers(0, MASK)),
    )
    def setup(self, pages: int, layout: RingLayout, start: int) -> None:
        self.buffer = LocalBuffer(pages * PAGE)
        FrontRing(self.buffer, layout)  # SHARED_RING_INIT
        _set_indexes(self.buffer, start)
        self.front = FrontRing(self.buffer, layout, attach=True, index=start)
        self.back = BackRing(self.buffer, layout, attach=True, index=start)
        self.layout = layout
        self.counter = 0
        self.sent: list[bytes] = []  # requests put, not yet taken by the back
        self.to_answer: list[bytes] = []  # requests taken, not yet answered
        self.answers: list[bytes] = []  # responses put, not yet taken by the front
        self.back_idle = False  # final check said "no work": the back waits for a notify
        self.front_idle = False
        self.unpushed_requests = 0
        self.unpushed_responses = 0

    def _payload(self, size: int) -> bytes:
        self.counter += 1
        return (self.counter.to_bytes(4, "little") * size)[:size]

    def _changes_reported(self, before: bytes, dirty_from: int) -> None:
        after = bytes(self.buffer.view)
        if after == before:
            return
        covered = bytearray(len(after))
        for offset, length in self.buffer.dirty[dirty_from:]:
            covered[offset : offset + length] = b"\x01" * length
        changed = [i for i in range(len(after)) if after[i] != before[i] and not covered[i]]
        assert not changed, f"bytes changed without written(): {changed[:8]}"

    def _op(self, fn: Callable[[], T]) -> T:
        before, mark = bytes(self.buffer.view), len(self.buffer.dirty)
        result = fn()
        self._changes_reported(before, mark)
        return result

    @rule(count=st.integers(1, 40))
    def put_requests(self, count: int) -> None:
        for _ in range(min(count, self.front.free_requests())):
            data = self._payload(self.layout.req_size)
            self._op(lambda data=data: self.front.put_request(data))
            self.sent.append(data)
            self.unpushed_requests += 1

    @rule()
    def push_requests(self) -> None:
        notify = self._op(self.front.push_requests)
        if self.back_idle and self.unpushed_requests:
            assert notify, "lost wake-up: the back is idle and was not notified"
        if notify:
            self.back_idle = False
        self.unpushed_requests = 0

    @rule(count=st.integers(1, 40))
    def take_requests(self, count: int) -> None:
        for _ in range(count):
            data = self._op(self.back.take_request)
            if data is None:
                assert len(self.sent) == self.unpushed_requests
                break
            assert data == self.sent.pop(0)
            self.to_answer.append(data)

    @rule(limit=st.one_of(st.none(), st.integers(0, 40)))
    def take_request_batch(self, limit: int | None) -> None:
        pushed = len(self.sent) - self.unpushed_requests
        expected = pushed if limit is None else min(pushed, limit)
        taken = self._op(lambda: self.back.take_requests(limit))
        assert taken == self.sent[:expected]
        del self.sent[:expected]
        self.to_answer += taken

    @rule()
    def back_final_check(self) -> None:
        work = self._op(self.back.final_check_for_requests)
        pushed_waiting = len(self.sent) - self.unpushed_requests
        assert work == (pushed_waiting > 0)
        self.back_idle = not work

    @rule(count=st.integers(1, 40))
    def put_responses(self, count: int) -> None:
        for _ in range(min(count, len(self.to_answer))):
            self.to_answer.pop(0)
            data = self._payload(self.layout.rsp_size)
            self._op(lambda data=data: self.back.put_response(data))
            self.answers.append(data)
            self.unpushed_responses += 1

    @rule()
    def push_responses(self) -> None:
        notify = self._op(self.back.push_responses)
        if self.front_idle and self.unpushed_responses:
            assert notify, "lost wake-up: the front is idle and was not notified"
        if notify:
            self.front_idle = False
        self.unpushed_responses = 0

    @rule(count=st.integers(1, 40))
    def take_responses(self, count: int) -> None:
        for _ in range(count):
            data = self._op(self.front.take_response)
            if data is None:
                assert len(self.answers) == self.unpushed_responses
                break
            assert data == self.answers.pop(0)

    @rule(limit=st.one_of(st.none(), st.integers(0, 40)))
    def take_response_batch(self, limit: int | None) -> None:
        pushed = len(self.answers) - self.unpushed_responses
        expected = pushed if limit is None else min(pushed, limit)
        taken = self._op(lambda: self.front.take_responses(limit))
        assert taken == self.answers[:expected]
        del self.answers[:expected]

    @rule()
    def front_final_check(self) -> None:
        work = self._op(self.front.final_check_for_responses)
        assert work == (len(self.answers) - self.unpushed_responses > 0)
        self.front_idle = not work

    @invariant()
    def counts_match_the_model(self) -> None:
        if not hasattr(self, "front"):
            return
        in_flight = len(self.sent) + len(self.to_answer) + len(self.answers)
        assert self.front.free_requests() == self.front.nr_ents - in_flight
        assert self.front.full() == (in_flight == self.front.nr_ents)
        assert self.front.broken is None and self.back.broken is None


RingPair.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestRingPair = RingPair.TestCase
