"""Where the headers of an Ethernet frame are, and the flow hash computed from them (sans-IO).

One walker for both vif drivers. netback needs it for `skb_checksum_setup` on guest transmit
(csum_start / csum_offset / hdr_len of a partial-checksum or GSO frame); netfront for the same
on receive (its TAP attach fills a virtio-net header) and for queue selection. `parse` skips
up to two VLAN tags (802.1Q / 802.1ad), walks IPv4 options and IPv6 extension headers
(hop-by-hop, routing, destination options, fragment, and AUTH with its own length rule), reads
only bytes it has bounds-checked, and returns None for anything it does not understand; each
caller decides what that means (netback: drop the frame, netfront: an opaque frame).

`flow_hash` hashes what Linux's flow dissector feeds `skb_get_hash` (both netfront's
`xennet_select_queue` and netback's rx queue choice use it): IP addresses, L4 protocol and
ports; addresses only for fragments and non-TCP/UDP packets; the Ethernet header for frames
that are not IP. CRC-32 with a fixed seed instead of Linux's per-boot random key, so tests
are reproducible.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final, TypeAlias

ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8
VLAN_HLEN: Final = 4
MAX_VLAN_TAGS: Final = 2  # QinQ: an outer 802.1ad tag and an inner 802.1Q one
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
# IPv6 extension headers skb_checksum_setup_ipv6 walks through.
NEXTHDR_HOP: Final = 0
NEXTHDR_ROUTING: Final = 43
NEXTHDR_FRAGMENT: Final = 44
NEXTHDR_AUTH: Final = 51
NEXTHDR_DEST: Final = 60
_IPV6_EXT: Final = frozenset(
    {NEXTHDR_HOP, NEXTHDR_ROUTING, NEXTHDR_FRAGMENT, NEXTHDR_AUTH, NEXTHDR_DEST}
)
# Bounds the walk a hostile frame can ask for (a chain of 8-byte headers); more is opaque.
MAX_IPV6_EXT_HEADERS: Final = 8
IP_MF_OR_OFFSET: Final = 0x3FFF  # IPv4 frag_off: MF flag and the 13-bit fragment offset
IP6_MF_OR_OFFSET: Final = 0xFFF9  # IPv6 fragment header: 13-bit offset and the M flag
TCP_CSUM_OFFSET: Final = 16  # offsetof(struct tcphdr, check)
UDP_CSUM_OFFSET: Final = 6  # offsetof(struct udphdr, check)

_U16 = struct.Struct("!H")
# The flow key's L4 part when there are no ports to hash: protocol 0, ports 0.
_NO_L4_KEY: Final = bytes(5)
_PROTO_BYTE: Final = {IPPROTO_TCP: bytes([IPPROTO_TCP]), IPPROTO_UDP: bytes([IPPROTO_UDP])}

Buffer: TypeAlias = bytes | bytearray | memoryview


# Not frozen: a frozen dataclass's __init__ (object.__setattr__ per field) costs three times
# as much, on the per-frame path. Nothing writes one after `parse` made it.
@dataclass(slots=True)
class Headers:
    """Offsets of one frame's L3/L4 headers (every offset from the start of the frame)."""

    ethertype: int  # ETH_P_IP or ETH_P_IPV6 (the one after any VLAN tags)
    l3_offset: int
    l4_offset: int  # after IPv4 options / IPv6 extension headers (within the frame)
    ip_proto: int  # IPv4 protocol / the last IPv6 next-header
    l4_header_len: int  # TCP data offset * 4 or UDP 8 when that whole header is here, else 0
    fragment: bool  # MF or a non-zero fragment offset: no L4 header to trust
    # An IPv4 fragment or any IPv6 fragment header, atomic ones (offset 0, no MF) included:
    # the flow dissector hashes such packets by addresses only; checksum setup ignores it.
    fragment_header: bool

    @property
    def ipv6(self) -> bool:
        return self.ethertype == ETH_P_IPV6

    @property
    def l4_proto(self) -> int:
        """IPPROTO_TCP / IPPROTO_UDP when a whole TCP/UDP header was found, else 0."""
        return self.ip_proto if self.l4_header_len else 0

    @property
    def csum_offset(self) -> int:
        """Where, after `l4_offset`, the L4 checksum lives (0 when there is none)."""
        if not self.l4_header_len:
            return 0
        return TCP_CSUM_OFFSET if self.ip_proto == IPPROTO_TCP else UDP_CSUM_OFFSET

    @property
    def header_len(self) -> int:
        """Ethernet + IP + TCP/UDP header bytes (virtio-net `hdr_len`)."""
        return self.l4_offset + self.l4_header_len

    @property
    def addresses(self) -> slice:
        """Source then destination address: the IP pseudo-header's and the flow key's."""
        if self.ethertype == ETH_P_IPV6:
            return slice(self.l3_offset + 8, self.l3_offset + 40)
        return slice(self.l3_offset + 12, self.l3_offset + 20)


