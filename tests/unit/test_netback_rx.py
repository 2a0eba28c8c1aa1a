"""netback rx core: slot placement, extras, flags, copy failures (netback rx.c rules)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.rx import RxCore, RxFatal, RxFrame
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.netif import (
    NETIF_RX_RING,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifGsoExtra,
    NetifRxRequest,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    decode_extra,
    decode_rx_response,
    encode_rx_request,
)
from xenpv.abi.ring import BackRing, FrontRing


class Pair:
    def __init__(self, *, can_sg: bool = True, posted: int = 64) -> None:
        self.buffer = LocalBuffer(4096)
        self.front = FrontRing(self.buffer, NETIF_RX_RING)
        self.core = RxCore(BackRing(self.buffer, NETIF_RX_RING), can_sg=can_sg)
        self.post(posted)

    def post(self, count: int, first_id: int = 0) -> None:
        for i in range(count):
            self.front.put_request(encode_rx_request(NetifRxRequest(first_id + i, 1000 + i)))
        self.front.push_requests()

    def deliver(self, frame: RxFrame, statuses: list[int] | None = None) -> list[bytes]:
        placement = self.core.place(frame)
        self.core.complete(placement, statuses or [0] * len(placement.segments))
        self.core.push()
        out = []
        while (raw := self.front.take_response()) is not None:
            out.append(raw)
        return out


def test_small_frame_one_slot_with_csum_flags() -> None:
    p = Pair()
    frame = RxFrame(bytes(range(60)), int(NETRXF_csum_blank | NETRXF_data_validated))
    assert p.core.slots_needed(frame) == 1
    placement = p.core.place(frame)
    assert [(s.gref, s.at, s.length) for s in placement.segments] == [(1000, 0, 60)]
    p.core.complete(placement, [0])
    p.core.push()
    response = decode_rx_response(p.front.take_response() or b"")
    assert (response.id, response.offset, response.status) == (0, 0, 60)
    assert response.flags == NETRXF_csum_blank | NETRXF_data_validated


def test_large_frame_chains_more_data() -> None:
    p = Pair()
    responses = [decode_rx_response(r) for r in p.deliver(RxFrame(bytes(10000), 0))]
    assert [r.status for r in responses] == [4096, 4096, 1808]
    assert [bool(r.flags & NETRXF_more_data) for r in responses] == [True, True, False]
    assert [r.id for r in responses] == [0, 1, 2]


def test_gso_extra_after_first_slot() -> None:
    p = Pair()
    frame = RxFrame(
        bytes(9000), int(NETRXF_csum_blank), NetifGsoExtra(1440, XEN_NETIF_GSO_TYPE_TCPV6)
    )
    assert p.core.slots_needed(frame) == 4
    raw = p.deliver(frame)
    first = decode_rx_response(raw[0])
    assert first.flags & NETRXF_extra_info and first.flags & NETRXF_more_data
    assert decode_extra(raw[1]) == NetifGsoExtra(1440, XEN_NETIF_GSO_TYPE_TCPV6)
    rest = [decode_rx_response(r) for r in raw[2:]]
    assert first.status + sum(r.status for r in rest) == 9000
    assert not rest[-1].flags & NETRXF_more_data


def test_gso_extra_on_single_slot_frame() -> None:
    p = Pair()
    raw = p.deliver(RxFrame(bytes(100), 0, NetifGsoExtra(50, 1)))
    first = decode_rx_response(raw[0])
    assert first.flags == NETRXF_extra_info and len(raw) == 2


def test_failed_copy_overwrites_status_with_gntst() -> None:
    p = Pair()
    raw = p.deliver(RxFrame(bytes(5000), 0), statuses=[0, -3])
    assert struct.unpack_from("<h", raw[1], 6)[0] == -3
    assert p.core.counters.rx_copy_errors == 1 and p.core.counters.rx_packets == 0


def test_without_sg_only_single_slot_frames_fit() -> None:
    p = Pair(can_sg=False)
    assert p.core.fits_ever(RxFrame(bytes(1514), 0))
    assert not p.core.fits_ever(RxFrame(bytes(4097), 0))


def test_bogus_rx_req_prod_is_fatal() -> None:
    p = Pair(posted=0)
    struct.pack_into("<I", p.buffer.view, 0, 1000)
    with pytest.raises(RxFatal):
        p.core.available()


@settings(max_examples=100, deadline=None)
@given(size=st.integers(14, 65535), gso=st.booleans(), flags=st.sampled_from([0, 1, 3]))
def test_any_frame_reassembles(size: int, gso: bool, flags: int) -> None:
    p = Pair(posted=0)
    frame = RxFrame(bytes(size), flags, NetifGsoExtra(1000, 1) if gso else None)
    needed = p.core.slots_needed(frame)
    p.post(needed)
    assert p.core.available() == needed
    raw = p.deliver(frame)
    assert len(raw) == needed
    data = [decode_rx_response(r) for i, r in enumerate(raw) if not (gso and i == 1)]
    assert sum(r.status for r in data) == size
    assert all(r.offset == 0 and r.status <= 4096 for r in data)
    assert [bool(r.flags & NETRXF_more_data) for r in data] == [True] * (len(data) - 1) + [False]
    assert data[0].flags & 3 == flags
    assert bool(data[0].flags & NETRXF_extra_info) == gso
