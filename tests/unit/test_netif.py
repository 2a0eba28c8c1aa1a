"""netif codecs: round trips, packet checks, extra-info slots and fuzzed garbage (sans-IO)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.abi_strategies import i16, u8, u16, u32
from xenpv.abi import netif
from xenpv.abi.buffer import LocalBuffer
from xenpv.abi.errors import NetifError
from xenpv.abi.netif import (
    NETIF_RSP_NULL,
    NETIF_RX_RING,
    NETIF_TX_RING,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_GSO_TYPE_TCPV4,
    NetifGsoExtra,
    NetifHashExtra,
    NetifMcastExtra,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_extra_info,
    NETTXF_more_data,
    TxPacket,
    parse_tx_packet,
    tx_fragment_sizes,
)
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.errors import XenpvError

extras = st.one_of(
    st.builds(NetifGsoExtra, st.integers(1, 0xFFFF), st.integers(1, 2), u16, u8),
    st.builds(NetifMcastExtra, st.integers(2, 3), st.binary(min_size=6, max_size=6), u8),
    st.builds(NetifHashExtra, st.integers(0, 3), st.integers(0, 1), u32, u8),
)


@given(st.builds(NetifTxRequest, u32, u16, u16, u16, u16))
@settings(deadline=None)
def test_tx_request_round_trip(request: NetifTxRequest) -> None:
    encoded = netif.encode_tx_request(request)
    assert len(encoded) == 12
    assert netif.decode_tx_request(encoded) == request


@given(st.builds(NetifTxResponse, u16, i16))
@settings(deadline=None)
def test_tx_response_round_trip(response: NetifTxResponse) -> None:
    encoded = netif.encode_tx_response(response)
    assert len(encoded) == 4
    assert netif.decode_tx_response(encoded + b"\xee" * 8) == response  # a 12-byte slot


@given(st.builds(NetifRxRequest, u16, u32))
@settings(deadline=None)
def test_rx_request_round_trip(request: NetifRxRequest) -> None:
    encoded = netif.encode_rx_request(request)
    assert len(encoded) == 8 and encoded[2:4] == b"\0\0"
    assert netif.decode_rx_request(encoded) == request


@given(
    st.integers(0, 4096).flatmap(
        lambda off: st.tuples(st.just(off), u16, u16, st.integers(-2, 4096 - off))
    )
)
@settings(deadline=None)
def test_rx_response_round_trip(fields: tuple[int, int, int, int]) -> None:
    offset, id, flags, status = fields
    response = NetifRxResponse(id, offset, flags, status)
    assert netif.decode_rx_response(netif.encode_rx_response(response)) == response


@given(extras)
@settings(deadline=None)
def test_extra_info_round_trip(extra: netif.NetifExtraInfo) -> None:
    encoded = netif.encode_extra(extra)
    assert len(encoded) == 8
    assert netif.decode_extra(encoded) == extra
    assert netif.decode_extra(encoded + b"\xee" * 4) == extra  # in a 12-byte tx slot


def test_extra_info_validation() -> None:
    for kind in (0, 5, 200):
        with pytest.raises(NetifError, match=f"invalid extra-info type {kind}"):
            netif.decode_extra(bytes([kind]) + bytes(7))
    with pytest.raises(NetifError, match="size 0"):
        netif.decode_extra(netif.encode_extra(NetifGsoExtra(0, XEN_NETIF_GSO_TYPE_TCPV4)))
    with pytest.raises(NetifError, match="bad GSO type 0"):
        netif.decode_extra(netif.encode_extra(NetifGsoExtra(1448, 0)))
    with pytest.raises(NetifError, match="of 2 bytes, need 6"):
        netif.encode_extra(NetifMcastExtra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, b"\1\2"))
    with pytest.raises(NetifError, match="not MCAST"):
        netif.encode_extra(NetifMcastExtra(1, bytes(6)))
    with pytest.raises(NetifError, match="cannot encode"):
        netif.encode_extra(NetifHashExtra(0, 1, 2**32))
    gso = netif.encode_extra(NetifGsoExtra(1448, 1, flags=XEN_NETIF_EXTRA_FLAG_MORE))
    assert gso == bytes([1, 1, 0xA8, 0x05, 1, 0, 0, 0])


def test_hash_value_is_stored_lsb_first() -> None:
    encoded = netif.encode_extra(NetifHashExtra(1, 1, 0x11223344))
    assert encoded == bytes([4, 0, 1, 1, 0x44, 0x33, 0x22, 0x11])


def test_tx_fragment_sizes() -> None:
    def tx(offset: int, flags: int, size: int, id: int = 0) -> NetifTxRequest:
        return NetifTxRequest(1, offset, flags, id, size)

    assert tx_fragment_sizes([tx(0, NETTXF_csum_blank, 1514)]) == [1514]
    assert tx_fragment_sizes([tx(4096 - 60, 0, 60)]) == [60]
    # first slot carries the whole packet's size: 9000 = 4000 + 4096 + 904
    packet = [tx(96, NETTXF_more_data, 9000), tx(0, NETTXF_more_data, 4096), tx(0, 0, 904)]
    assert tx_fragment_sizes(packet) == [4000, 4096, 904]
    with pytest.raises(NetifError, match=r"crosses its frame: offset 97 \+ size 4000 > 4096"):
        tx_fragment_sizes([tx(97, NETTXF_more_data, 9000), *packet[1:]])
    with pytest.raises(NetifError, match="crosses its frame"):
        tx_fragment_sizes([tx(100, 0, 4000)])
    assert tx_fragment_sizes([tx(100, 0, 16000)], granule=16384) == [16000]  # 16 KiB grants
    with pytest.raises(NetifError, match="later fragments of 5000 bytes"):
        tx_fragment_sizes([tx(0, NETTXF_more_data, 4000, id=3), tx(0, 0, 5000)])
    with pytest.raises(NetifError, match="lacks NETTXF_more_data"):
        tx_fragment_sizes([tx(0, 0, 2000), tx(0, 0, 1000)])
    with pytest.raises(NetifError, match="has NETTXF_more_data"):
        tx_fragment_sizes([tx(0, NETTXF_more_data, 2000)])
    with pytest.raises(NetifError, match="empty"):
        tx_fragment_sizes([])


def test_rx_response_must_stay_inside_its_frame() -> None:
    ok = netif.encode_rx_response(NetifRxResponse(1, 4000, NETRXF_more_data, 96))
    assert netif.decode_rx_response(ok).status == 96
    bad = netif.encode_rx_response(NetifRxResponse(1, 4000, 0, 97))
    with pytest.raises(NetifError, match="crosses its frame"):
        netif.decode_rx_response(bad)
    assert netif.decode_rx_response(bad, granule=16384).status == 97
    errored = netif.encode_rx_response(NetifRxResponse(1, 5000, 0, -1))  # no data: no check
    assert netif.decode_rx_response(errored).status == -1


@given(data=st.binary(max_size=16))
@settings(max_examples=300, deadline=None)
def test_garbage_raises_only_typed_errors(data: bytes) -> None:
    decoders = (
        netif.decode_tx_request,
        netif.decode_tx_response,
        netif.decode_rx_request,
        netif.decode_rx_response,
        netif.decode_extra,
    )
    for decode in decoders:
        with contextlib.suppress(NetifError):
            decode(data)
    with contextlib.suppress(NetifError):
        extra = netif.decode_extra(data)
        assert netif.decode_extra(netif.encode_extra(extra)) == extra
    assert issubclass(NetifError, XenpvError)


def test_a_packet_with_a_gso_extra_through_the_tx_ring() -> None:
    """A netfront-style packet: request, GSO extra in the next slot, a second fragment."""
    buffer = LocalBuffer(4096)
    front, back = FrontRing(buffer, NETIF_TX_RING), BackRing(buffer, NETIF_TX_RING)
    assert front.nr_ents == 256 and NETIF_RX_RING.nr_ents(4096) == 256
    first = NetifTxRequest(
        10, 2048, NETTXF_more_data | NETTXF_extra_info | NETTXF_csum_blank, 1, 3000
    )
    front.put_request(netif.encode_tx_request(first))
    front.put_request(netif.encode_extra(NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)))
    front.put_request(netif.encode_tx_request(NetifTxRequest(11, 0, 0, 2, 952)))
    assert front.push_requests()
    slots = back.take_requests()
    assert [len(slot) for slot in slots] == [12, 12, 12]
    packet = parse_tx_packet(slots)
    assert packet is not None
    assert packet.extras == [NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)]
    assert [r.id for r in packet.requests] == [1, 2]
    assert (packet.size, packet.sizes, packet.slots) == (3000, [2048, 952], 3)
    for status in (0, NETIF_RSP_NULL, 0):  # the extra slot gets a NULL response
        back.put_response(netif.encode_tx_response(NetifTxResponse(1, status)))
    back.push_responses()
    got = [netif.decode_tx_response(front.take_response() or b"") for _ in range(3)]
    assert [r.status for r in got] == [0, 1, 0]


def _slot(r: NetifTxRequest) -> bytes:
    return netif.encode_tx_request(r)


def test_parse_tx_packet_waits_for_the_whole_packet() -> None:
    first = NetifTxRequest(1, 0, NETTXF_more_data | NETTXF_extra_info, 7, 5000)
    gso = netif.encode_extra(NetifGsoExtra(1448, 1, flags=XEN_NETIF_EXTRA_FLAG_MORE))
    mcast = netif.encode_extra(NetifMcastExtra(XEN_NETIF_EXTRA_TYPE_MCAST_ADD, bytes(6)))
    last = NetifTxRequest(2, 0, 0, 8, 1000)
    slots = [_slot(first), gso, mcast, _slot(last), _slot(NetifTxRequest(3, 0, 0, 9, 60))]
    for n in range(4):
        assert parse_tx_packet(slots[:n]) is None
    packet = parse_tx_packet(slots)
    assert packet == TxPacket(
        [first, last], [netif.decode_extra(gso), netif.decode_extra(mcast)], [4000, 1000], 4
    )
    assert parse_tx_packet(slots[4:]) == TxPacket([netif.decode_tx_request(slots[4])], [], [60], 1)


def test_parse_tx_packet_errors_say_how_many_slots_to_answer() -> None:
    crossing = [
        _slot(NetifTxRequest(1, 4000, NETTXF_more_data, 1, 200)),
        _slot(NetifTxRequest(1, 0, 0, 2, 50)),
    ]
    with pytest.raises(NetifError, match="crosses its frame") as info:
        parse_tx_packet(crossing)
    assert info.value.slots == 2
    chain = [_slot(NetifTxRequest(1, 0, NETTXF_more_data, i, 100)) for i in range(19)]
    with pytest.raises(NetifError, match="more than 18 slots") as info:
        parse_tx_packet(chain)
    assert info.value.slots is None  # cannot find the packet's end: fatal
    bad_extra = [_slot(NetifTxRequest(1, 0, NETTXF_extra_info, 1, 100)), bytes(12)]
    with pytest.raises(NetifError, match="invalid extra-info type 0") as info:
        parse_tx_packet(bad_extra)
    assert info.value.slots is None


@given(st.lists(st.binary(min_size=12, max_size=12), max_size=24))
@settings(max_examples=200, deadline=None)
def test_parse_tx_packet_on_garbage(slots: list[bytes]) -> None:
    try:
        packet = parse_tx_packet(slots)
    except NetifError as exc:
        assert exc.slots is None or 1 <= exc.slots <= len(slots)
        return
    if packet is not None:
        assert 1 <= packet.slots <= len(slots)
        assert sum(packet.sizes) == packet.size
        assert all(
            r.offset + size <= 4096 for r, size in zip(packet.requests, packet.sizes, strict=True)
        )
