"""The netif control ring (io/netif.h, "Control ring"), byte-exact, and the rx hash it sets.

A frontend whose backend advertises `feature-ctrl-ring = 1` may grant one page as a control
ring (`ctrl-ring-ref`, `event-channel-ctrl` in its directory, before it is Connected) and send
fixed-size requests on it: `struct xen_netif_ctrl_request` {u16 id, u16 type, u32 data[3]}
(16 bytes), answered by `struct xen_netif_ctrl_response` {u16 id, u16 type, u32 status,
u32 data} (12 bytes); `DEFINE_RING_TYPES(xen_netif_ctrl, ...)`: 16-byte entries, 128 in a
4 KiB page. The requests here are the hash ones: GET/SET_HASH_FLAGS, SET_HASH_KEY (a granted
key page), GET/SET_HASH_MAPPING_SIZE, SET_HASH_MAPPING (a granted (sub-)table of u32 queue
numbers), SET_HASH_ALGORITHM (NONE or TOEPLITZ). The gref-mapping requests are answered
NOT_SUPPORTED, as Linux netback does.

`HashSettings` is the backend's state and request handling, sans-IO (`grant_needed` names
the granted key or table page for the caller to copy), as Linux xen-netback/hash.c and
`xenvif_ctrl_action`; `steer(frame)` is the rx queue a frame goes to: Toeplitz hash of the
fields the flags select, looked up in the mapping (Linux `xenvif_select_queue`). With no
algorithm set the caller keeps its own choice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Final

from xenpv.abi.ring import RingLayout

# xenstore keys (io/netif.h)
FEATURE_CTRL_RING: Final = "feature-ctrl-ring"
CTRL_RING_REF: Final = "ctrl-ring-ref"
EVENT_CHANNEL_CTRL: Final = "event-channel-ctrl"


class CtrlType(IntEnum):
    """XEN_NETIF_CTRL_TYPE_*."""

    INVALID = 0
    GET_HASH_FLAGS = 1
    SET_HASH_FLAGS = 2
    SET_HASH_KEY = 3
    GET_HASH_MAPPING_SIZE = 4
    SET_HASH_MAPPING_SIZE = 5
    SET_HASH_MAPPING = 6
    SET_HASH_ALGORITHM = 7
    GET_GREF_MAPPING_SIZE = 8
    ADD_GREF_MAPPING = 9
    DEL_GREF_MAPPING = 10


class CtrlStatus(IntEnum):
    """XEN_NETIF_CTRL_STATUS_*."""

    SUCCESS = 0
    NOT_SUPPORTED = 1
    INVALID_PARAMETER = 2
    BUFFER_OVERFLOW = 3


class HashFlags(IntFlag):
    """XEN_NETIF_CTRL_HASH_TYPE_*: the fields a hash is taken over."""

    IPV4 = 1 << 0
    IPV4_TCP = 1 << 1
    IPV6 = 1 << 2
    IPV6_TCP = 1 << 3


NO_HASH_FLAGS: Final = HashFlags(0)

ALL_HASH_FLAGS: Final = HashFlags.IPV4 | HashFlags.IPV4_TCP | HashFlags.IPV6 | HashFlags.IPV6_TCP


class HashAlgorithm(IntEnum):
    """XEN_NETIF_CTRL_HASH_ALGORITHM_*."""

    NONE = 0
    TOEPLITZ = 1


_REQUEST = struct.Struct("<HH3I")
_RESPONSE = struct.Struct("<HHII")
NETIF_CTRL_RING: Final = RingLayout(_REQUEST.size, _RESPONSE.size, "xen_netif_ctrl")

# Linux netback's limits (xen-netback/common.h): XEN_NETBK_MAX_HASH_KEY_SIZE,
# XEN_NETBK_MAX_HASH_MAPPING_SIZE.
MAX_HASH_KEY_SIZE: Final = 40
MAX_HASH_MAPPING_SIZE: Final = 128


@dataclass(frozen=True, slots=True)
class CtrlRequest:
    id: int
    type: int
    data: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True, slots=True)
class CtrlResponse:
    id: int
    type: int
    status: int
    data: int = 0


def encode_request(request: CtrlRequest) -> bytes:
    return _REQUEST.pack(request.id, request.type, *request.data)


def decode_request(raw: bytes | memoryview) -> CtrlRequest:
    id_, type_, d0, d1, d2 = _REQUEST.unpack_from(raw, 0)
    return CtrlRequest(id_, type_, (d0, d1, d2))


def encode_response(response: CtrlResponse) -> bytes:
    return _RESPONSE.pack(response.id, response.type, response.status, response.data)


def decode_response(raw: bytes | memoryview) -> CtrlResponse:
    return CtrlResponse(*_RESPONSE.unpack_from(raw, 0))


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of `data` with `key` (zero-extended), as io/netif.h's reference
    `xen_netif_toeplitz_hash` computes it."""
    prefix = int.from_bytes(key[:8].ljust(8, b"\0"), "big")
    keyi = 8
    value = 0
    mask = (1 << 64) - 1
    for byte in data:
        for _ in range(8):
            if byte & 0x80:
                value ^= prefix
            prefix = (prefix << 1) & mask
            byte <<= 1
        prefix |= key[keyi] if keyi < len(key) else 0
        keyi += 1
    return (value >> 32) & 0xFFFF_FFFF


