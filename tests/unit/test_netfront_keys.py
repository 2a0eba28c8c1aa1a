"""netfront's handshake keys, header parsing, flow hashing and TAP offload mapping."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.netfront.core import RxFrame
from frontends.netfront.flowhash import select_queue
from frontends.netfront.keys import (
    BackendFeatures,
    HandshakeError,
    QueueKeys,
    frontend_keys,
    negotiate_queues,
    parse_features,
    parse_mac,
)
from frontends.netfront.tap import OffloadError, to_netif, to_virtio
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6, NetifGsoExtra
from xenpv.abi.virtio_net import VirtioNetHdr, VirtioNetHdrFlags, VirtioNetHdrGso
from xenpv.ethernet import parse

MAC_A = bytes.fromhex("00163e000001")
MAC_B = bytes.fromhex("00163e000002")


def tcp4(sport: int, dport: int, payload: bytes = b"x" * 20, options: bytes = b"") -> bytes:
    tcp = (
        struct.pack(
            "!HHIIBBHHH", sport, dport, 1, 0, (5 + len(options) // 4) << 4, 0x18, 65535, 0, 0
        )
        + options
    )
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp) + len(payload),
        0,
        0x4000,
        64,
        6,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return MAC_B + MAC_A + b"\x08\x00" + ip + tcp + payload


def udp6(sport: int, dport: int, payload: bytes = b"y" * 8) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    # one hop-by-hop extension header before UDP
    hbh = bytes([17, 0]) + bytes(6)
    ip = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(hbh) + len(udp) + len(payload),
        0,
        64,
        b"\xfe\x80" + bytes(14),
        b"\xfe\x80" + bytes(13) + b"\x02",
    )
    return MAC_B + MAC_A + b"\x86\xdd" + ip + hbh + udp + payload


# --- keys -------------------------------------------------------------------------------------


def test_single_queue_keys_at_top_level() -> None:
    keys = frontend_keys([QueueKeys(8, 9, 3, 3)], split_event_channels=False)
    assert keys["tx-ring-ref"] == 8 and keys["rx-ring-ref"] == 9 and keys["event-channel"] == 3
    assert "multi-queue-num-queues" not in keys and "event-channel-tx" not in keys
    for feature in (
        "request-rx-copy",
        "feature-rx-notify",
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-ipv6-csum-offload",
    ):
        assert keys[feature] == 1


def test_multi_queue_split_keys_per_queue() -> None:
    keys = frontend_keys(
        [QueueKeys(8, 9, 3, 4), QueueKeys(10, 11, 5, 6)], split_event_channels=True
    )
    assert keys["multi-queue-num-queues"] == 2
    assert keys["queue-1/tx-ring-ref"] == 10 and keys["queue-1/event-channel-rx"] == 6
    assert keys["queue-0/event-channel-tx"] == 3
    assert "tx-ring-ref" not in keys and "queue-0/event-channel" not in keys
    with pytest.raises(HandshakeError):
        frontend_keys([], split_event_channels=False)


def test_backend_features_like_xenbus_read_unsigned() -> None:
    features = parse_features(
        {
            "feature-rx-copy": "1",
            "feature-sg": "junk",
            "multi-queue-max-queues": "4",
            "feature-split-event-channels": "1",
            "feature-gso-tcpv4": None,
        }
    )
    assert features == BackendFeatures(rx_copy=True, split_event_channels=True, max_queues=4)
    assert negotiate_queues(2, features) == 2
    assert negotiate_queues(16, BackendFeatures(max_queues=64)) == 8
    assert negotiate_queues(4, parse_features({"multi-queue-max-queues": "0"})) == 1


def test_mac_parsing() -> None:
    assert parse_mac("00:16:3e:00:00:01") == MAC_A
    for bad in (None, "00:16:3e:00:00", "zz:16:3e:00:00:01", "0016.3e00.0001"):
        with pytest.raises(HandshakeError):
            parse_mac(bad)


# --- headers and flow hashing -------------------------------------------------------------------


def test_parse_tcp4_and_udp6_with_extension_header() -> None:
    h = parse(tcp4(1000, 80, options=b"\x01" * 12))
    assert h is not None and h.l4_offset == 34 and h.l4_header_len == 32
    assert (h.l4_proto, h.csum_offset, h.header_len) == (6, 16, 66)
    h6 = parse(udp6(53, 5353))
    assert h6 is not None and h6.l4_offset == 14 + 40 + 8 and h6.csum_offset == 6
    assert struct.unpack_from("!HH", udp6(53, 5353), h6.l4_offset) == (53, 5353)
    vlan = tcp4(1, 2)[:12] + b"\x81\x00\x00\x05" + tcp4(1, 2)[12:]
    hv = parse(vlan)
    assert hv is not None and hv.l4_offset == 38


def test_fragments_and_non_ip_have_no_l4() -> None:
    frame = bytearray(tcp4(1, 2))
    frame[14 + 6] = 0x20  # MF
    h = parse(bytes(frame))
    assert h is not None and h.fragment and h.l4_proto == 0 and h.csum_offset == 0
    assert parse(MAC_B + MAC_A + b"\x08\x06" + bytes(28)) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parse_never_raises_on_garbage(data: bytes) -> None:
    for frame in (data, tcp4(1, 2)[:34] + data, udp6(1, 2)[:54] + data):
        h = parse(frame)
        if h is not None:
            assert h.header_len <= len(frame)


@settings(deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(1, 8))
def test_a_flow_always_hashes_to_one_queue(sport: int, dport: int, queues: int) -> None:
    q = select_queue(tcp4(sport, dport), queues)
    assert 0 <= q < queues
    assert select_queue(tcp4(sport, dport, payload=b"other payload" * 50), queues) == q


def test_flows_spread_over_queues() -> None:
    used = {select_queue(tcp4(port, 80), 4) for port in range(1000, 1064)}
    assert used == {0, 1, 2, 3}
    assert select_queue(tcp4(5, 6), 1) == 0


# --- TAP offload mapping --------------------------------------------------------------------------


def test_virtio_to_netif() -> None:
    hdr = VirtioNetHdr(
        flags=VirtioNetHdrFlags.VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type=VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV6,
        hdr_len=74,
        gso_size=1428,
        csum_start=54,
        csum_offset=16,
    )
    assert to_netif(hdr) == (NetifGsoExtra(1428, XEN_NETIF_GSO_TYPE_TCPV6), True, False)
    assert to_netif(VirtioNetHdr()) == (None, False, False)
    with pytest.raises(OffloadError):
        to_netif(VirtioNetHdr(gso_type=VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_UDP, gso_size=1400))


def test_netif_to_virtio() -> None:
    frame = tcp4(1000, 80, payload=bytes(3000))
    hdr = to_virtio(RxFrame(frame, NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4), True, True))
    assert hdr.needs_csum and hdr.csum_start == 34 and hdr.csum_offset == 16
    assert hdr.gso_type == VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4
    assert hdr.gso_size == 1448 and hdr.hdr_len == 54
    assert to_virtio(RxFrame(frame, None, False, True)).data_valid
    assert to_virtio(RxFrame(frame)) == VirtioNetHdr()
    with pytest.raises(OffloadError):
        to_virtio(RxFrame(MAC_B + MAC_A + b"\x08\x06" + bytes(28), None, True, True))
