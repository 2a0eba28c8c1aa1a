"""Checksum and segmentation offload between netif and the switch's `VirtioNetHdr` metadata.

Frames cross the backend switch with a `xenpv.abi.virtio_net.VirtioNetHdr` (or None for "nothing to
do"), so a vif, a TAP device and other vifs all speak one metadata type.

Guest transmit (netif → switch), as Linux netback's `xenvif_tx_submit` + `checksum_setup`:
- NETTXF_csum_blank → CHECKSUM_PARTIAL: the L4 checksum field holds the pseudo-header sum and
  the receiver must finish it. netback locates the L4 header itself (`skb_checksum_setup`:
  IPv4 or IPv6 with extension headers, TCP or UDP, not a fragment); so do we, with
  `xenpv.ethernet`, to fill `csum_start` / `csum_offset`. A frame it cannot parse is dropped
  ("Can't setup checksum").
- NETTXF_data_validated (without csum_blank) → CHECKSUM_UNNECESSARY (VIRTIO_NET_HDR_F_DATA_VALID).
- a GSO extra → `gso_type` TCPV4/TCPV6, `gso_size`, `hdr_len` (headers up to the TCP payload).
  A GSO frame without csum_blank gets its pseudo-header checksum recomputed and becomes
  CHECKSUM_PARTIAL (netback's `rx_gso_checksum_fixup`).

Guest receive (switch → netif), as Linux netback's rx.c:
- NEEDS_CSUM → NETRXF_csum_blank | NETRXF_data_validated, DATA_VALID → NETRXF_data_validated,
  but if the frontend did not accept checksum offload for that protocol (`feature-no-csum-offload`
  for IPv4, no `feature-ipv6-csum-offload` for IPv6) the checksum is completed here in software
  first (`skb_checksum_help`, the stack does it when the vif lacks NETIF_F_IP(V6)_CSUM).
- GSO TCPV4/TCPV6 → a GSO extra-info slot, if the frontend announced that GSO type; otherwise
  Linux segments the frame in software before netback sees it. xenpv does not segment: such a
  frame is dropped and counted (documented in docs/net.md). UDP GSO has no netif encoding
  (and TAPs are never offered UFO): dropped too. The ECN bit has no netif encoding and is
  ignored, as netback ignores SKB_GSO_TCP_ECN.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from backends.switch import Frame
from xenpv.abi.netif import (
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifGsoExtra,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETTXF_csum_blank,
    NETTXF_data_validated,
)
from xenpv.abi.virtio_net import VirtioNetHdr, VirtioNetHdrFlags, VirtioNetHdrGso
from xenpv.errors import XenpvError
from xenpv.ethernet import ETH_HLEN, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, Headers, parse

# Plain ints on the per-frame path: IntFlag operations cost about a microsecond each.
_TXF_CSUM_BLANK: Final = int(NETTXF_csum_blank)
_TXF_DATA_VALIDATED: Final = int(NETTXF_data_validated)
_RXF_CSUM_BLANK: Final = int(NETRXF_csum_blank)
_RXF_DATA_VALIDATED: Final = int(NETRXF_data_validated)
_NEEDS_CSUM: Final = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_NEEDS_CSUM)
_DATA_VALID: Final = int(VirtioNetHdrFlags.VIRTIO_NET_HDR_F_DATA_VALID)
_GSO_TO_VIRTIO: Final = {
    int(XEN_NETIF_GSO_TYPE_TCPV4): int(VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4),
    int(XEN_NETIF_GSO_TYPE_TCPV6): int(VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV6),
}
_VIRTIO_TO_GSO: Final = {v: k for k, v in _GSO_TO_VIRTIO.items()}
_U16 = struct.Struct("!H")


class OffloadError(XenpvError):
    """A frame's offload metadata cannot be honoured (unparseable headers, no netif encoding)."""


def parse_l4(frame: bytes | bytearray | memoryview) -> Headers:
    """skb_checksum_setup: the headers of an untagged IPv4/IPv6 frame with a whole TCP/UDP
    header, not a fragment (netback switches on skb->protocol: a VLAN tag is no IP)."""
    headers = parse(frame)
    if headers is None or headers.l3_offset != ETH_HLEN:
        raise OffloadError(f"no untagged IPv4/IPv6 header in a {len(frame)}-byte frame")
    if headers.fragment:
        raise OffloadError("checksum offload on an IP fragment")
    if headers.ip_proto != IPPROTO_TCP and headers.ip_proto != IPPROTO_UDP:
        raise OffloadError(f"checksum offload on IP protocol {headers.ip_proto}")
    if not headers.l4_header_len:
        raise OffloadError("truncated transport header")
    return headers


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones'-complement sum of `data` (big-endian words, odd length zero-padded)."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    value = int.from_bytes(raw, "big")
    if value == 0:
        return 0
    # 2**16 == 1 (mod 0xFFFF): the sum of words is the value mod 0xFFFF, 0 meaning 0xFFFF.
    return value % 0xFFFF or 0xFFFF