_ETH_HEADER = 14
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_IPPROTO_TCP = 6


def hash_input(
    frame: bytes | bytearray | memoryview, flags: HashFlags
) -> tuple[bytes, HashFlags] | None:
    """The bytes a hash is taken over for an Ethernet `frame` (io/netif.h's Buffer[] per hash
    type, the TCP variant first when both apply) and the type used; None if no enabled type
    applies. Fragmented IPv4 packets hash without ports, as Linux does."""
    data = bytes(frame)
    if len(data) < _ETH_HEADER:
        return None
    ethertype = int.from_bytes(data[12:14], "big")
    ip = data[_ETH_HEADER:]
    if ethertype == _ETHERTYPE_IPV4 and len(ip) >= 20 and ip[0] >> 4 == 4:
        addresses = ip[12:20]
        header = (ip[0] & 0xF) * 4
        fragment = int.from_bytes(ip[6:8], "big") & 0x3FFF  # MF flag or an offset
        ports = ip[header : header + 4]
        if (
            flags & HashFlags.IPV4_TCP
            and ip[9] == _IPPROTO_TCP
            and not fragment
            and len(ports) == 4
        ):
            return addresses + ports, HashFlags.IPV4_TCP
        if flags & HashFlags.IPV4:
            return addresses, HashFlags.IPV4
        return None
    if ethertype == _ETHERTYPE_IPV6 and len(ip) >= 40 and ip[0] >> 4 == 6:
        addresses = ip[8:40]
        ports = ip[40:44]
        if flags & HashFlags.IPV6_TCP and ip[6] == _IPPROTO_TCP and len(ports) == 4:
            return addresses + ports, HashFlags.IPV6_TCP
        if flags & HashFlags.IPV6:
            return addresses, HashFlags.IPV6
    return None


