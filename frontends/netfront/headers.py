"""Where the L3 and L4 headers of an Ethernet frame are: what checksum offload and GSO need.

Linux netfront hands partial-checksum packets to the stack, which finds the transport header
with `skb_checksum_setup` (IPv4, IPv6 with extension headers; TCP and UDP); the TAP attach
needs the same facts to fill a virtio-net header (`csum_start`, `csum_offset`, `hdr_len`), and
the queue selection needs the flow's addresses and ports (`skb_get_hash`). `parse` reads
only headers, never trusts a length it has not bounds-checked, and returns None for anything
it does not understand (the caller then treats the frame as an opaque, non-offloaded one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8
VLAN_HLEN: Final = 4
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
# IPv6 extension headers skb_checksum_setup_ipv6 walks (hop-by-hop, routing, dest opts, fragment).
_IPV6_EXT: Final = frozenset({0, 43, 60, 44})
IPV6_FRAGMENT: Final = 44
TCP_CSUM_OFFSET: Final = 16  # offsetof(struct tcphdr, check)
UDP_CSUM_OFFSET: Final = 6  # offsetof(struct udphdr, check)
_MAX_IPV6_EXT: Final = 8

_U16 = struct.Struct("!H")


@dataclass(frozen=True, slots=True)
class Headers:
    """Offsets and flow identity of one frame (`l4_proto` 0: no TCP/UDP header found)."""

    ethertype: int
    l3_offset: int
    l4_offset: int
    l4_proto: int
    l4_header_len: int  # TCP: data offset * 4; UDP: 8; 0 if no L4 header
    src: bytes  # L3 addresses
    dst: bytes
    sport: int
    dport: int
    fragment: bool  # a non-first IP fragment (or any fragment: ports are unreliable)

    @property
    def csum_offset(self) -> int:
        """Where, after `l4_offset`, the L4 checksum lives (0 when there is none)."""
        if self.l4_proto == IPPROTO_TCP:
            return TCP_CSUM_OFFSET
        if self.l4_proto == IPPROTO_UDP:
            return UDP_CSUM_OFFSET
        return 0

    @property
    def header_len(self) -> int:
        """Ethernet + IP + TCP/UDP header bytes (virtio-net `hdr_len`)."""
        return self.l4_offset + self.l4_header_len


def parse(frame: bytes | memoryview) -> Headers | None:
    """Find the L3/L4 headers of an Ethernet frame (802.1Q/802.1ad tags skipped)."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    offset = 12
    ethertype = _U16.unpack_from(frame, offset)[0]
    offset = ETH_HLEN
    tags = 0
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD) and tags < 2:
        if n < offset + VLAN_HLEN:
            return None
        ethertype = _U16.unpack_from(frame, offset + 2)[0]
        offset += VLAN_HLEN
        tags += 1
    if ethertype == ETH_P_IP:
        return _ipv4(frame, offset)
    if ethertype == ETH_P_IPV6:
        return _ipv6(frame, offset)
    return None


def _ipv4(frame: bytes | memoryview, l3: int) -> Headers | None:
    if len(frame) < l3 + 20:
        return None
    version_ihl = frame[l3]
    ihl = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or ihl < 20 or len(frame) < l3 + ihl:
        return None
    frag = _U16.unpack_from(frame, l3 + 6)[0]
    fragment = bool(frag & 0x3FFF)  # MF set or a non-zero fragment offset
    proto = frame[l3 + 9]
    src = bytes(frame[l3 + 12 : l3 + 16])
    dst = bytes(frame[l3 + 16 : l3 + 20])
    return _l4(frame, ETH_P_IP, l3, l3 + ihl, proto, src, dst, fragment)


def _ipv6(frame: bytes | memoryview, l3: int) -> Headers | None:
    if len(frame) < l3 + 40 or frame[l3] >> 4 != 6:
        return None
    proto = frame[l3 + 6]
    src = bytes(frame[l3 + 8 : l3 + 24])
    dst = bytes(frame[l3 + 24 : l3 + 40])
    offset = l3 + 40
    fragment = False
    for _ in range(_MAX_IPV6_EXT):
        if proto not in _IPV6_EXT:
            break
        if len(frame) < offset + 8:
            return None
        if proto == IPV6_FRAGMENT:
            fragment = True
            length = 8
        else:
            length = (frame[offset + 1] + 1) * 8
        proto = frame[offset]
        offset += length
    else:
        return None
    if offset > len(frame):
        return None
    return _l4(frame, ETH_P_IPV6, l3, offset, proto, src, dst, fragment)


def _l4(
    frame: bytes | memoryview,
    ethertype: int,
    l3: int,
    l4: int,
    proto: int,
    src: bytes,
    dst: bytes,
    fragment: bool,
) -> Headers:
    header_len = 0
    sport = dport = 0
    if fragment:  # no reliable L4 header in a fragment (skb_checksum_setup: -EPROTO)
        proto = 0
    elif proto == IPPROTO_TCP and len(frame) >= l4 + 20:
        header_len = (frame[l4 + 12] >> 4) * 4
        if header_len < 20 or len(frame) < l4 + header_len:
            header_len = 0
    elif proto == IPPROTO_UDP and len(frame) >= l4 + 8:
        header_len = 8
    if header_len:
        sport, dport = struct.unpack_from("!HH", frame, l4)
    else:
        proto = 0
    return Headers(ethertype, l3, l4, proto, header_len, src, dst, sport, dport, fragment)
