"""netif tx/rx requests, responses and extra-info slots, byte-exact with Xen's io/netif.h.

Ring entries (DEFINE_RING_TYPES(netif_tx / netif_rx)): a tx slot is 12 bytes (the request);
a tx response uses its first 4 bytes. An rx slot is 8 bytes. An extra-info descriptor
(`struct netif_extra_info`, 8 bytes) overlays a tx request slot or an rx response slot; the
encoders below return the struct's own bytes, and the ring writes only those (the rest of a
12-byte tx slot is left as it was, as C drivers leave it).

Packet framing (netif.h "Guest transmit"): the first tx slot's `size` is the whole packet;
later fragments carry their own size, chained by NETTXF_more_data; NETTXF_extra_info (and
then XEN_NETIF_EXTRA_FLAG_MORE) announces extra-info slots right after the first request.
`parse_tx_packet` groups tx slots into packets and `tx_fragment_sizes` checks a packet's chain
the way Linux netback does
(xenvif_count_requests + xenvif_tx_build_gops): no fragment may cross the end of its granted
frame (`offset + size <= granule`, 4 KiB unless a larger grant was negotiated), and the later
fragments cannot add up to more than the first slot announced. On receive, a response's
`offset + status` must stay inside its frame too (netfront's check).

Extra-info decoding rejects XEN_NETIF_EXTRA_TYPE_NONE and unknown types (netback:
"Invalid extra type") and GSO descriptors netback refuses (size 0, type not TCPv4/TCPv6).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, Final

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import NetifError
from xenpv.abi.ring import RingLayout


class NetTxFlags(IntFlag):
    """NETTXF_* flags of a tx request."""

    NETTXF_csum_blank = 1 << 0
    NETTXF_data_validated = 1 << 1
    NETTXF_more_data = 1 << 2
    NETTXF_extra_info = 1 << 3


class NetRxFlags(IntFlag):
    """NETRXF_* flags of an rx response."""

    NETRXF_data_validated = 1 << 0
    NETRXF_csum_blank = 1 << 1
    NETRXF_more_data = 1 << 2
    NETRXF_extra_info = 1 << 3
    NETRXF_gso_prefix = 1 << 4  # deprecated, kept for compatibility


class NetifExtraType(IntEnum):
    """XEN_NETIF_EXTRA_TYPE_*."""

    XEN_NETIF_EXTRA_TYPE_NONE = 0  # never used: invalid
    XEN_NETIF_EXTRA_TYPE_GSO = 1
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
    XEN_NETIF_EXTRA_TYPE_HASH = 4
    XEN_NETIF_EXTRA_TYPE_MAX = 5


class NetifGsoType(IntEnum):
    """XEN_NETIF_GSO_TYPE_*."""

    XEN_NETIF_GSO_TYPE_NONE = 0
    XEN_NETIF_GSO_TYPE_TCPV4 = 1
    XEN_NETIF_GSO_TYPE_TCPV6 = 2


class NetifHashType(IntEnum):
    """_XEN_NETIF_CTRL_HASH_TYPE_* (bit numbers): the `htype` of a hash extra."""

    _XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 0
    _XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1
    _XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 2
    _XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 3


class NetifHashAlgorithm(IntEnum):
    """XEN_NETIF_CTRL_HASH_ALGORITHM_*."""

    XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
    XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1


class NetifRsp(IntEnum):
    """NETIF_RSP_* status values (an rx status > 0 is a length instead)."""

    NETIF_RSP_DROPPED = -2
    NETIF_RSP_ERROR = -1
    NETIF_RSP_OKAY = 0
    NETIF_RSP_NULL = 1  # the "response" to an extra-info slot


NETTXF_csum_blank: Final = NetTxFlags.NETTXF_csum_blank
NETTXF_data_validated: Final = NetTxFlags.NETTXF_data_validated
NETTXF_more_data: Final = NetTxFlags.NETTXF_more_data
NETTXF_extra_info: Final = NetTxFlags.NETTXF_extra_info
NETRXF_data_validated: Final = NetRxFlags.NETRXF_data_validated
NETRXF_csum_blank: Final = NetRxFlags.NETRXF_csum_blank
NETRXF_more_data: Final = NetRxFlags.NETRXF_more_data
NETRXF_extra_info: Final = NetRxFlags.NETRXF_extra_info
XEN_NETIF_EXTRA_TYPE_GSO: Final = NetifExtraType.XEN_NETIF_EXTRA_TYPE_GSO
XEN_NETIF_EXTRA_TYPE_MCAST_ADD: Final = NetifExtraType.XEN_NETIF_EXTRA_TYPE_MCAST_ADD
XEN_NETIF_EXTRA_TYPE_MCAST_DEL: Final = NetifExtraType.XEN_NETIF_EXTRA_TYPE_MCAST_DEL
XEN_NETIF_EXTRA_TYPE_HASH: Final = NetifExtraType.XEN_NETIF_EXTRA_TYPE_HASH
XEN_NETIF_GSO_TYPE_TCPV4: Final = NetifGsoType.XEN_NETIF_GSO_TYPE_TCPV4
XEN_NETIF_GSO_TYPE_TCPV6: Final = NetifGsoType.XEN_NETIF_GSO_TYPE_TCPV6
NETIF_RSP_DROPPED: Final = NetifRsp.NETIF_RSP_DROPPED
NETIF_RSP_ERROR: Final = NetifRsp.NETIF_RSP_ERROR
NETIF_RSP_OKAY: Final = NetifRsp.NETIF_RSP_OKAY
NETIF_RSP_NULL: Final = NetifRsp.NETIF_RSP_NULL

XEN_NETIF_EXTRA_FLAG_MORE: Final = 1 << 0
XEN_NETIF_MAX_TX_SIZE: Final = 0xFFFF
XEN_NETIF_NR_SLOTS_MIN: Final = 18
ETH_ALEN: Final = 6

NETIF_TX_RING: Final = RingLayout(12, 4, "netif_tx")  # 256 slots in 4 KiB
NETIF_RX_RING: Final = RingLayout(8, 8, "netif_rx")  # 256 slots in 4 KiB
EXTRA_INFO_SIZE: Final = 8

# The wire layouts, one place for every driver: hot paths use these pre-compiled structs
# directly (`pack`, `unpack_from`) instead of building the dataclasses below per slot.
TX_REQUEST: Final = struct.Struct("<IHHHH")  # gref, offset, flags, id, size
TX_RESPONSE: Final = struct.Struct("<Hh")  # id, status
RX_REQUEST: Final = struct.Struct("<HxxI")  # id, pad, gref
RX_RESPONSE: Final = struct.Struct("<HHHh")  # id, offset, flags, status
_EXTRA_HEAD = struct.Struct("<BB")  # type, flags
_GSO = struct.Struct("<BBHBxH")  # type, flags, size, gso type, pad, features
_MCAST = struct.Struct("<BB6s")  # type, flags, addr
_HASH = struct.Struct("<BBBBI")  # type, flags, htype, algorithm, value (LSB first)


@dataclass(slots=True)
class NetifTxRequest:
    """struct netif_tx_request (12 bytes)."""

    gref: int
    offset: int
    flags: int
    id: int
    size: int


@dataclass(slots=True)
class NetifTxResponse:
    """struct netif_tx_response (4 bytes in a 12-byte slot)."""

    id: int
    status: int


@dataclass(slots=True)
class NetifRxRequest:
    """struct netif_rx_request (8 bytes)."""

    id: int
    gref: int


@dataclass(slots=True)
class NetifRxResponse:
    """struct netif_rx_response: `status` < 0 is NETIF_RSP_*, otherwise the fragment length."""

    id: int
    offset: int
    flags: int
    status: int


@dataclass(slots=True)
class NetifGsoExtra:
    """XEN_NETIF_EXTRA_TYPE_GSO: segment size (e.g. the MSS), GSO type and features."""

    size: int
    gso_type: int
    features: int = 0
    flags: int = 0  # XEN_NETIF_EXTRA_FLAG_MORE: another extra follows


@dataclass(slots=True)
class NetifMcastExtra:
    """XEN_NETIF_EXTRA_TYPE_MCAST_ADD / _DEL of one multicast MAC address."""

    type: int  # XEN_NETIF_EXTRA_TYPE_MCAST_ADD or XEN_NETIF_EXTRA_TYPE_MCAST_DEL
    addr: bytes  # 6 bytes
    flags: int = 0


@dataclass(slots=True)
class NetifHashExtra:
    """XEN_NETIF_EXTRA_TYPE_HASH: a packet's hash value and how it was computed."""

    hash_type: int  # _XEN_NETIF_CTRL_HASH_TYPE_* bit number
    algorithm: int  # XEN_NETIF_CTRL_HASH_ALGORITHM_*
    value: int  # 32-bit, stored least significant byte first
    flags: int = 0


