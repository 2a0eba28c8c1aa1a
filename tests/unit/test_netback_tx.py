"""netback tx core: Linux netback's slot validation, drops, fatal errors and responses."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.tx import TxCore, TxFatal, TxPacket
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETIF_TX_RING,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NetifExtraInfo,
    NetifGsoExtra,
    NetifMcastExtra,
    NetifTxRequest,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    decode_tx_response,
    encode_extra,
    encode_tx_request,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.metrics.counters import NetbackStats


class Pair:
    """A frontend ring and a TxCore over one in-memory page."""

    def __init__(self) -> None:
        buffer = LocalBuffer(4096)
        self.buffer = buffer
        self.front = FrontRing(buffer, NETIF_TX_RING)
        self.core = TxCore(BackRing(buffer, NETIF_TX_RING))
        self.next_id = 0

    def put(self, slots: list[NetifTxRequest | NetifExtraInfo]) -> None:
        for slot in slots:
            if isinstance(slot, NetifTxRequest):
                self.front.put_request(encode_tx_request(slot))
            else:
                self.front.put_request(encode_extra(slot))
        self.front.push_requests()

    def packet(
        self,
        sizes: list[int],
        *,
        extras: Sequence[NetifExtraInfo] = (),
        flags: int = 0,
        offset: int = 0,
    ) -> list[NetifTxRequest | NetifExtraInfo]:
        """Slots of a packet whose fragments have `sizes` (first slot carries the total)."""
        slots: list[NetifTxRequest | NetifExtraInfo] = []
        total = sum(sizes)
        for i, size in enumerate(sizes):
            f = flags if i == 0 else 0
            if i < len(sizes) - 1:
                f |= NETTXF_more_data
            if i == 0 and extras:
                f |= NETTXF_extra_info
            slots.append(
                NetifTxRequest(
                    100 + i, offset if i == 0 else 0, f, self.next_id, total if i == 0 else size
                )
            )
            self.next_id += 1
            if i == 0:
                for j, extra in enumerate(extras):
                    if j < len(extras) - 1:
                        extra.flags |= XEN_NETIF_EXTRA_FLAG_MORE
                    slots.append(extra)
        return slots

    def responses(self) -> list[tuple[int, int]]:
        self.core.push()
        out = []
        while (raw := self.front.take_response()) is not None:
            r = decode_tx_response(raw)
            out.append((r.id, r.status))
        return out

    def complete_all(self, packets: list[TxPacket], ok: bool = True) -> None:
        for packet in packets:
            self.core.complete(packet, ok)


def test_single_slot_packet() -> None:
    p = Pair()
    p.put(p.packet([60], flags=NETTXF_csum_blank, offset=100))
    (packet,) = p.core.take()
    assert packet.size == 60 and packet.flags == NETTXF_csum_blank and packet.gso is None
    assert [(s.gref, s.offset, s.length, s.at) for s in packet.segments] == [(100, 100, 60, 0)]
    assert p.responses() == []  # nothing answered before the copy
    p.complete_all([packet])
    assert p.responses() == [(0, NETIF_RSP_OKAY)]
    assert p.core.counters.tx_packets == 1 and p.core.counters.tx_bytes == 60


def test_multi_slot_packet_segments() -> None:
    p = Pair()
    p.put(p.packet([4096, 4096, 1000]))
    (packet,) = p.core.take()
    assert packet.size == 9192
    assert [(s.length, s.at) for s in packet.segments] == [(4096, 0), (4096, 4096), (1000, 8192)]
    p.complete_all([packet])
    assert p.responses() == [(0, 0), (1, 0), (2, 0)]


def test_gso_extra_answered_null() -> None:
    p = Pair()
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    p.put(p.packet([2000, 3000], extras=[gso]))
    (packet,) = p.core.take()
    assert packet.gso == NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
    assert packet.extra_count == 1
    p.complete_all([packet])
    statuses = [status for _id, status in p.responses()]
    assert statuses == [NETIF_RSP_OKAY, NETIF_RSP_NULL, NETIF_RSP_OKAY]


def test_null_response_keeps_slot_id_bytes_like_linux() -> None:
    p = Pair()
    p.put(p.packet([100], extras=[NetifGsoExtra(1000, XEN_NETIF_GSO_TYPE_TCPV4)]))
    slot1 = bytes(p.buffer.view[64 + 12 : 64 + 14])  # the extra's type/flags overlay resp.id
    (packet,) = p.core.take()
    p.complete_all([packet])
    assert bytes(p.buffer.view[64 + 12 : 64 + 14]) == slot1
    assert struct.unpack_from("<h", p.buffer.view, 64 + 14)[0] == NETIF_RSP_NULL


@pytest.mark.parametrize("slots", [1, 2, 18, 19])
def test_up_to_19_slots_accepted(slots: int) -> None:
    p = Pair()
    p.put(p.packet([100] * slots))
    (packet,) = p.core.take()
    assert len(packet.segments) == slots
    assert p.core.warnings == []


@pytest.mark.parametrize("slots", [20, 21])
def test_20_and_21_slots_dropped_with_errors(slots: int) -> None:
    p = Pair()
    p.put(p.packet([100] * slots))
    p.put(p.packet([60]))  # the next packet is still served
    (packet,) = p.core.take()
    assert packet.size == 60
    responses = p.responses()
    assert responses == [(i, NETIF_RSP_ERROR) for i in range(slots)]
    assert p.core.counters.tx_too_many_slots == 1 and p.core.counters.tx_errors == 1
    assert "Too many slots" in p.core.warnings[-1]


@pytest.mark.parametrize("slots", [22, 40])
def test_22_slots_fatal(slots: int) -> None:
    p = Pair()
    p.put(p.packet([100] * slots))
    with pytest.raises(TxFatal, match="Malicious frontend using 20 slots"):
        p.core.take()


def test_fatal_threshold_is_a_parameter() -> None:
    p = Pair()
    p.core.fatal_skb_slots = 18
    p.put(p.packet([100] * 20))
    with pytest.raises(TxFatal, match="threshold 18"):
        p.core.take()


def test_fragment_crossing_4k_is_fatal() -> None:
    p = Pair()
    slots = p.packet([100, 200])
    assert isinstance(slots[1], NetifTxRequest)
    slots[1].offset = 4000
    p.put(slots)
    with pytest.raises(TxFatal, match="Cross page boundary"):
        p.core.take()


def test_first_slot_crossing_4k_is_fatal() -> None:
    p = Pair()
    p.put(p.packet([200], offset=3900))
    with pytest.raises(TxFatal, match=r"Cross page boundary, txreq\.offset: 3900"):
        p.core.take()


def test_first_slot_boundary_uses_its_own_size() -> None:
    p = Pair()
    p.put(p.packet([96, 4096], offset=4000))  # first fragment 4000..4096: fits
    (packet,) = p.core.take()
    assert packet.segments[0].length == 96


def test_runt_packet_error() -> None:
    p = Pair()
    p.put(p.packet([10]))
    assert p.core.take() == []
    assert p.responses() == [(0, NETIF_RSP_ERROR)]


def test_slot_larger_than_remaining_dropped() -> None:
    p = Pair()
    slots = p.packet([100, 100, 100])
    assert isinstance(slots[0], NetifTxRequest)
    slots[0].size = 150  # the later fragments add up to more than the packet
    p.put(slots)
    assert p.core.take() == []
    assert p.responses() == [(0, NETIF_RSP_ERROR), (1, NETIF_RSP_ERROR), (2, NETIF_RSP_ERROR)]
    assert "Invalid tx request" in p.core.warnings[-1]


def test_chain_past_req_prod_is_fatal() -> None:
    p = Pair()
    p.put(p.packet([100, 100])[:1])  # more_data, but the next slot was never pushed
    with pytest.raises(TxFatal, match="exceeds this limit"):
        p.core.take()


def test_missing_extra_is_fatal() -> None:
    p = Pair()
    p.put([NetifTxRequest(1, 0, NETTXF_extra_info, 0, 60)])
    with pytest.raises(TxFatal, match="Missing extra info"):
        p.core.take()


@pytest.mark.parametrize("kind", [0, 5, 200])
def test_invalid_extra_type_is_fatal(kind: int) -> None:
    p = Pair()
    p.front.put_request(encode_tx_request(NetifTxRequest(1, 0, NETTXF_extra_info, 0, 60)))
    p.front.put_request(bytes([kind, 0]) + bytes(6))
    p.front.push_requests()
    with pytest.raises(TxFatal, match="Invalid extra type"):
        p.core.take()


def test_bad_gso_is_fatal() -> None:
    p = Pair()
    p.front.put_request(encode_tx_request(NetifTxRequest(1, 0, NETTXF_extra_info, 0, 60)))
    p.front.put_request(bytes([1, 0, 0, 0, 1, 0, 0, 0]))  # GSO of size 0
    p.front.push_requests()
    with pytest.raises(TxFatal, match="GSO"):
        p.core.take()


def test_bogus_req_prod_is_fatal() -> None:
    p = Pair()
    struct.pack_into("<I", p.buffer.view, 0, 300)  # req_prod 300 on a 256-slot ring
    with pytest.raises(TxFatal, match="Impossible number of requests"):
        p.core.take()


def test_multicast_extras() -> None:
    p = Pair()
    addr = bytes.fromhex("01005e000001")
    p.put(p.packet([0], extras=[NetifMcastExtra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, addr)]))
    assert p.core.take() == []
    assert p.core.mcast == {addr}
    p.put(p.packet([0], extras=[NetifMcastExtra(XEN_NETIF_EXTRA_TYPE_MCAST_DEL, addr)]))
    assert p.core.take() == []
    assert p.core.mcast == set()
    assert [s for _i, s in p.responses()] == [0, NETIF_RSP_NULL, 0, NETIF_RSP_NULL]


def test_multicast_list_is_bounded() -> None:
    p = Pair()
    p.core.mcast.update(bytes([1, 0, 0, 0, 0, i]) for i in range(64))
    p.put(
        p.packet([0], extras=[NetifMcastExtra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, b"\x01\0\0\0\1\0")])
    )
    p.core.take()
    assert p.responses()[0][1] == NETIF_RSP_ERROR


def test_failed_copy_answers_error() -> None:
    p = Pair()
    p.put(p.packet([1000, 1000]))
    packets = p.core.take()
    p.complete_all(packets, ok=False)
    assert p.responses() == [(0, NETIF_RSP_ERROR), (1, NETIF_RSP_ERROR)]
    assert p.core.counters.tx_copy_errors == 1


def test_budget_limits_a_round() -> None:
    p = Pair()
    for _ in range(10):
        p.put(p.packet([60]))
    assert len(p.core.take(budget=4)) == 4
    assert len(p.core.take(budget=100)) == 6


@settings(max_examples=200, deadline=None)
@given(
    slots=st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=64),
)
def test_garbage_slots_answer_every_slot_or_fatal(slots: list[bytes]) -> None:
    """Whatever the frontend writes: a fatal error, or every consumed slot gets exactly one
    response (once the accepted packets complete), and the ring stays consistent."""
    p = Pair()
    for raw in slots:
        p.front.put_request(raw)
    p.front.push_requests()
    try:
        packets = p.core.take(budget=1000)
    except TxFatal:
        return
    for packet in packets:
        assert packet.size == sum(s.length for s in packet.segments)
        assert all(s.offset + s.length <= 4096 for s in packet.segments)
        assert packet.size >= 14
    p.complete_all(packets)
    ring = p.core.ring
    assert ring.rsp_prod_pvt == ring.req_cons == len(slots)


@st.composite
def valid_packets(draw: st.DrawFn) -> list[tuple[int, int]]:
    """(offset, size) fragments of a packet a correct frontend could send."""
    count = draw(st.integers(1, 19))
    frags = []
    for i in range(count):
        least = 14 if i == 0 else 1  # netback wants the Ethernet header in the first slot
        offset = draw(st.integers(0, 4096 - least))
        size = draw(st.integers(least, 4096 - offset))
        frags.append((offset, size))
    if sum(size for _o, size in frags) > 0xFFFF:
        frags = [(0, 60)]
    return frags


@settings(max_examples=60, deadline=None)
@given(packets=st.lists(valid_packets(), min_size=1, max_size=8), gso=st.booleans())
def test_valid_packets_map_to_exact_segments(
    packets: list[list[tuple[int, int]]], gso: bool
) -> None:
    p = Pair()
    for frags in packets:
        total = sum(size for _o, size in frags)
        for i, (offset, size) in enumerate(frags):
            flags = NETTXF_more_data if i < len(frags) - 1 else 0
            if i == 0 and gso:
                flags |= NETTXF_extra_info
            p.front.put_request(
                encode_tx_request(
                    NetifTxRequest(1000 + i, offset, flags, i, total if i == 0 else size)
                )
            )
            if i == 0 and gso:
                p.front.put_request(encode_extra(NetifGsoExtra(1400, XEN_NETIF_GSO_TYPE_TCPV4)))
    p.front.push_requests()
    taken = p.core.take(budget=100)
    assert len(taken) == len(packets)
    for packet, frags in zip(taken, packets, strict=True):
        at = 0
        for segment, (offset, size) in zip(packet.segments, frags, strict=True):
            assert (segment.offset, segment.length, segment.at) == (offset, size, at)
            at += size
        assert packet.size == at and (packet.gso is not None) == gso
    p.complete_all(taken)
    statuses = [s for _i, s in p.responses()]
    assert statuses.count(NETIF_RSP_NULL) == (len(packets) if gso else 0)
    assert all(s in (NETIF_RSP_OKAY, NETIF_RSP_NULL) for s in statuses)


def _counted_tx() -> NetbackStats:
    """A 1-slot packet, a 3-slot GSO packet (and its extra slot), a runt, a chain whose
    slots outgrow the first slot's size, a 20-slot packet and a packet whose copy fails."""
    p = Pair()
    p.put(p.packet([60]))
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4, 0)
    p.put(p.packet([4096, 4096, 808], extras=[gso]))
    p.put(p.packet([10]))
    bad = p.packet([100, 100, 100])
    assert isinstance(bad[0], NetifTxRequest)
    bad[0].size = 150
    p.put(bad)
    p.put(p.packet([100] * 20))
    p.put(p.packet([1514]))
    good_60, good_gso, failing = p.core.take()
    p.complete_all([good_60, good_gso])
    p.core.complete(failing, ok=False)
    p.responses()
    return p.core.counters


def test_counters_of_fixed_tx_traffic_are_their_arithmetic() -> None:
    counts = _counted_tx()
    assert counts == _counted_tx()  # exact: the same every run
    assert (counts.tx_packets, counts.tx_bytes, counts.tx_slots) == (2, 60 + 9000, 1 + 3 + 1)
    assert counts.tx_errors == 4  # the runt, the chain, the 20 slots, the failed copy
    assert (counts.tx_malformed, counts.tx_too_many_slots, counts.tx_copy_errors) == (2, 1, 1)
    assert counts.rx_packets == counts.rx_slots == 0