def parse(frame: Buffer) -> Headers | None:
    """Find the L3/L4 headers of an Ethernet frame; None if it is not IPv4/IPv6 we can walk."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    ethertype = _U16.unpack_from(frame, 12)[0]
    l3 = ETH_HLEN
    tags = 0
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD) and tags < MAX_VLAN_TAGS:
        if n < l3 + VLAN_HLEN:
            return None
        ethertype = _U16.unpack_from(frame, l3 + 2)[0]
        l3 += VLAN_HLEN
        tags += 1
    if ethertype == ETH_P_IP:
        return _ipv4(frame, n, l3)
    if ethertype == ETH_P_IPV6:
        return _ipv6(frame, n, l3)
    return None


def _ipv4(frame: Buffer, n: int, l3: int) -> Headers | None:
    if n < l3 + 20:
        return None
    version_ihl = frame[l3]
    ihl = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or ihl < 20 or n < l3 + ihl:
        return None
    proto = frame[l3 + 9]
    l4 = l3 + ihl
    if _U16.unpack_from(frame, l3 + 6)[0] & IP_MF_OR_OFFSET:
        return Headers(ETH_P_IP, l3, l4, proto, 0, True, True)
    return Headers(ETH_P_IP, l3, l4, proto, _l4_header_len(frame, n, l4, proto), False, False)


def _ipv6(frame: Buffer, n: int, l3: int) -> Headers | None:
    if n < l3 + 40 or frame[l3] >> 4 != 6:
        return None
    proto = frame[l3 + 6]
    pos = l3 + 40
    fragment = fragment_header = False
    walked = 0
    while proto in _IPV6_EXT:
        if walked == MAX_IPV6_EXT_HEADERS or n < pos + 8:
            return None
        walked += 1
        if proto == NEXTHDR_FRAGMENT:
            fragment_header = True
            if _U16.unpack_from(frame, pos + 2)[0] & IP6_MF_OR_OFFSET:
                fragment = True
            length = 8
        elif proto == NEXTHDR_AUTH:  # RFC 4302: length in 4-octet units, minus 2
            length = (frame[pos + 1] + 2) * 4
        else:  # RFC 8200: length in 8-octet units, not counting the first 8 octets
            length = (frame[pos + 1] + 1) * 8
        proto = frame[pos]
        pos += length
    if pos > n:
        return None
    header_len = 0 if fragment else _l4_header_len(frame, n, pos, proto)
    return Headers(ETH_P_IPV6, l3, pos, proto, header_len, fragment, fragment_header)


def _l4_header_len(frame: Buffer, n: int, l4: int, proto: int) -> int:
    """The TCP/UDP header's length if all of it is in the frame (a TCP data offset below 5
    or past the end is no header), else 0."""
    if proto == IPPROTO_TCP:
        if n < l4 + 20:
            return 0
        length = (frame[l4 + 12] >> 4) * 4
        return length if length >= 20 and n >= l4 + length else 0
    if proto == IPPROTO_UDP and n >= l4 + 8:
        return 8
    return 0


def flow_hash(frame: Buffer, seed: int = 0) -> int:
    """A 32-bit hash of the frame's flow (equal for every frame of one flow)."""
    seed &= 0xFFFFFFFF
    headers = parse(frame)
    if headers is None:
        return zlib.crc32(frame[:ETH_HLEN], seed)
    # CRC-32 chains: crc32(b, crc32(a)) == crc32(a + b), so the key is never concatenated.
    l3 = headers.l3_offset
    if headers.ethertype == ETH_P_IPV6:
        crc = zlib.crc32(frame[l3 + 8 : l3 + 40], seed)  # source and destination addresses
    else:
        crc = zlib.crc32(frame[l3 + 12 : l3 + 20], seed)
    if headers.l4_header_len and not headers.fragment_header:
        l4 = headers.l4_offset
        crc = zlib.crc32(_PROTO_BYTE[headers.ip_proto], crc)
        return zlib.crc32(frame[l4 : l4 + 4], crc)  # source and destination ports
    return zlib.crc32(_NO_L4_KEY, crc)