NetifExtraInfo = NetifGsoExtra | NetifMcastExtra | NetifHashExtra


def _short(what: str, data: bytes, need: int) -> NetifError:
    return NetifError(f"{len(data)}-byte {what}, need {need}")


def _pack(s: struct.Struct, what: str, *values: object) -> bytes:
    try:
        return s.pack(*values)
    except struct.error as exc:
        raise NetifError(f"cannot encode {what} {values!r}: {exc}") from None


def _unpack(s: struct.Struct, what: str, data: bytes) -> tuple[Any, ...]:
    if len(data) < s.size:
        raise _short(what, data, s.size)
    return s.unpack_from(data)


# -- tx ----------------------------------------------------------------------------------


def encode_tx_request(request: NetifTxRequest) -> bytes:
    r = request
    return _pack(TX_REQUEST, "tx request", r.gref, r.offset, r.flags, r.id, r.size)


def decode_tx_request(data: bytes) -> NetifTxRequest:
    """The slot's fields; whether its extent fits its frame needs the packet (see below)."""
    return NetifTxRequest(*_unpack(TX_REQUEST, "tx request", data))


def encode_tx_response(response: NetifTxResponse) -> bytes:
    return _pack(TX_RESPONSE, "tx response", response.id, response.status)


def decode_tx_response(data: bytes) -> NetifTxResponse:
    return NetifTxResponse(*_unpack(TX_RESPONSE, "tx response", data))


