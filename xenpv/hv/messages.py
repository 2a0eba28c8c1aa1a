"""Domain link messages as typed records, their msgpack wire form, and the handshake framing.

In the process a message is a small record (`Event`, `MapRequest`, ...); on the wire it is a
msgpack array whose first element is its `Msg` type. `Link` encodes each record once
(`encode()`) and decodes each received array once (`decode`, or `decode_reply` with the reply
type the pending request expects, since a REPLY does not name its request's kind):

    [EVENT, port]                              `Event`: raise `port` (the receiver's port)
    [BIND, req, port, binder_port]             `Bind`: bind the receiver's unbound `port`
    [CLOSE, port, closer_port]                 `Close`: the sender closed its end of `port`
    [MAP, req, [gref...], readonly]            `MapRequest`: pin the receiver's grants
    [UNMAP, req, [gref...], readonly]          `UnmapRequest`: drop one mapping's pins
                                               (req 0: no reply)
    [COPY, req, [[to_granter, gref, offset, length, data|nil]...]]   `CopyRequest`
    [UPDATE, [[whose, gref, offset, data]...]] `Update`: replica writes (socket transport);
                                               whose = 0: the sender's grant, 1: the receiver's
    [REPLY, req, result...]                    `BindReply`, `MapReply`, `CopyReply`,
                                               `UnmapReply`: the answer to request `req`
    [REVOKE, [gref...]]                        `Revoke`: the sender ended its grants by
                                               force; the receiver's mappings of them die

Decoding checks the type and the number of fields; the handlers check the field values (a
peer that sends anything malformed loses its link either way).

The handshake before it uses length-prefixed msgpack maps (`frame`) so that each side reads
exactly one frame and never consumes bytes that follow it (the SCM_RIGHTS byte of the
shared-memory transport).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, TypeVar, cast

import msgpack

from xenpv.hv.errors import LinkError

HANDSHAKE_MAX = 4096
_LENGTH = struct.Struct(">I")


class Msg(enum.IntEnum):
    EVENT = 1
    BIND = 2
    CLOSE = 3
    MAP = 4
    UNMAP = 5
    COPY = 6
    UPDATE = 7
    REPLY = 8
    REVOKE = 9


class Whose(enum.IntEnum):
    SENDER = 0  # an UPDATE entry naming a grant of the sender (granter -> mapper)
    RECEIVER = 1  # an UPDATE entry naming a grant of the receiver (mapper -> granter)


class ProtocolViolation(Exception):
    """The peer sent a message that does not follow the link protocol."""


# Plain ints in the wire lists: msgpack packs an IntEnum member more slowly.
_EVENT, _BIND, _CLOSE, _MAP, _UNMAP, _COPY, _UPDATE, REPLY, _REVOKE = (int(m) for m in Msg)
# (REPLY: link.py)

# One grant-copy segment on the wire: (to_granter, gref, offset, length, data or None).
WireCopySegment = tuple[bool, int, int, int, bytes | None]
# One replica write on the wire: (whose, gref, offset, data).
WireUpdate = tuple[int, int, int, bytes]


def _wrong_arity(raw: list[Any], n: int) -> NoReturn:
    raise ProtocolViolation(f"{Msg(raw[0]).name} with {len(raw)} fields, not {n}")


@dataclass(slots=True)
class Event:
    """EVTCHNOP_send from the peer: raise the receiver's `port`."""

    kind: ClassVar[Msg] = Msg.EVENT
    port: int

    def encode(self) -> list[Any]:
        return [_EVENT, self.port]

    @staticmethod
    def decode(raw: list[Any]) -> Event:
        if len(raw) != 2:
            _wrong_arity(raw, 2)
        return Event(raw[1])


