"""xenpv.ethernet: the header walker and flow hash both vif drivers use.

Random frames (VLAN tags, IPv4 options, IPv6 extension chains with AUTH and fragments, TCP/UDP
headers with any data offset) and every truncation of them: `parse` never raises, never
reports a header past the end, and agrees with the two walkers it replaced (copied below as
oracles) on every frame they understood, apart from the documented differences.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.netback.offload import OffloadError, parse_l4
from xenpv.ethernet import (
    ETH_HLEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_IPV6_EXT_HEADERS,
    flow_hash,
    parse,
)

MACS = bytes.fromhex("020000000002020000000001")
SRC6 = bytes(15) + b"\1"
DST6 = bytes(15) + b"\2"

# --- the replaced walkers, verbatim apart from names, as oracles ----------------------------


@dataclass(frozen=True)
class OldNetfrontHeaders:
    ethertype: int
    l3_offset: int
    l4_offset: int
    l4_proto: int
    l4_header_len: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    fragment: bool

    @property
    def csum_offset(self) -> int:
        return {6: 16, 17: 6}.get(self.l4_proto, 0)

    @property
    def header_len(self) -> int:
        return self.l4_offset + self.l4_header_len


def old_netfront_parse(frame: bytes) -> OldNetfrontHeaders | None:
    """frontends/netfront/headers.py `parse` before xenpv.ethernet."""
    n = len(frame)
    if n < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    offset = 14
    tags = 0
    while ethertype in (0x8100, 0x88A8) and tags < 2:
        if n < offset + 4:
            return None
        ethertype = struct.unpack_from("!H", frame, offset + 2)[0]
        offset += 4
        tags += 1
    if ethertype == 0x0800:
        l3 = offset
        if len(frame) < l3 + 20:
            return None
        version_ihl = frame[l3]
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or ihl < 20 or len(frame) < l3 + ihl:
            return None
        fragment = bool(struct.unpack_from("!H", frame, l3 + 6)[0] & 0x3FFF)
        return _old_nf_l4(
            frame, 0x0800, l3, l3 + ihl, frame[l3 + 9], frame[l3 + 12 : l3 + 16],
            frame[l3 + 16 : l3 + 20], fragment,
        )  # fmt: skip
    if ethertype == 0x86DD:
        l3 = offset
        if len(frame) < l3 + 40 or frame[l3] >> 4 != 6:
            return None
        proto = frame[l3 + 6]
        offset = l3 + 40
        fragment = False
        for _ in range(8):
            if proto not in {0, 43, 60, 44}:
                break
            if len(frame) < offset + 8:
                return None
            if proto == 44:
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
        return _old_nf_l4(
            frame, 0x86DD, l3, offset, proto, frame[l3 + 8 : l3 + 24], frame[l3 + 24 : l3 + 40],
            fragment,
        )  # fmt: skip
    return None


def _old_nf_l4(
    frame: bytes, ethertype: int, l3: int, l4: int, proto: int, src: bytes, dst: bytes,
    fragment: bool,
) -> OldNetfrontHeaders:  # fmt: skip
    header_len = 0
    sport = dport = 0
    if fragment:
        proto = 0
    elif proto == 6 and len(frame) >= l4 + 20:
        header_len = (frame[l4 + 12] >> 4) * 4
        if header_len < 20 or len(frame) < l4 + header_len:
            header_len = 0
    elif proto == 17 and len(frame) >= l4 + 8:
        header_len = 8
    if header_len:
        sport, dport = struct.unpack_from("!HH", frame, l4)
    else:
        proto = 0
    return OldNetfrontHeaders(
        ethertype, l3, l4, proto, header_len, src, dst, sport, dport, fragment
    )


def old_netfront_flow_hash(frame: bytes, seed: int = 0) -> int:
    """frontends/netfront/flowhash.py `flow_hash` before xenpv.ethernet."""
    headers = old_netfront_parse(frame)
    if headers is None:
        key = bytes(frame[:14])
    else:
        ports = struct.pack("!BHH", headers.l4_proto, headers.sport, headers.dport)
        key = headers.src + headers.dst + ports
    return zlib.crc32(key, seed & 0xFFFFFFFF)


def old_netback_parse_l4(frame: bytes) -> tuple[bool, int, int, int]:
    """backends/netback/offload.py `parse_l4` before xenpv.ethernet: (ipv6, protocol, offset,
    l3_offset), ValueError where it raised OffloadError."""
    if len(frame) < 14:
        raise ValueError("no Ethernet header")
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if ethertype == 0x0800:
        if len(frame) < off + 20:
            raise ValueError("truncated IPv4 header")
        ihl = (frame[off] & 0x0F) * 4
        if frame[off] >> 4 != 4 or ihl < 20 or len(frame) < off + ihl:
            raise ValueError("bad IPv4 header")
        if struct.unpack_from("!H", frame, off + 6)[0] & 0x3FFF:
            raise ValueError("IPv4 fragment")
        ipv6, protocol, pos = False, frame[off + 9], off + ihl
    elif ethertype == 0x86DD:
        if len(frame) < off + 40 or frame[off] >> 4 != 6:
            raise ValueError("bad IPv6 header")
        nexthdr = frame[off + 6]
        pos = off + 40
        while nexthdr in (0, 43, 60, 51, 44):
            if len(frame) < pos + 8:
                raise ValueError("truncated IPv6 extension header")
            if nexthdr == 44:
                if struct.unpack_from("!H", frame, pos + 2)[0] & 0xFFF9:
                    raise ValueError("IPv6 fragment")
                length = 8
            elif nexthdr == 51:
                length = (frame[pos + 1] + 2) * 4
            else:
                length = (frame[pos + 1] + 1) * 8
            nexthdr = frame[pos]
            pos += length
        ipv6, protocol = True, nexthdr
    else:
        raise ValueError("ethertype")
    if protocol not in (6, 17):
        raise ValueError("protocol")
    if len(frame) < pos + (20 if protocol == 6 else 8):
        raise ValueError("truncated transport header")
    return ipv6, protocol, pos, off


# --- random frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    frame: bytes
    auth: bool  # an IPv6 AUTH header in the chain (the old netfront walker stopped there)
    ext_headers: int  # IPv6 extension headers in the chain


@st.composite
def frames(draw: st.DrawFn) -> Built:
    tags = b"".join(
        struct.pack("!HH", draw(st.sampled_from([0x8100, 0x88A8])), draw(st.integers(0, 4095)))
        for _ in range(draw(st.integers(0, 3)))
    )
    kind = draw(st.sampled_from(["ipv4", "ipv6", "ipv6", "other"]))
    l4_proto = draw(st.sampled_from([IPPROTO_TCP] * 3 + [IPPROTO_UDP] * 2 + [1, 51, 59, 255]))
    l4 = _l4_header(draw, l4_proto)
    payload = draw(st.binary(max_size=24))
    auth = False
    ext_count = 0
    if kind == "ipv4":
        options = bytes(4 * draw(st.integers(0, 10)))
        version_ihl = draw(st.sampled_from([0x45 + len(options) // 4] * 6 + [0x44, 0x65, 0x4F]))
        frag = draw(st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x6001, 0x8000]))
        ip = struct.pack(
            "!BBHHHBBH4s4s", version_ihl, 0, 0, 1, frag, 64, l4_proto, 0,
            bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]),
        ) + options  # fmt: skip
        l3 = b"\x08\x00" + ip + l4 + payload
    elif kind == "ipv6":
        chain = draw(st.lists(st.sampled_from([0, 43, 60, 44, 51]), max_size=10))
        ext_count = len(chain)
        auth = 51 in (*chain, l4_proto)
        nexts = [*chain[1:], l4_proto][: len(chain)]
        ext = b""
        for header, following in zip(chain, nexts, strict=True):
            if header == 44:
                frag = draw(st.sampled_from([0, 1, 8, 6, 0xFFF8]))  # 6: reserved bits only
                ext += struct.pack("!BBHI", following, 0, frag, 7)
            elif header == 51:
                units = draw(st.integers(0, 3))  # (units + 2) * 4 bytes
                ext += bytes([following, units]) + bytes((units + 2) * 4 - 2)
            else:
                units = draw(st.integers(0, 2))  # (units + 1) * 8 bytes
                ext += bytes([following, units]) + bytes((units + 1) * 8 - 2)
        first = chain[0] if chain else l4_proto
        version = draw(st.sampled_from([6] * 8 + [4]))
        ip = struct.pack("!IHBB16s16s", version << 28, 0, first, 64, SRC6, DST6)
        l3 = b"\x86\xdd" + ip + ext + l4 + payload
    else:
        l3 = struct.pack("!H", draw(st.sampled_from([0x0806, 0x88CC, 0x0600]))) + payload
    return Built(MACS + tags + l3, auth, ext_count)  # tags: between addresses and ethertype


def _l4_header(draw: st.DrawFn, proto: int) -> bytes:
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    if proto == IPPROTO_TCP:
        doff = draw(st.sampled_from([5, 5, 5, 6, 8, 15, 4, 0]))
        options = bytes(4 * max(0, min(doff, 8) - 5))  # doff 15: options cut short
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, doff << 4, 0x18, 1, 0, 0) + options
    if proto == IPPROTO_UDP:
        return struct.pack("!HHHH", sport, dport, 8, 0)
    return draw(st.binary(max_size=8))


def truncations(frame: bytes) -> list[bytes]:
    return [frame[:n] for n in range(len(frame) + 1)]


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(frames(), st.binary(max_size=64))
def test_parse_never_raises_and_stays_inside_the_frame(built: Built, junk: bytes) -> None:
    for frame in [*truncations(built.frame), built.frame + junk, junk]:
        headers = parse(frame)
        assert parse(memoryview(frame)) == headers == parse(bytearray(frame))
        if headers is not None:
            assert ETH_HLEN <= headers.l3_offset < headers.l4_offset <= len(frame)
            assert headers.header_len <= len(frame)
            assert headers.addresses.stop <= headers.l4_offset
            assert headers.l4_proto in (0, IPPROTO_TCP, IPPROTO_UDP)
            assert not (headers.fragment and headers.l4_header_len)
        assert 0 <= flow_hash(frame) == flow_hash(memoryview(frame)) < 2**32


@settings(max_examples=400, deadline=None)
@given(frames(), st.integers(0, 2**32 - 1))
def test_agrees_with_the_old_netfront_walker(built: Built, seed: int) -> None:
    # Documented differences: AUTH headers are now walked (they ended the old walk), and the
    # old walker's cap took at most 7 extension headers where the new one takes 8.
    if built.auth or built.ext_headers >= MAX_IPV6_EXT_HEADERS:
        return
    for frame in truncations(built.frame):
        assert flow_hash(frame, seed) == old_netfront_flow_hash(frame, seed)
        old, new = old_netfront_parse(frame), parse(frame)
        if old is None:
            assert new is None
            continue
        assert new is not None
        assert (new.ethertype, new.l3_offset, new.l4_offset) == (
            old.ethertype,
            old.l3_offset,
            old.l4_offset,
        )
        assert frame[new.addresses] == old.src + old.dst
        assert new.fragment_header == old.fragment
        # What netfront's flow hash uses: no L4 for any fragment header.
        assert (0 if new.fragment_header else new.l4_proto) == old.l4_proto
        if old.l4_proto:
            assert struct.unpack_from("!HH", frame, new.l4_offset) == (old.sport, old.dport)
        # What the TAP attach uses; an atomic IPv6 fragment (a fragment header, offset 0, no
        # MF) now has its L4 header found, as Linux's skb_checksum_setup finds it.
        if new.fragment or not new.fragment_header:
            assert (new.csum_offset, new.header_len) == (old.csum_offset, old.header_len)


@settings(max_examples=400, deadline=None)
@given(frames())
def test_netback_at_least_as_strict_as_its_old_walker(built: Built) -> None:
    for frame in truncations(built.frame):
        try:
            old: tuple[bool, int, int, int] | None = old_netback_parse_l4(frame)
        except ValueError:
            old = None
        try:
            new = parse_l4(frame)
        except OffloadError:
            # Newly refused, besides all the old refusals: a TCP data offset below 5 or past
            # the end of the frame, and more than MAX_IPV6_EXT_HEADERS extension headers.
            if old is not None:
                _, protocol, l4, _ = old
                tcp_header_whole = protocol == IPPROTO_UDP or (
                    20 <= (frame[l4 + 12] >> 4) * 4 <= len(frame) - l4
                )
                assert not tcp_header_whole or built.ext_headers > MAX_IPV6_EXT_HEADERS
            continue
        assert old == (new.ipv6, new.ip_proto, new.l4_offset, new.l3_offset)


# --- examples of what the old walkers disagreed on ------------------------------------------


def ipv6_frame(nexthdr: int, ext: bytes, l4: bytes) -> bytes:
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(l4), nexthdr, 64, SRC6, DST6)
    return MACS + b"\x86\xdd" + ip + ext + l4


TCP = struct.pack("!HHIIBBHHH", 1234, 80, 1, 0, 5 << 4, 0x18, 1, 0, 0)


def test_auth_header_has_its_own_length_rule() -> None:
    ah = bytes([6, 1]) + bytes(10)  # payload length 1: (1 + 2) * 4 = 12 bytes
    headers = parse(ipv6_frame(51, ah, TCP))
    assert headers is not None and headers.l4_offset == 14 + 40 + 12 and headers.l4_proto == 6
    assert parse_l4(ipv6_frame(51, ah, TCP)).l4_offset == 14 + 40 + 12


def test_extension_header_chain_is_bounded() -> None:
    def chain(count: int) -> bytes:
        return ipv6_frame(0, b"".join(bytes([0, 0]) + bytes(6) for _ in range(count - 1))
                          + bytes([6, 0]) + bytes(6), TCP)  # fmt: skip

    headers = parse(chain(MAX_IPV6_EXT_HEADERS))
    assert headers is not None and headers.l4_proto == IPPROTO_TCP
    assert parse(chain(MAX_IPV6_EXT_HEADERS + 1)) is None
    with pytest.raises(OffloadError):
        parse_l4(chain(MAX_IPV6_EXT_HEADERS + 1))


def test_atomic_fragment_has_a_checksum_but_hashes_by_addresses() -> None:
    atomic = struct.pack("!BBHI", 6, 0, 0, 7)  # a fragment header, offset 0, no MF
    frame = ipv6_frame(44, atomic, TCP)
    headers = parse(frame)
    assert headers is not None and not headers.fragment and headers.fragment_header
    assert headers.csum_offset == 16 and parse_l4(frame).l4_offset == 14 + 40 + 8
    assert flow_hash(frame) == zlib.crc32(SRC6 + DST6 + bytes(5))
    real = ipv6_frame(44, struct.pack("!BBHI", 6, 0, 1, 7), TCP)  # MF
    headers = parse(real)
    assert headers is not None and headers.fragment and headers.csum_offset == 0
    with pytest.raises(OffloadError):
        parse_l4(real)


def test_vlan_tags_are_walked_but_netback_sets_no_checksum_under_one() -> None:
    untagged = ipv6_frame(6, b"", TCP)
    tagged = untagged[:12] + b"\x81\x00\x00\x05" + untagged[12:]
    headers = parse(tagged)
    assert headers is not None and headers.l4_offset == 14 + 4 + 40
    assert flow_hash(tagged) == flow_hash(untagged)  # the VLAN is no part of the flow key
    with pytest.raises(OffloadError):
        parse_l4(tagged)


def test_tcp_data_offset_must_fit() -> None:
    for doff in (4, 6):  # below the minimum; one option word that is not in the frame
        frame = ipv6_frame(6, b"", TCP[:12] + bytes([doff << 4]) + TCP[13:])
        headers = parse(frame)
        assert headers is not None and headers.l4_header_len == 0 and headers.csum_offset == 0
        with pytest.raises(OffloadError):
            parse_l4(frame)
