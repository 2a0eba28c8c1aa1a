"""The sans-IO NBD server core: handshake replies, request decoding, checks, reply encoding."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpv.nbd import protocol as p
from xenpv.nbd.protocol import Cmd, Export, Opt, Ready, Request, ServerConnection, Violation

EXPORT = Export(name="disk", size=1 << 20, min_block=512, preferred_block=4096, trim=True)
CLIENT_FLAGS = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, option, kind, length = struct.unpack_from(">QIII", data)
        assert magic == p.OPTION_REPLY_MAGIC
        out.append((option, kind, data[20 : 20 + length]))
        data = data[20 + length :]
    return out


def negotiating(export: Export = EXPORT) -> ServerConnection:
    conn = ServerConnection(export)
    greeting = conn.data_to_send()
    assert struct.unpack(">QQH", greeting) == (
        p.NBDMAGIC,
        p.IHAVEOPT,
        p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES,
    )
    conn.receive_data(CLIENT_FLAGS)
    assert conn.next_event() is None
    return conn


def transmitting(*, structured: bool = True, export: Export = EXPORT) -> ServerConnection:
    conn = negotiating(export)
    if structured:
        conn.receive_data(p.pack_option(Opt.STRUCTURED_REPLY))
        assert conn.next_event() is None
    conn.receive_data(p.pack_option(Opt.GO, p.pack_info_request("", [])))
    event = conn.next_event()
    assert isinstance(event, Ready) and event.structured is structured
    conn.data_to_send()
    return conn


# -- handshake ------------------------------------------------------------------------------------


def test_go_sends_export_and_block_size_then_ack() -> None:
    conn = negotiating()
    conn.receive_data(p.pack_option(Opt.GO, p.pack_info_request("disk", [p.INFO_BLOCK_SIZE])))
    event = conn.next_event()
    assert isinstance(event, Ready) and event.block_size_agreed
    replies = option_replies(conn.data_to_send())
    assert [kind for _, kind, _ in replies] == [p.REP_INFO, p.REP_INFO, p.REP_ACK]
    assert struct.unpack(">HQH", replies[0][2]) == (p.INFO_EXPORT, 1 << 20, event.flags)
    assert struct.unpack(">HIII", replies[1][2]) == (p.INFO_BLOCK_SIZE, 512, 4096, 4 << 20)
    assert event.flags & p.FLAG_SEND_TRIM and event.flags & p.FLAG_HAS_FLAGS


def test_info_does_not_end_the_handshake_and_names_are_checked() -> None:
    conn = negotiating()
    conn.receive_data(p.pack_option(Opt.INFO, p.pack_info_request("disk", [p.INFO_NAME])))
    conn.receive_data(p.pack_option(Opt.INFO, p.pack_info_request("other", [])))
    conn.receive_data(p.pack_option(Opt.INFO, b"\x00\x00\x00\x09ab"))  # name longer than data
    assert conn.next_event() is None
    kinds = [(kind, data[:2]) for _, kind, data in option_replies(conn.data_to_send())]
    assert [k for k, _ in kinds] == [
        p.REP_INFO,
        p.REP_INFO,
        p.REP_INFO,
        p.REP_ACK,
        p.REP_ERR_UNKNOWN,
        p.REP_ERR_INVALID,
    ]
    assert conn.phase == "options"


def test_list_structured_unknown_and_abort() -> None:
    conn = negotiating()
    for option, data in (
        (Opt.LIST, b""),
        (Opt.LIST, b"x"),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.STARTTLS, b""),
        (99, b"whatever"),
    ):
        conn.receive_data(p.pack_option(option, data))
    assert conn.next_event() is None
    replies = option_replies(conn.data_to_send())
    assert [kind for _, kind, _ in replies] == [
        p.REP_SERVER,
        p.REP_ACK,
        p.REP_ERR_INVALID,
        p.REP_ACK,
        p.REP_ERR_INVALID,
        p.REP_ERR_UNSUP,
        p.REP_ERR_UNSUP,
    ]
    assert replies[0][2] == b"\x00\x00\x00\x04disk"
    conn.receive_data(p.pack_option(Opt.ABORT))
    assert isinstance(conn.next_event(), p.Aborted)
    assert option_replies(conn.data_to_send()) == [(Opt.ABORT, p.REP_ACK, b"")]
    assert conn.next_event() is None


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = ServerConnection(EXPORT)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | (2 if no_zeroes else 0)))
    conn.receive_data(p.pack_option(Opt.EXPORT_NAME, b"disk"))
    event = conn.next_event()
    assert isinstance(event, Ready) and not event.block_size_agreed
    reply = conn.data_to_send()
    assert struct.unpack_from(">QH", reply) == (1 << 20, event.flags)
    assert len(reply) == 10 + (0 if no_zeroes else 124)


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", 0x80),  # unknown client flag
        struct.pack(">I", 0),  # not fixed newstyle
        CLIENT_FLAGS + struct.pack(">QII", 0x1234, Opt.GO, 0),  # bad option magic
        CLIENT_FLAGS + struct.pack(">QII", p.IHAVEOPT, Opt.GO, 1 << 30),  # huge option
        CLIENT_FLAGS + p.pack_option(Opt.EXPORT_NAME, b"nope"),  # unknown export
    ],
    ids=["flags", "oldstyle", "magic", "huge", "unknown-export"],
)
def test_broken_handshakes_are_violations(raw: bytes) -> None:
    conn = ServerConnection(EXPORT)
    conn.receive_data(raw)
    assert isinstance(conn.next_event(), Violation)
    assert conn.next_event() is None  # closed: nothing more is parsed


def test_too_many_options_is_a_violation() -> None:
    conn = negotiating()
    conn.receive_data(p.pack_option(Opt.LIST) * (p.MAX_OPTIONS + 1))
    assert isinstance(conn.next_event(), Violation)


@given(
    st.lists(st.sampled_from([Opt.LIST, Opt.STRUCTURED_REPLY, Opt.INFO, 42]), max_size=6),
    st.data(),
)
def test_handshake_is_independent_of_chunking(options: list[int], data: st.DataObject) -> None:
    """Feeding the same bytes in any split gives the same replies and the same Ready."""
    stream = CLIENT_FLAGS
    for option in options:
        body = p.pack_info_request("", [p.INFO_BLOCK_SIZE]) if option == Opt.INFO else b""
        stream += p.pack_option(option, body)
    stream += p.pack_option(Opt.GO, p.pack_info_request("disk", []))

    def run(cuts: list[int]) -> tuple[bytes, list[object]]:
        conn = ServerConnection(EXPORT)
        out, events, last = conn.data_to_send(), [], 0
        for cut in [*sorted(cuts), len(stream)]:
            conn.receive_data(stream[last:cut])
            last = cut
            while (event := conn.next_event()) is not None:
                events.append(event)
            out += conn.data_to_send()
        return out, events

    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert run(cuts) == run([])
    assert isinstance(run([])[1][-1], Ready)


# -- transmission ----------------------------------------------------------------------------------

requests = st.builds(
    Request,
    cmd=st.sampled_from(list(Cmd)),
    flags=st.integers(0, 0xFFFF),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**64 - 1),
    length=st.integers(0, 1 << 12),
    payload=st.just(b""),
)


@given(st.lists(requests, max_size=5), st.data())
def test_requests_round_trip_in_any_chunking(reqs: list[Request], data: st.DataObject) -> None:
    reqs = [
        Request(r.cmd, r.flags, r.cookie, r.offset, r.length, bytes(r.length))
        if r.cmd == Cmd.WRITE
        else r
        for r in reqs
        if r.cmd != Cmd.DISC
    ]
    wire = b"".join(
        p.pack_request(r.cmd, cookie=r.cookie, offset=r.offset, length=r.length, flags=r.flags)
        + r.payload
        for r in reqs
    )
    conn = transmitting()
    got: list[object] = []
    position = 0
    for size in data.draw(st.lists(st.integers(1, 64), max_size=len(wire) // 8 + 1)):
        conn.receive_data(wire[position : position + size])
        position += size
        while (event := conn.next_event()) is not None:
            got.append(event)
    conn.receive_data(wire[position:])
    while (event := conn.next_event()) is not None:
        got.append(event)
    assert got == reqs


def test_bad_request_magic_and_huge_write_are_violations() -> None:
    conn = transmitting()
    conn.receive_data(b"\x00" * 28)
    assert isinstance(conn.next_event(), Violation)
    conn = transmitting()
    conn.receive_data(p.pack_request(Cmd.WRITE, length=p.HARD_PAYLOAD_LIMIT + 1))
    assert isinstance(conn.next_event(), Violation)


def test_disconnect_ends_parsing() -> None:
    conn = transmitting()
    conn.receive_data(p.pack_request(Cmd.DISC) + p.pack_request(Cmd.READ, length=512))
    assert conn.next_event() == Request(Cmd.DISC, 0, 0, 0, 0)
    assert conn.next_event() is None


# -- request checks --------------------------------------------------------------------------------

RO = Export(name="", size=1 << 20, read_only=True, trim=True)


@pytest.mark.parametrize(
    ("export", "cmd", "offset", "length", "flags", "structured", "expected"),
    [
        (EXPORT, Cmd.READ, 0, 4096, 0, True, None),
        (EXPORT, Cmd.READ, 512, 512, p.CMD_FLAG_DF, True, None),
        (EXPORT, Cmd.READ, 0, 512, p.CMD_FLAG_DF, False, p.EINVAL),  # DF needs structured
        (EXPORT, Cmd.READ, 100, 512, 0, True, p.EINVAL),  # unaligned
        (EXPORT, Cmd.READ, (1 << 20) - 512, 1024, 0, True, p.EINVAL),  # beyond the end
        (EXPORT, Cmd.WRITE, (1 << 20) - 512, 1024, 0, True, p.ENOSPC),
        (EXPORT, Cmd.WRITE_ZEROES, 1 << 20, 512, p.CMD_FLAG_NO_HOLE, True, p.ENOSPC),
        (EXPORT, Cmd.TRIM, 1 << 20, 512, 0, True, p.EINVAL),
        (EXPORT, Cmd.WRITE, 0, 512, p.CMD_FLAG_FUA, True, None),
        (EXPORT, Cmd.WRITE, 0, 512, p.CMD_FLAG_FAST_ZERO, True, p.EINVAL),
        (EXPORT, Cmd.WRITE_ZEROES, 0, 512, p.CMD_FLAG_FAST_ZERO, True, p.EINVAL),
        (EXPORT, Cmd.WRITE, 0, 512, 0x100, True, p.EINVAL),  # unknown flag
        (EXPORT, Cmd.READ, 0, 8 << 20, 0, True, p.EINVAL),  # beyond the 1 MiB export
        (Export("", 64 << 20), Cmd.READ, 0, 8 << 20, 0, True, p.EOVERFLOW),
        (Export("", 64 << 20), Cmd.READ, 0, 8 << 20, 0, False, p.EINVAL),
        (Export("", 64 << 20), Cmd.WRITE, 0, 8 << 20, 0, True, p.EINVAL),
        (Export("", 64 << 20), Cmd.WRITE_ZEROES, 0, 8 << 20, 0, True, None),
        (EXPORT, Cmd.BLOCK_STATUS, 0, 512, 0, True, p.EINVAL),
        (EXPORT, Cmd.CACHE, 0, 512, 0, True, p.EINVAL),
        (EXPORT, 77, 0, 512, 0, True, p.EINVAL),
        (EXPORT, Cmd.FLUSH, 0, 0, 0, True, None),
        (RO, Cmd.READ, 0, 512, 0, True, None),
        (RO, Cmd.WRITE, 0, 512, 0, True, p.EPERM),
        (RO, Cmd.TRIM, 0, 512, 0, True, p.EPERM),
        (RO, Cmd.WRITE_ZEROES, 0, 512, 0, True, p.EPERM),
        (Export("", 1 << 20, trim=False), Cmd.TRIM, 0, 512, 0, True, p.EINVAL),
        (Export("", 1 << 20, flush=False), Cmd.FLUSH, 0, 0, 0, True, p.EINVAL),
        (Export("", 1 << 20, flush=False), Cmd.WRITE, 0, 512, p.CMD_FLAG_FUA, True, p.EINVAL),
    ],
)
def test_check_request(
    export: Export,
    cmd: int,
    offset: int,
    length: int,
    flags: int,
    structured: bool,
    expected: int | None,
) -> None:
    result = p.check_request(Request(cmd, flags, 1, offset, length), export, structured=structured)
    assert (result[0] if result else None) == expected
    if result:
        assert result[1]  # a message for the human


@given(
    offset=st.integers(0, 4096).map(lambda n: n * 512),
    length=st.integers(0, 4096).map(lambda n: n * 512),
)
def test_aligned_in_bounds_reads_and_writes_pass(offset: int, length: int) -> None:
    export = Export("", 4 << 20)
    for cmd in (Cmd.READ, Cmd.WRITE):
        result = p.check_request(Request(cmd, 0, 0, offset, length), export, structured=True)
        inside = offset + length <= export.size
        assert (result is None) == inside


def test_export_validation() -> None:
    with pytest.raises(ValueError):
        Export("", 1000)  # not a multiple of the minimum block
    with pytest.raises(ValueError):
        Export("", 1 << 20, min_block=3)
    with pytest.raises(ValueError):
        Export("", 1 << 20, min_block=4096, preferred_block=512)
    assert Export("", 0, read_only=True).transmission_flags(structured=False) & p.FLAG_READ_ONLY


# -- replies ---------------------------------------------------------------------------------------


@given(
    cookie=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**63),
    data=st.binary(max_size=600),
    error=st.sampled_from([p.EPERM, p.EIO, p.EINVAL, p.ENOSPC, p.EOVERFLOW]),
    message=st.text(max_size=50),
)
def test_reply_encoding(cookie: int, offset: int, data: bytes, error: int, message: str) -> None:
    simple, structured = transmitting(structured=False), transmitting()
    assert simple.ok_reply(cookie) == struct.pack(">IIQ", p.SIMPLE_REPLY_MAGIC, 0, cookie)
    assert simple.read_reply(cookie, offset, data) == simple.ok_reply(cookie) + data
    assert simple.error_reply(cookie, error, message) == struct.pack(
        ">IIQ", p.SIMPLE_REPLY_MAGIC, error, cookie
    )
    chunk = structured.read_reply(cookie, offset, data)
    magic, flags, kind, got_cookie, length = struct.unpack_from(">IHHQI", chunk)
    assert (magic, flags, got_cookie) == (p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, cookie)
    if data:
        assert kind == p.REPLY_TYPE_OFFSET_DATA and length == 8 + len(data)
        assert chunk[20:28] == struct.pack(">Q", offset) and chunk[28:] == data
    else:
        assert kind == p.REPLY_TYPE_NONE and length == 0 and len(chunk) == 20
    chunk = structured.error_reply(cookie, error, message)
    magic, flags, kind, got_cookie, length = struct.unpack_from(">IHHQI", chunk)
    assert kind == p.REPLY_TYPE_ERROR and length == len(chunk) - 20
    got_error, n = struct.unpack_from(">IH", chunk, 20)
    assert got_error == error and chunk[26 : 26 + n].decode() == message


# -- hostile input -------------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_info_request_parser_never_raises(data: bytes) -> None:
    parsed = p.parse_info_request(data)
    if parsed is not None:
        name, requests = parsed
        assert p.pack_info_request(name, requests) == data


@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_give_events_or_a_violation_never_an_exception(
    garbage: bytes, in_transmission: bool
) -> None:
    conn = transmitting() if in_transmission else negotiating()
    conn.receive_data(garbage)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
        conn.data_to_send()
        assert len(events) < 1000
    # once closed (a violation, an abort, a disconnect), nothing more is parsed
    if conn.phase == "closed":
        conn.receive_data(b"\x00" * 64)
        assert conn.next_event() is None