def tx_fragment_sizes(
    requests: Sequence[NetifTxRequest], granule: int = XEN_PAGE_SIZE
) -> list[int]:
    """Each fragment's own size in a tx packet (extra-info slots excluded), validated.

    Raises `NetifError` if the NETTXF_more_data chain does not end exactly at the last slot,
    if the later fragments add up to more than the first slot's packet size, or if any
    fragment runs past the end of its `granule`-byte frame.
    """
    if not requests:
        raise NetifError("empty tx packet")
    last = len(requests) - 1
    for i, request in enumerate(requests):
        if bool(request.flags & NETTXF_more_data) != (i < last):
            raise NetifError(
                f"tx slot {i} (id {request.id}) of a {len(requests)}-slot packet "
                f"{'lacks' if i < last else 'has'} NETTXF_more_data"
            )
    rest = sum(request.size for request in requests[1:])
    if rest > requests[0].size:
        raise NetifError(
            f"tx packet of {requests[0].size} bytes (id {requests[0].id}) has later "
            f"fragments of {rest} bytes"
        )
    sizes = [requests[0].size - rest, *(request.size for request in requests[1:])]
    for request, size in zip(requests, sizes, strict=True):
        if request.offset + size > granule:
            raise NetifError(
                f"tx fragment (id {request.id}) crosses its frame: offset {request.offset} "
                f"+ size {size} > {granule}"
            )
    return sizes


@dataclass(slots=True)
class TxPacket:
    """One guest packet as it sits on the tx ring (see `parse_tx_packet`)."""

    requests: list[NetifTxRequest]  # the data slots; the first one's size is the packet's
    extras: list[NetifExtraInfo]
    sizes: list[int]  # each data slot's own length (`tx_fragment_sizes`)
    slots: int  # ring slots used: data slots + extra-info slots

    @property
    def size(self) -> int:
        return self.requests[0].size