@dataclass(slots=True)
class Bind:
    """EVTCHNOP_bind_interdomain: bind the receiver's unbound `port` to the binder's port."""

    kind: ClassVar[Msg] = Msg.BIND
    req: int
    port: int
    binder_port: int

    def encode(self) -> list[Any]:
        return [_BIND, self.req, self.port, self.binder_port]

    @staticmethod
    def decode(raw: list[Any]) -> Bind:
        if len(raw) != 4:
            _wrong_arity(raw, 4)
        return Bind(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Close:
    """The sender closed `closer_port`, its end of the receiver's `port`."""

    kind: ClassVar[Msg] = Msg.CLOSE
    port: int
    closer_port: int

    def encode(self) -> list[Any]:
        return [_CLOSE, self.port, self.closer_port]

    @staticmethod
    def decode(raw: list[Any]) -> Close:
        if len(raw) != 3:
            _wrong_arity(raw, 3)
        return Close(raw[1], raw[2])


@dataclass(slots=True)
class MapRequest:
    """GNTTABOP_map_grant_ref for each of `grefs`, all or nothing."""

    kind: ClassVar[Msg] = Msg.MAP
    req: int
    grefs: Sequence[int]
    readonly: bool

    def encode(self) -> list[Any]:
        return [_MAP, self.req, self.grefs, self.readonly]

    @staticmethod
    def decode(raw: list[Any]) -> MapRequest:
        if len(raw) != 4:
            _wrong_arity(raw, 4)
        return MapRequest(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class UnmapRequest:
    """GNTTABOP_unmap_grant_ref of one mapping's `grefs`; `req` 0 asks for no reply."""

    kind: ClassVar[Msg] = Msg.UNMAP
    req: int
    grefs: Sequence[int]
    readonly: bool

    def encode(self) -> list[Any]:
        return [_UNMAP, self.req, self.grefs, self.readonly]

    @staticmethod
    def decode(raw: list[Any]) -> UnmapRequest:
        if len(raw) != 4:
            _wrong_arity(raw, 4)
        return UnmapRequest(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class CopyRequest:
    """One GNTTABOP_copy batch against the receiver's grants."""

    kind: ClassVar[Msg] = Msg.COPY
    req: int
    segments: Sequence[WireCopySegment]

    def encode(self) -> list[Any]:
        return [_COPY, self.req, self.segments]

    @staticmethod
    def decode(raw: list[Any]) -> CopyRequest:
        if len(raw) != 3:
            _wrong_arity(raw, 3)
        return CopyRequest(raw[1], raw[2])


@dataclass(slots=True)
class Update:
    """Replica writes, in program order (socket transport; the coherence rule)."""

    kind: ClassVar[Msg] = Msg.UPDATE
    entries: Sequence[WireUpdate]

    def encode(self) -> list[Any]:
        return [_UPDATE, self.entries]

    @staticmethod
    def decode(raw: list[Any]) -> Update:
        if len(raw) != 2:
            _wrong_arity(raw, 2)
        return Update(raw[1])


@dataclass(slots=True)
class Reply:
    """The answer to request `req`; the subclass says which kind of request it answers."""

    kind: ClassVar[Msg] = Msg.REPLY
    req: int

    def encode(self) -> list[Any]:
        return [REPLY, self.req]

    @staticmethod
    def decode(raw: list[Any]) -> Reply:
        if len(raw) != 2:
            _wrong_arity(raw, 2)
        return Reply(raw[1])


@dataclass(slots=True)
class UnmapReply(Reply):
    """The granter dropped the pins."""

    @staticmethod
    def decode(raw: list[Any]) -> UnmapReply:
        if len(raw) != 2:
            _wrong_arity(raw, 2)
        return UnmapReply(raw[1])


@dataclass(slots=True)
class BindReply(Reply):
    """0, or -EINVAL if the port is not an unbound port for the binder."""

    status: int

    def encode(self) -> list[Any]:
        return [REPLY, self.req, self.status]

    @staticmethod
    def decode(raw: list[Any]) -> BindReply:
        if len(raw) != 3:
            _wrong_arity(raw, 3)
        return BindReply(raw[1], raw[2])


@dataclass(slots=True)
class MapReply(Reply):
    """A GNTST status per reference; if all are okay, `details` has per reference the granule's
    contents (socket transport) or its `[frame, nframes]` in the granter's memory (shm)."""

    statuses: Sequence[int]
    details: Sequence[Any] | None

    def encode(self) -> list[Any]:
        return [REPLY, self.req, self.statuses, self.details]

    @staticmethod
    def decode(raw: list[Any]) -> MapReply:
        if len(raw) != 4:
            _wrong_arity(raw, 4)
        return MapReply(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class CopyReply(Reply):
    """A GNTST status per segment, and the bytes read for each FROM_REMOTE segment."""

    statuses: Sequence[int]
    datas: Sequence[bytes | None]

    def encode(self) -> list[Any]:
        return [REPLY, self.req, self.statuses, self.datas]

    @staticmethod
    def decode(raw: list[Any]) -> CopyReply:
        if len(raw) != 4:
            _wrong_arity(raw, 4)
        return CopyReply(raw[1], raw[2], raw[3])


@dataclass(slots=True)
class Revoke:
    """The sender (a hostile granter) ended `grefs` while the receiver maps them."""

    kind: ClassVar[Msg] = Msg.REVOKE
    grefs: Sequence[int]

    def encode(self) -> list[Any]:
        return [_REVOKE, self.grefs]

    @staticmethod
    def decode(raw: list[Any]) -> Revoke:
        if len(raw) != 2:
            _wrong_arity(raw, 2)
        return Revoke(raw[1])


Request = Bind | MapRequest | UnmapRequest | CopyRequest
Message = Event | Bind | Close | MapRequest | UnmapRequest | CopyRequest | Update | Reply | Revoke
R = TypeVar("R", bound=Reply)

# Message type -> decoder of every kind but REPLY (link.py dispatches through it inline).
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    _EVENT: Event.decode,
    _BIND: Bind.decode,
    _CLOSE: Close.decode,
    _MAP: MapRequest.decode,
    _UNMAP: UnmapRequest.decode,
    _COPY: CopyRequest.decode,
    _UPDATE: Update.decode,
    _REVOKE: Revoke.decode,
}


def decode(raw: list[Any]) -> Message:
    """A received non-empty array other than a REPLY as its record (ProtocolViolation if
    malformed)."""
    kind = raw[0]
    decoder = DECODERS.get(kind) if type(kind) is int else None
    if decoder is None:
        raise ProtocolViolation(f"unknown message type {kind!r:.20}")
    return decoder(raw)


def decode_reply(raw: list[Any], reply_type: type[R]) -> R:
    """A received REPLY as the record the pending request expects (ProtocolViolation if its
    request id or number of fields is wrong)."""
    if type(raw[1] if len(raw) > 1 else None) is not int:
        raise ProtocolViolation("malformed reply")
    return cast(R, reply_type.decode(raw))


def frame(obj: dict[str, Any]) -> bytes:
    """One handshake frame: 4-byte big-endian length, then msgpack."""
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = _LENGTH.unpack(header)
    if length > HANDSHAKE_MAX:
        raise LinkError(f"handshake frame of {length} bytes (limit {HANDSHAKE_MAX})")
    return int(length)


def parse_frame(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise LinkError(f"malformed handshake frame: {exc}") from None
    if not isinstance(obj, dict):
        raise LinkError("malformed handshake frame: not a map")
    return obj
