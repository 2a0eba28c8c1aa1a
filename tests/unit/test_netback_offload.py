"""netback offload: header parsing, checksums, netif flags ⇄ VirtioNetHdr."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.offload import (
    OffloadError,
    RxOffload,
    complete_checksum,
    ones_sum,
    parse_l4,
    pseudo_header_sum,
    rx_metadata,
    tx_metadata,
)
from xenpv.abi.netif import (
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifGsoExtra,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETTXF_csum_blank,
    NETTXF_data_validated,
)
from xenpv.abi.virtio_net import VirtioNetHdr

MACS = bytes.fromhex("020000000002020000000001")


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4(proto: int, payload: bytes, *, frag: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        1,
        frag,
        64,
        proto,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return MACS + b"\x08\x00" + header + payload


def ipv6(nexthdr: int, payload: bytes, ext: bytes = b"") -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(ext) + len(payload),
        nexthdr,
        64,
        bytes(15) + b"\1",
        bytes(15) + b"\2",
    )
    return MACS + b"\x86\xdd" + header + ext + payload


def tcp(payload: bytes = b"hello") -> bytes:
    return struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload


def udp(payload: bytes = b"hello") -> bytes:
    return struct.pack("!HHHH", 1234, 53, 8 + len(payload), 0) + payload


def verify(frame: bytes, start: int) -> bool:
    """An L4 checksum is right when pseudo header + segment sum to 0xFFFF."""
    l4 = parse_l4(frame)
    return _fold(pseudo_header_sum(frame, l4) + ones_sum(frame[start:])) == 0xFFFF


def _fold(v: int) -> int:
    while v > 0xFFFF:
        v = (v & 0xFFFF) + (v >> 16)
    return v


@settings(max_examples=200)
@given(st.binary(max_size=3000))
def test_ones_sum_matches_naive(data: bytes) -> None:
    assert ones_sum(data) == naive_sum(data) or (ones_sum(data) == 0xFFFF and naive_sum(data) == 0)


def test_parse_ipv4_tcp_udp() -> None:
    assert (parse_l4(ipv4(6, tcp())).l4_offset, parse_l4(ipv4(6, tcp())).csum_offset) == (34, 16)
    assert (parse_l4(ipv4(17, udp())).l4_offset, parse_l4(ipv4(17, udp())).csum_offset) == (34, 6)


def test_parse_ipv6_with_extension_headers() -> None:
    hop = bytes([6, 0]) + bytes(6)  # hop-by-hop, next = TCP, 8 bytes
    l4 = parse_l4(ipv6(0, tcp(), hop))
    assert l4.ipv6 and l4.l4_offset == 14 + 40 + 8 and l4.ip_proto == 6


@pytest.mark.parametrize(
    "frame",
    [
        ipv4(6, tcp(), frag=0x2000),  # MF
        ipv4(1, b"\0" * 8),  # ICMP
        ipv6(44, tcp(), bytes([6, 0, 0, 8, 0, 0, 0, 1])),  # a non-first fragment
        MACS + b"\x08\x06" + bytes(28),  # ARP
        b"\0" * 10,
    ],
)
def test_unparseable_frames(frame: bytes) -> None:
    with pytest.raises(OffloadError):
        parse_l4(frame)


def test_tx_csum_blank_becomes_needs_csum() -> None:
    frame = bytearray(ipv4(6, tcp()))
    meta = tx_metadata(frame, NETTXF_csum_blank, None)
    assert meta is not None and meta.needs_csum and (meta.csum_start, meta.csum_offset) == (34, 16)


def test_tx_data_validated_and_plain() -> None:
    frame = bytearray(ipv4(6, tcp()))
    assert tx_metadata(frame, NETTXF_data_validated, None) == VirtioNetHdr(flags=2)
    assert tx_metadata(frame, 0, None) is None


def test_tx_csum_blank_on_arp_refused() -> None:
    with pytest.raises(OffloadError):
        tx_metadata(bytearray(MACS + b"\x08\x06" + bytes(28)), NETTXF_csum_blank, None)


def test_tx_gso_fields_and_checksum_fixup() -> None:
    frame = bytearray(ipv6(6, tcp(bytes(3000))))
    meta = tx_metadata(frame, 0, NetifGsoExtra(1440, XEN_NETIF_GSO_TYPE_TCPV6))
    assert meta is not None
    assert (meta.gso_type, meta.gso_size, meta.hdr_len) == (4, 1440, 14 + 40 + 20)
    l4 = parse_l4(frame)
    stored = struct.unpack_from("!H", frame, l4.l4_offset + 16)[0]
    assert stored == pseudo_header_sum(frame, l4)  # the pseudo-header sum, to be completed
    with pytest.raises(OffloadError):  # a TCPv4 GSO type on an IPv6 frame
        tx_metadata(
            bytearray(frame), NETTXF_csum_blank, NetifGsoExtra(1440, XEN_NETIF_GSO_TYPE_TCPV4)
        )


def partial(frame: bytes) -> bytes:
    """Put the pseudo-header sum into the checksum field (what a csum_blank sender does)."""
    out = bytearray(frame)
    l4 = parse_l4(out)
    struct.pack_into("!H", out, l4.l4_offset + l4.csum_offset, pseudo_header_sum(out, l4))
    return bytes(out)


@pytest.mark.parametrize(
    "frame",
    [
        ipv4(6, tcp(bytes(range(201)))),
        ipv4(17, udp(b"x" * 33)),
        ipv6(6, tcp(b"abc")),
        ipv6(17, udp(bytes(1000))),
    ],
)
def test_complete_checksum_verifies(frame: bytes) -> None:
    frame = partial(frame)
    l4 = parse_l4(frame)
    done = complete_checksum(frame, l4.l4_offset, l4.csum_offset)
    assert verify(done, l4.l4_offset)


def test_rx_flags_when_offload_accepted() -> None:
    frame = partial(ipv4(6, tcp()))
    meta = VirtioNetHdr(flags=1, csum_start=34, csum_offset=16)
    out, flags, gso = rx_metadata(frame, meta, RxOffload())
    assert out == frame and flags == NETRXF_csum_blank | NETRXF_data_validated and gso is None
    assert rx_metadata(frame, VirtioNetHdr(flags=2), RxOffload())[1] == NETRXF_data_validated
    assert rx_metadata(frame, None, RxOffload()) == (frame, 0, None)


def test_rx_checksum_completed_for_frontends_without_offload() -> None:
    frame = partial(ipv6(6, tcp(b"payload")))
    meta = VirtioNetHdr(flags=1, csum_start=54, csum_offset=16)
    out, flags, _ = rx_metadata(frame, meta, RxOffload(ipv6_csum=False))
    assert flags == 0 and verify(out, 54)


def test_rx_gso_needs_the_frontend_feature() -> None:
    frame = partial(ipv4(6, tcp(bytes(3000))))
    meta = VirtioNetHdr(
        flags=1, gso_type=1, gso_size=1448, hdr_len=54, csum_start=34, csum_offset=16
    )
    with pytest.raises(OffloadError):
        rx_metadata(frame, meta, RxOffload())
    _, flags, gso = rx_metadata(frame, meta, RxOffload(gso_tcpv4=True))
    assert gso == NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) and flags & NETRXF_csum_blank
    with pytest.raises(OffloadError):  # UDP GSO has no netif encoding
        rx_metadata(frame, VirtioNetHdr(gso_type=3, gso_size=1000), RxOffload(gso_tcpv4=True))
