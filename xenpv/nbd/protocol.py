"""The NBD protocol, server side, sans-IO: bytes in → events out; replies built as bytes.

    conn = ServerConnection(export)
    send(conn.data_to_send())                 # the greeting
    conn.receive_data(chunk)                  # whatever the socket gave
    while (event := conn.next_event()) is not None:
        ...                                   # Ready / Request / Aborted / Violation
        send(conn.data_to_send())             # option replies are queued here

Handshake (fixed newstyle only, docs/nbd.md): the connection answers options by itself
(`NBD_OPT_LIST`, `INFO`, `STRUCTURED_REPLY`, `ABORT`, anything else `NBD_REP_ERR_UNSUP`) and
reports `Ready` once `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME` chose the export; `Aborted` after
`NBD_OPT_ABORT`; `Violation` when the client broke a MUST (the caller hard-disconnects).

Transmission: every request header (and a write's payload) becomes a `Request`; the caller
checks it with `check_request` (the error the spec names, or None) and answers with the reply
builders (`ok_reply`, `read_reply`, `error_reply`), which pick simple or structured replies
as negotiated. Nothing here does I/O or keeps time: the same bytes always give the same events.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

# -- constants (doc/proto.md of the NBD project, section Values) --------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = (1 << 15) + 1

# error values
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- wire layouts ---------------------------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION = struct.Struct(">QII")  # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length

MAX_STRING = 4096  # the spec's limit on names and messages
MAX_OPTION_LENGTH = 4 + MAX_STRING + 2 + 2 * 64  # an INFO/GO with a long name and requests
MAX_OPTIONS = 256  # options in one handshake before the client is deemed abusive
# A write payload up to 2^25 bytes is never a denial of service (Size constraints); beyond
# the advertised maximum it is read and refused, beyond this the connection is dropped.
HARD_PAYLOAD_LIMIT = 1 << 25
DEFAULT_MAX_PAYLOAD = 4 << 20

KNOWN_CMD_FLAGS = (
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO
)


# -- the export ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Export:
    """What the server says about its one export."""

    name: str
    size: int
    min_block: int = 512
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    read_only: bool = False
    flush: bool = True
    trim: bool = False
    multi_conn: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not _power_of_two(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"minimum block size {self.min_block}: a power of 2 up to 64 KiB")
        if not _power_of_two(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(f"preferred block size {self.preferred_block} is not valid")
        if self.max_payload < self.preferred_block or self.max_payload > HARD_PAYLOAD_LIMIT:
            raise ValueError(f"maximum payload {self.max_payload} is not valid")
        if self.size < 0 or self.size % self.min_block:
            raise ValueError(f"size {self.size} is not a multiple of {self.min_block}")

    def transmission_flags(self, *, structured: bool) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_WRITE_ZEROES
        if self.read_only:
            flags |= FLAG_READ_ONLY
        if self.flush:
            flags |= FLAG_SEND_FLUSH | FLAG_SEND_FUA
        if self.trim and not self.read_only:
            flags |= FLAG_SEND_TRIM
        if structured:
            flags |= FLAG_SEND_DF  # every read is answered with one chunk
        if self.multi_conn:
            flags |= FLAG_CAN_MULTI_CONN
        return flags


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake chose the export: transmission starts with the next byte."""

    export: Export
    structured: bool
    flags: int  # the transmission flags sent
    block_size_agreed: bool  # GO with an NBD_INFO_BLOCK_SIZE request


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended the handshake with NBD_OPT_ABORT (answered); close the connection."""


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke the protocol: hard-disconnect. `reason` is for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    cmd: int  # a Cmd value, or an unknown number (check_request refuses it)
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""  # NBD_CMD_WRITE's data


Event = Ready | Aborted | Violation | Request


# -- the connection -----------------------------------------------------------------------------


class ServerConnection:
    """One client connection's protocol state (see the module docstring)."""

    def __init__(self, export: Export) -> None:
        self.export = export
        self.structured = False
        self.no_zeroes = False
        self.phase = "client-flags"  # → options → transmission → closed
        self._in = bytearray()
        self._out = bytearray()
        self._options = 0
        self._out += _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    # -- I/O-facing API --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        """The next complete event, or None until more data arrives."""
        if self.phase == "closed":
            return None
        if self.phase == "client-flags":
            return self._client_flags()
        if self.phase == "options":
            return self._option()
        return self._request()

    # -- handshake ---------------------------------------------------------------------------

    def _close(self, event: Aborted | Violation) -> Event:
        self.phase = "closed"
        self._in.clear()
        return event

    def _client_flags(self) -> Event | None:
        if len(self._in) < _CLIENT_FLAGS.size:
            return None
        (flags,) = _CLIENT_FLAGS.unpack_from(self._in)
        del self._in[: _CLIENT_FLAGS.size]
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            return self._close(Violation(f"unknown client flags {flags:#x}"))
        if not flags & FLAG_C_FIXED_NEWSTYLE:
            # Non-fixed newstyle allows only EXPORT_NAME; this server speaks fixed only.
            return self._close(Violation("client does not speak fixed newstyle"))
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self.phase = "options"
        return self._option()

    def _option(self) -> Event | None:
        while True:
            if len(self._in) < _OPTION.size:
                return None
            magic, option, length = _OPTION.unpack_from(self._in)
            if magic != IHAVEOPT:
                return self._close(Violation(f"bad option magic {magic:#x}"))
            if length > MAX_OPTION_LENGTH:
                return self._close(Violation(f"option {option} of {length} bytes: too long"))
            if len(self._in) < _OPTION.size + length:
                return None
            data = bytes(self._in[_OPTION.size : _OPTION.size + length])
            del self._in[: _OPTION.size + length]
            self._options += 1
            if self._options > MAX_OPTIONS:
                return self._close(Violation(f"more than {MAX_OPTIONS} options"))
            event = self._handle_option(option, data)
            if event is not None:
                return event

    def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self._out += _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, kind, len(data)) + data

    def _error(self, option: int, kind: int, message: str) -> None:
        self._reply(option, kind, message.encode()[:MAX_STRING])

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        export = self.export
        if option == Opt.EXPORT_NAME:
            name = data.decode("utf-8", "replace")
            if not self._known(name):
                # EXPORT_NAME cannot carry an error: the spec says terminate.
                return self._close(Violation(f"unknown export {name!r}"))
            flags = export.transmission_flags(structured=self.structured)
            self._out += _EXPORT_NAME_REPLY.pack(export.size, flags)
            if not self.no_zeroes:
                self._out += bytes(124)
            self.phase = "transmission"
            return Ready(export, self.structured, flags, block_size_agreed=False)
        if option == Opt.ABORT:
            self._reply(option, REP_ACK)
            return self._close(Aborted())
        if option == Opt.LIST:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                return None
            listed = export.name.encode()
            self._reply(option, REP_SERVER, struct.pack(">I", len(listed)) + listed)
            self._reply(option, REP_ACK)
            return None
        if option == Opt.STRUCTURED_REPLY:
            if data:
                self._error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(option, REP_ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(option, REP_ACK)
            return None
        if option in (Opt.INFO, Opt.GO):
            return self._info(option, data)
        self._error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _known(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _info(self, option: int, data: bytes) -> Event | None:
        parsed = parse_info_request(data)
        if parsed is None:
            self._error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return None
        name, requests = parsed
        if not self._known(name):
            self._error(option, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return None
        export = self.export
        flags = export.transmission_flags(structured=self.structured)
        self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, export.size, flags))
        # Block sizes go out even unasked (the spec allows it; clients ignore what they did
        # not ask for), so that a client that did not ask still learns them.
        self._reply(
            option,
            REP_INFO,
            _INFO_BLOCK_SIZE.pack(
                INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_payload
            ),
        )
        if INFO_NAME in requests:
            self._reply(option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name.encode())
        if INFO_DESCRIPTION in requests and export.description:
            text = export.description.encode()[:MAX_STRING]
            self._reply(option, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + text)
        self._reply(option, REP_ACK)
        if option == Opt.INFO:
            return None
        self.phase = "transmission"
        return Ready(export, self.structured, flags, block_size_agreed=INFO_BLOCK_SIZE in requests)

    # -- transmission --------------------------------------------------------------------------

    def _request(self) -> Event | None:
        if len(self._in) < _REQUEST.size:
            return None
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._in)
        if magic != REQUEST_MAGIC:
            return self._close(Violation(f"bad request magic {magic:#x}"))
        payload = b""
        if cmd == Cmd.WRITE:
            if length > HARD_PAYLOAD_LIMIT:
                return self._close(Violation(f"write payload of {length} bytes"))
            if len(self._in) < _REQUEST.size + length:
                return None
            payload = bytes(self._in[_REQUEST.size : _REQUEST.size + length])
            del self._in[: _REQUEST.size + length]
        else:
            del self._in[: _REQUEST.size]
        if cmd == Cmd.DISC:
            self.phase = "closed"  # nothing may follow a disconnect request
            self._in.clear()
        return Request(cmd, flags, cookie, offset, length, payload)

    # -- replies ---------------------------------------------------------------------------------

    def ok_reply(self, cookie: int) -> bytes:
        """Success of anything but a read (a simple reply: no payload, allowed either way)."""
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)

    def read_reply(self, cookie: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
        """A successful read: one OFFSET_DATA chunk (structured), or the data (simple)."""
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie) + data
        if not len(data):  # OFFSET_DATA must carry at least one byte
            return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
        head = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            8 + len(data),
        )
        return head + struct.pack(">Q", offset) + data

    def error_reply(self, cookie: int, error: int, message: str = "") -> bytes:
        """A failed request: an ERROR chunk with the message (structured), else simple."""
        if not self.structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)
        text = message.encode()[:MAX_STRING]
        body = struct.pack(">IH", error, len(text)) + text
        head = _CHUNK.pack(
            STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(body)
        )
        return head + body


def parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    """NBD_OPT_INFO/GO data → (export name, information requests); None if malformed."""
    if len(data) < 6:
        return None
    (name_length,) = struct.unpack_from(">I", data)
    if name_length > len(data) - 6 or name_length > MAX_STRING:
        return None
    try:
        name = data[4 : 4 + name_length].decode("utf-8")
    except UnicodeDecodeError:
        return None
    (count,) = struct.unpack_from(">H", data, 4 + name_length)
    rest = data[6 + name_length :]
    if len(rest) != 2 * count:
        return None
    return name, [v for (v,) in struct.iter_unpack(">H", rest)]


def check_request(request: Request, export: Export, *, structured: bool) -> tuple[int, str] | None:
    """The error a request gets before it reaches the disk (the spec's choice), or None.

    Order: unknown command, read-only, flags not valid for the command, block-size alignment, the
    export's end, the payload limit."""
    cmd, flags, offset, length = request.cmd, request.flags, request.offset, request.length
    if cmd not in _DATA_CMDS and cmd not in (Cmd.FLUSH, Cmd.DISC):
        return EINVAL, f"command {cmd} is not supported"
    if export.read_only and cmd in _DATA_CMDS and cmd != Cmd.READ:
        return EPERM, "the export is read-only"
    if cmd == Cmd.TRIM and not export.trim:
        return EINVAL, "NBD_CMD_TRIM is not supported by this export"
    if cmd == Cmd.FLUSH and not export.flush:
        return EINVAL, "NBD_CMD_FLUSH is not supported by this export"
    allowed = CMD_FLAG_FUA if export.flush else 0
    if cmd == Cmd.WRITE_ZEROES:
        allowed |= CMD_FLAG_NO_HOLE
    if cmd == Cmd.READ and structured:
        allowed |= CMD_FLAG_DF
    if flags & ~allowed:
        return EINVAL, f"flags {flags:#x} are not valid for command {cmd}"
    if cmd not in _DATA_CMDS:
        return None
    if offset % export.min_block or length % export.min_block:
        return EINVAL, f"{offset}+{length} is not aligned to {export.min_block} bytes"
    if offset + length > export.size:
        what = ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else EINVAL
        return what, f"{offset}+{length} is beyond the end of the export ({export.size})"
    if cmd == Cmd.READ and length > export.max_payload:
        # The spec lets a server refuse a large read up front with EOVERFLOW (structured);
        # a simple reply has no way to say more than EINVAL would.
        limit = export.max_payload
        return (EOVERFLOW if structured else EINVAL), f"read of {length} bytes: at most {limit}"
    if cmd == Cmd.WRITE and length > export.max_payload:
        return EINVAL, f"write of {length} bytes: at most {export.max_payload}"
    return None


_DATA_CMDS = (Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)


def pack_request(
    cmd: int,
    *,
    cookie: int = 0,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    payload: bytes = b"",
) -> bytes:
    """A client's request (tests and tools build requests with it)."""
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload


def pack_option(option: int, data: bytes = b"") -> bytes:
    """A client's option (tests)."""
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def pack_info_request(name: str, requests: list[int]) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(f">H{len(requests)}H", len(requests), *requests)
    )