@dataclass
class HashSettings:
    """A backend's hash state, set through the control ring (Linux `struct xenvif_hash`)."""

    num_queues: int
    algorithm: HashAlgorithm = HashAlgorithm.NONE
    flags: HashFlags = NO_HASH_FLAGS
    key: bytes = b""
    mapping: list[int] = field(default_factory=list)  # empty: hash % num_queues

    def grant_needed(self, request: CtrlRequest) -> tuple[int, int] | None:
        """(gref, bytes) of the frontend's page `request` carries data in (a key or a mapping
        (sub-)table, from the start of the grant), for the caller to copy; None if none or
        if the size is refused anyway."""
        d0, d1, d2 = request.data
        if request.type == CtrlType.SET_HASH_KEY and 0 < d1 <= MAX_HASH_KEY_SIZE:
            return d0, d1
        if request.type == CtrlType.SET_HASH_MAPPING and 0 < d1 <= len(self.mapping) - d2:
            return d0, d1 * 4
        return None

    def handle(self, request: CtrlRequest, granted: bytes | None = None) -> CtrlResponse:
        """Carry out one control request (Linux `xenvif_ctrl_action`). `granted`: the bytes
        `grant_needed(request)` names, None if it names none or the copy failed."""
        status, data = CtrlStatus.NOT_SUPPORTED, 0
        d0, d1, d2 = request.data
        try:
            kind = CtrlType(request.type)
        except ValueError:
            kind = CtrlType.INVALID
        if kind is CtrlType.SET_HASH_ALGORITHM:
            status = self._set_algorithm(d0)
        elif kind is CtrlType.GET_HASH_FLAGS:
            status, data = CtrlStatus.SUCCESS, int(ALL_HASH_FLAGS)
        elif kind is CtrlType.SET_HASH_FLAGS:
            status = self._set_flags(d0)
        elif kind is CtrlType.SET_HASH_KEY:
            status = self._set_key(d1, granted)
        elif kind is CtrlType.GET_HASH_MAPPING_SIZE:
            status, data = CtrlStatus.SUCCESS, MAX_HASH_MAPPING_SIZE
        elif kind is CtrlType.SET_HASH_MAPPING_SIZE:
            status = self._set_mapping_size(d0)
        elif kind is CtrlType.SET_HASH_MAPPING:
            status = self._set_mapping(d1, d2, granted)
        return CtrlResponse(request.id, request.type, int(status), data)

    def _set_algorithm(self, value: int) -> CtrlStatus:
        if value not in (HashAlgorithm.NONE, HashAlgorithm.TOEPLITZ):
            return CtrlStatus.INVALID_PARAMETER
        self.algorithm = HashAlgorithm(value)
        return CtrlStatus.SUCCESS

    def _set_flags(self, value: int) -> CtrlStatus:
        if value & ~int(ALL_HASH_FLAGS):
            return CtrlStatus.INVALID_PARAMETER
        if self.algorithm is HashAlgorithm.NONE:
            return CtrlStatus.INVALID_PARAMETER  # Linux: flags need an algorithm first
        self.flags = HashFlags(value)
        return CtrlStatus.SUCCESS

    def _set_key(self, size: int, granted: bytes | None) -> CtrlStatus:
        if size > MAX_HASH_KEY_SIZE:
            return CtrlStatus.BUFFER_OVERFLOW
        if size and (granted is None or len(granted) != size):
            return CtrlStatus.INVALID_PARAMETER  # the grant could not be read
        self.key = granted if size and granted is not None else b""
        return CtrlStatus.SUCCESS

    def _set_mapping_size(self, size: int) -> CtrlStatus:
        if size > MAX_HASH_MAPPING_SIZE:
            return CtrlStatus.INVALID_PARAMETER
        self.mapping = [0] * size
        return CtrlStatus.SUCCESS

    def _set_mapping(self, length: int, offset: int, granted: bytes | None) -> CtrlStatus:
        if offset > len(self.mapping) or length > len(self.mapping) - offset:
            return CtrlStatus.INVALID_PARAMETER
        if length and (granted is None or len(granted) != length * 4):
            return CtrlStatus.INVALID_PARAMETER  # the grant could not be read
        entries = list(struct.unpack(f"<{length}I", granted or b""))
        if any(queue >= self.num_queues for queue in entries):
            return CtrlStatus.INVALID_PARAMETER
        self.mapping[offset : offset + length] = entries
        return CtrlStatus.SUCCESS

    def hash(self, frame: bytes | bytearray | memoryview) -> tuple[int, HashFlags] | None:
        """The frame's hash and its type, or None (no algorithm, or no enabled type applies)."""
        if self.algorithm is HashAlgorithm.NONE:
            return None
        found = hash_input(frame, self.flags)
        if found is None:
            return None
        data, kind = found
        return toeplitz_hash(self.key, data), kind

    def steer(self, frame: bytes | bytearray | memoryview) -> int | None:
        """The rx queue for `frame` (Linux `xenvif_select_queue`): None while no algorithm is
        set (the caller picks); else the hash (0 when no enabled type applies) looked up in
        the mapping, or modulo the queue count without one."""
        if self.algorithm is HashAlgorithm.NONE:
            return None
        hashed = self.hash(frame)
        value = 0 if hashed is None else hashed[0]
        if self.mapping:
            return self.mapping[value % len(self.mapping)]
        return value % self.num_queues
