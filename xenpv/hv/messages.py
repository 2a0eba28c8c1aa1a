"""Domain link messages (msgpack) and the handshake framing, sans-IO.

After the handshake every message is a msgpack array whose first element is a `Msg` type:

    [EVENT, port]                              notify: raise `port` (the receiver's port)
    [BIND, req, port, binder_port]             bind the receiver's unbound `port` to binder_port
    [CLOSE, port, closer_port]                 the sender closed its end of the receiver's `port`
    [MAP, req, [gref...], readonly]            pin the receiver's grants for a mapping
    [UNMAP, req, [gref...], readonly]          drop the pins of one mapping (req 0: no reply)
    [COPY, req, [[to_granter, gref, offset, length, data|nil]...]]   one grant-copy batch
    [UPDATE, [[whose, gref, offset, data]...]] replica writes (socket transport); whose = 0:
                                               the sender's grant, 1: the receiver's grant
    [REPLY, req, result...]                    answer to the request numbered `req`

The handshake before it uses length-prefixed msgpack maps (`frame`) so that each side reads
exactly one frame and never consumes bytes that follow it (the SCM_RIGHTS byte of the
shared-memory transport).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

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


class Whose(enum.IntEnum):
    SENDER = 0  # an UPDATE entry naming a grant of the sender (granter -> mapper)
    RECEIVER = 1  # an UPDATE entry naming a grant of the receiver (mapper -> granter)


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
