"""xs_wire framing, sans-IO (io/xs_wire.h).

A message is a 16-byte little-endian header `(type, req_id, tx_id, len)` followed by `len`
payload bytes, `len <= XENSTORE_PAYLOAD_MAX`. Errors travel as type XS_ERROR with the errno
name and a NUL as payload; success without data is `"OK\\0"`.

`FrameReader` turns a byte stream into messages and refuses a header announcing more than
4096 payload bytes (C xenstored drops such a connection: there is no way to resynchronise).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from xenpv.errors import XenpvError

HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048


class XsType(IntEnum):
    """enum xsd_sockmsg_type, names as in xs_wire.h."""

    XS_CONTROL = 0
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    XS_RESET_WATCHES = 21
    XS_DIRECTORY_PART = 22
    XS_INVALID = 0xFFFF


XS_DEBUG = XsType.XS_CONTROL

# The xsd_errors table, in the header's order.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)


class XsError(XenpvError):
    """A xenstore error reply, identified by its errno name (one of `XSD_ERRORS`)."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        if errno_name not in XSD_ERRORS:
            raise ValueError(f"not an xs_wire error name: {errno_name!r}")
        self.errno_name = errno_name
        self.detail = detail
        super().__init__(f"{errno_name}: {detail}" if detail else errno_name)


class XsProtocolError(XenpvError):
    """The byte stream violates xs_wire framing; the connection cannot continue."""


@dataclass(frozen=True, slots=True)
class Message:
    """One xs_wire message. `type` stays an int so unknown types can be represented."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def reply(self, payload: bytes) -> Message:
        """A reply of the same type, echoing req_id and tx_id."""
        return Message(self.type, self.req_id, self.tx_id, payload)

    def ok(self) -> Message:
        return self.reply(b"OK\0")

    def error(self, errno_name: str) -> Message:
        if errno_name not in XSD_ERRORS:
            raise ValueError(f"not an xs_wire error name: {errno_name!r}")
        return Message(XsType.XS_ERROR, self.req_id, self.tx_id, errno_name.encode() + b"\0")


def encode_all(messages: list[Message]) -> bytes:
    """Concatenate several messages, for one socket write per drained queue."""
    return b"".join(m.encode() for m in messages)


def watch_event(path: str, token: str) -> Message:
    """An XS_WATCH_EVENT as the daemon sends it (req_id and tx_id 0)."""
    return Message(XsType.XS_WATCH_EVENT, 0, 0, join_strings(path, token))


def split_strings(payload: bytes) -> list[str]:
    """Split a payload of NUL-terminated strings (`a\\0b\\0` → ["a", "b"]).

    A final string without terminator is kept (clients are lax about it). Undecodable bytes
    raise UnicodeDecodeError, which callers turn into EINVAL.
    """
    if not payload:
        return []
    parts = payload.split(b"\0")
    if parts[-1] == b"":
        parts.pop()
    return [p.decode("ascii") for p in parts]


def join_strings(*parts: str) -> bytes:
    """Encode strings as NUL-terminated concatenation."""
    return b"".join(p.encode("ascii") + b"\0" for p in parts)


def error_name(message: Message) -> str:
    """The errno name carried by an XS_ERROR message."""
    return message.payload.rstrip(b"\0").decode("ascii", "replace")


class FrameReader:
    """Incremental xs_wire parser: `feed(bytes)` returns every complete message."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back (non-zero at EOF means a truncated frame)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            mtype, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                raise XsProtocolError(f"payload length {length} exceeds {XENSTORE_PAYLOAD_MAX}")
            end = pos + HEADER_SIZE + length
            if end > len(buf):
                break
            out.append(Message(mtype, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out