def _fold(value: int) -> int:
    while value > 0xFFFF:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def pseudo_header_sum(frame: bytes | bytearray | memoryview, l4: Headers) -> int:
    """`~csum_tcpudp_magic(...)` / `~csum_ipv6_magic(...)`: the folded pseudo-header sum."""
    length = len(frame) - l4.l4_offset
    addrs = ones_sum(frame[l4.addresses])
    return _fold(addrs + l4.ip_proto + (length & 0xFFFF) + (length >> 16))


def complete_checksum(frame: Frame, csum_start: int, csum_offset: int) -> bytes:
    """skb_checksum_help: fill in a CHECKSUM_PARTIAL frame's checksum (the field holds the
    pseudo-header sum; the result covers it and everything from `csum_start`)."""
    at = csum_start + csum_offset
    if csum_start < 0 or at + 2 > len(frame):
        raise OffloadError(
            f"checksum at {csum_start}+{csum_offset} outside a {len(frame)}-byte frame"
        )
    value = (~ones_sum(memoryview(frame)[csum_start:])) & 0xFFFF
    if value == 0:
        value = 0xFFFF  # a UDP checksum of 0 means "none"; TCP receivers accept either
    out = bytearray(frame)
    _U16.pack_into(out, at, value)
    return bytes(out)


# --- guest transmit ------------------------------------------------------------------------


def tx_metadata(frame: bytearray, flags: int, gso: NetifGsoExtra | None) -> VirtioNetHdr | None:
    """The switch metadata of a guest-transmitted frame (may fix the checksum field in place).

    Raises OffloadError when the frame needs checksum setup and its headers do not allow it.
    """
    csum_blank = bool(flags & _TXF_CSUM_BLANK)
    if gso is None and not csum_blank:
        if flags & _TXF_DATA_VALIDATED:
            return VirtioNetHdr(flags=_DATA_VALID)
        return None
    l4 = parse_l4(frame)
    if not csum_blank:  # GSO without a partial checksum: netback recomputes the pseudo sum
        _U16.pack_into(frame, l4.l4_offset + l4.csum_offset, pseudo_header_sum(frame, l4))
    if gso is None:
        return VirtioNetHdr(flags=_NEEDS_CSUM, csum_start=l4.l4_offset, csum_offset=l4.csum_offset)
    if l4.ip_proto != IPPROTO_TCP or (gso.gso_type == XEN_NETIF_GSO_TYPE_TCPV6) != l4.ipv6:
        raise OffloadError("GSO type does not match the frame's headers")
    return VirtioNetHdr(
        flags=_NEEDS_CSUM,
        gso_type=_GSO_TO_VIRTIO[gso.gso_type],
        hdr_len=l4.header_len,
        gso_size=gso.size,
        csum_start=l4.l4_offset,
        csum_offset=l4.csum_offset,
    )


# --- guest receive -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RxOffload:
    """What the frontend accepted (from its xenstore keys)."""

    ipv4_csum: bool = True  # not feature-no-csum-offload
    ipv6_csum: bool = False  # feature-ipv6-csum-offload
    gso_tcpv4: bool = False  # feature-gso-tcpv4
    gso_tcpv6: bool = False  # feature-gso-tcpv6


def rx_metadata(
    frame: Frame, meta: VirtioNetHdr | None, accepted: RxOffload
) -> tuple[Frame, int, NetifGsoExtra | None]:
    """(frame, NETRXF_* checksum flags, GSO extra) for a frame going to a guest.

    Raises OffloadError when the frame carries offload state this frontend cannot take.
    """
    if meta is None:
        return frame, 0, None
    gso: NetifGsoExtra | None = None
    if meta.gso_type != VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_NONE:
        gso_type = _VIRTIO_TO_GSO.get(meta.gso)
        if gso_type is None:
            raise OffloadError(f"GSO type {meta.gso_type} has no netif encoding")
        wanted = accepted.gso_tcpv4 if gso_type == XEN_NETIF_GSO_TYPE_TCPV4 else accepted.gso_tcpv6
        if not wanted or meta.gso_size == 0:
            raise OffloadError("the frontend did not accept this GSO type")
        gso = NetifGsoExtra(meta.gso_size, gso_type)
    if meta.needs_csum:
        ipv6 = len(frame) >= ETH_HLEN and _U16.unpack_from(frame, 12)[0] == ETH_P_IPV6
        if (accepted.ipv6_csum if ipv6 else accepted.ipv4_csum) or gso is not None:
            return frame, _RXF_CSUM_BLANK | _RXF_DATA_VALIDATED, gso
        return complete_checksum(frame, meta.csum_start, meta.csum_offset), 0, None
    if meta.data_valid:
        return frame, _RXF_DATA_VALIDATED, gso
    return frame, 0, gso