def parse_tx_packet(
    slots: Sequence[bytes],
    *,
    granule: int = XEN_PAGE_SIZE,
    max_slots: int = XEN_NETIF_NR_SLOTS_MIN,
) -> TxPacket | None:
    """The packet at the head of `slots` (copies of consecutive tx ring slots), validated.

    Returns None when the packet continues past the slots given (a frontend pushes whole
    packets, so a backend that sees this after draining the ring may call it fatal, as Linux
    netback does). A packet of more than `max_slots` data slots is refused, as are bad extras
    and everything `tx_fragment_sizes` refuses.
    """
    if not slots:
        return None
    first = decode_tx_request(slots[0])
    extras: list[NetifExtraInfo] = []
    position = 1
    more = bool(first.flags & NETTXF_extra_info)
    while more:
        if position >= len(slots):
            return None
        extra = decode_extra(slots[position])
        extras.append(extra)
        position += 1
        more = bool(extra.flags & XEN_NETIF_EXTRA_FLAG_MORE)
    requests = [first]
    while requests[-1].flags & NETTXF_more_data:
        if len(requests) >= max_slots:
            raise NetifError(f"tx packet (id {first.id}) uses more than {max_slots} slots")
        if position >= len(slots):
            return None
        requests.append(decode_tx_request(slots[position]))
        position += 1
    try:
        sizes = tx_fragment_sizes(requests, granule)
    except NetifError as exc:
        exc.slots = position
        raise
    return TxPacket(requests, extras, sizes, position)


# -- rx ----------------------------------------------------------------------------------


def encode_rx_request(request: NetifRxRequest) -> bytes:
    return _pack(RX_REQUEST, "rx request", request.id, request.gref)


def decode_rx_request(data: bytes) -> NetifRxRequest:
    return NetifRxRequest(*_unpack(RX_REQUEST, "rx request", data))


def encode_rx_response(response: NetifRxResponse) -> bytes:
    r = response
    return _pack(RX_RESPONSE, "rx response", r.id, r.offset, r.flags, r.status)


def decode_rx_response(data: bytes, granule: int = XEN_PAGE_SIZE) -> NetifRxResponse:
    """An rx response; a fragment (status > 0) must lie inside its `granule`-byte frame."""
    response = NetifRxResponse(*_unpack(RX_RESPONSE, "rx response", data))
    if response.status > 0 and response.offset + response.status > granule:
        raise NetifError(
            f"rx response (id {response.id}) crosses its frame: offset {response.offset} "
            f"+ size {response.status} > {granule}"
        )
    return response


# -- extra info --------------------------------------------------------------------------


def encode_extra(extra: NetifExtraInfo) -> bytes:
    """The 8 bytes of a `struct netif_extra_info` (pad bytes zero)."""
    if isinstance(extra, NetifGsoExtra):
        return _pack(
            _GSO,
            "GSO extra",
            XEN_NETIF_EXTRA_TYPE_GSO,
            extra.flags,
            extra.size,
            extra.gso_type,
            extra.features,
        )
    if isinstance(extra, NetifMcastExtra):
        if len(extra.addr) != ETH_ALEN:
            raise NetifError(f"multicast address of {len(extra.addr)} bytes, need {ETH_ALEN}")
        if extra.type not in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
            raise NetifError(f"extra type {extra.type} is not MCAST_ADD / MCAST_DEL")
        return _pack(_MCAST, "multicast extra", extra.type, extra.flags, extra.addr)
    return _pack(
        _HASH,
        "hash extra",
        XEN_NETIF_EXTRA_TYPE_HASH,
        extra.flags,
        extra.hash_type,
        extra.algorithm,
        extra.value,
    )


def decode_extra(data: bytes) -> NetifExtraInfo:
    """Decode an extra-info slot (the first 8 bytes of a tx request or rx response slot)."""
    if len(data) < EXTRA_INFO_SIZE:
        raise _short("extra info", data, EXTRA_INFO_SIZE)
    kind, flags = _EXTRA_HEAD.unpack_from(data)
    if kind == XEN_NETIF_EXTRA_TYPE_GSO:
        _, _, size, gso_type, features = _GSO.unpack_from(data)
        if size == 0:
            raise NetifError("GSO extra with size 0")
        if gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
            raise NetifError(f"GSO extra with bad GSO type {gso_type}")
        return NetifGsoExtra(size, gso_type, features, flags)
    if kind in (XEN_NETIF_EXTRA_TYPE_MCAST_ADD, XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
        return NetifMcastExtra(kind, _MCAST.unpack_from(data)[2], flags)
    if kind == XEN_NETIF_EXTRA_TYPE_HASH:
        _, _, hash_type, algorithm, value = _HASH.unpack_from(data)
        return NetifHashExtra(hash_type, algorithm, value, flags)
    raise NetifError(f"invalid extra-info type {kind}")
