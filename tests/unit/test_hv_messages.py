"""Link messages and handshake framing: typed records survive the wire unchanged; garbage
gives ProtocolViolation (messages) or LinkError (handshake), nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.hv import GNTST, LinkError, Message, Msg
from xenpv.hv.handshake import Layout
from xenpv.hv.messages import (
    HANDSHAKE_MAX,
    Bind,
    BindReply,
    Close,
    CopyReply,
    CopyRequest,
    Event,
    MapReply,
    MapRequest,
    ProtocolViolation,
    Reply,
    UnmapReply,
    UnmapRequest,
    Update,
    decode,
    decode_reply,
    frame,
    frame_length,
    parse_frame,
)


def test_frame_round_trip() -> None:
    obj = {"from": 3, "challenge": b"\x00" * 32, "shm": True}
    data = frame(obj)
    assert frame_length(data[:4]) == len(data) - 4
    assert parse_frame(data[4:]) == obj


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(LinkError):
        frame_length((HANDSHAKE_MAX + 1).to_bytes(4, "big"))


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_frames_raise_link_error_only(body: bytes) -> None:
    with contextlib.suppress(LinkError):
        assert isinstance(parse_frame(body), dict)


@settings(max_examples=200)
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.lists(st.one_of(st.integers(-5, 1 << 40), st.booleans(), st.text()), max_size=4),
    )
)
def test_layout_parse_validates(value: object) -> None:
    try:
        layout = Layout.parse(value)
    except LinkError:
        return
    assert layout.nr_frames >= 0 and layout.nr_grants >= 0
    assert layout.size >= (layout.nr_frames << 12) + layout.nr_grants * 8
    assert msgpack.unpackb(msgpack.packb(layout.wire())) == layout.wire()


# -- link message records ----------------------------------------------------------------------

INTS = st.integers(-(1 << 31), (1 << 32) - 1)
GREFS = st.lists(st.integers(0, 1 << 20), max_size=8)
STATUSES = st.lists(st.sampled_from([int(s) for s in GNTST]), max_size=8)
DATA = st.binary(max_size=64)

REQUESTS_AND_EVENTS = st.one_of(
    st.builds(Event, INTS),
    st.builds(Bind, INTS, INTS, INTS),
    st.builds(Close, INTS, INTS),
    st.builds(MapRequest, INTS, GREFS, st.booleans()),
    st.builds(UnmapRequest, INTS, GREFS, st.booleans()),
    st.builds(
        CopyRequest,
        INTS,
        st.lists(
            st.tuples(st.booleans(), INTS, INTS, INTS, st.none() | DATA).map(list), max_size=4
        ),
    ),
    st.builds(
        Update,
        st.lists(st.tuples(st.sampled_from([0, 1]), INTS, INTS, DATA).map(list), max_size=4),
    ),
)
REPLIES = st.one_of(
    st.builds(UnmapReply, INTS),
    st.builds(BindReply, INTS, INTS),
    st.builds(
        MapReply,
        INTS,
        STATUSES,
        st.none() | st.lists(DATA | st.lists(INTS, min_size=2, max_size=2), max_size=4),
    ),
    st.builds(CopyReply, INTS, STATUSES, st.lists(st.none() | DATA, max_size=4)),
)


EVENT = int(Msg.EVENT)


def through_msgpack(message: Message) -> Any:
    """As the link sends and receives it."""
    packed = msgpack.Packer(use_bin_type=True).pack(message.encode())
    return msgpack.unpackb(packed, raw=False)


@settings(max_examples=300)
@given(REQUESTS_AND_EVENTS)
def test_message_round_trip(message: Message) -> None:
    raw = through_msgpack(message)
    assert raw[0] == message.kind
    assert decode(raw) == message


@settings(max_examples=300)
@given(REPLIES)
def test_reply_round_trip(reply: Reply) -> None:
    raw = through_msgpack(reply)
    assert raw[:2] == [Msg.REPLY, reply.req]
    assert decode_reply(raw, type(reply)) == reply


def test_wire_format_is_the_documented_arrays() -> None:
    assert Event(5).encode() == [1, 5]
    assert Bind(3, 7, 9).encode() == [2, 3, 7, 9]
    assert Close(7, 9).encode() == [3, 7, 9]
    assert MapRequest(4, [8, 9], True).encode() == [4, 4, [8, 9], True]
    assert UnmapRequest(0, [8], False).encode() == [5, 0, [8], False]
    assert CopyRequest(6, [(True, 8, 0, 2, b"ab")]).encode() == [6, 6, [(True, 8, 0, 2, b"ab")]]
    assert Update([(0, 8, 4, b"x")]).encode() == [7, [(0, 8, 4, b"x")]]
    assert BindReply(3, -22).encode() == [8, 3, -22]
    assert MapReply(4, [0], [[12, 1]]).encode() == [8, 4, [0], [[12, 1]]]
    assert CopyReply(6, [0], [None]).encode() == [8, 6, [0], [None]]
    assert UnmapReply(5).encode() == [8, 5]


@pytest.mark.parametrize(
    "raw",
    [
        [EVENT],
        [EVENT, 1, 2],
        [int(Msg.BIND), 1, 2],
        [int(Msg.MAP), 1, [8]],
        [int(Msg.UPDATE)],
        [99, 1],
        ["EVENT", 1],
        [[1], 1],
        [None],
    ],
)
def test_malformed_messages_are_protocol_violations(raw: list[Any]) -> None:
    with pytest.raises(ProtocolViolation):
        decode(raw)


@pytest.mark.parametrize(
    ("raw", "reply_type"),
    [
        ([int(Msg.REPLY)], UnmapReply),
        ([Msg.REPLY, "1"], UnmapReply),
        ([Msg.REPLY, 1, 0], UnmapReply),
        ([Msg.REPLY, 1], BindReply),
        ([Msg.REPLY, 1, [0]], MapReply),
        ([Msg.REPLY, 1, [0], [None], 3], CopyReply),
    ],
)
def test_malformed_replies_are_protocol_violations(raw: list[Any], reply_type: type[Reply]) -> None:
    with pytest.raises(ProtocolViolation):
        decode_reply(raw, reply_type)


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(st.integers(-3, 12), st.booleans(), st.none(), GREFS, DATA),
        min_size=1,
        max_size=5,
    )
)
def test_decoding_garbage_gives_a_record_or_a_protocol_violation(raw: list[Any]) -> None:
    # The link itself refuses anything but a non-empty array.
    try:
        if raw and raw[0] == Msg.REPLY:
            decode_reply(raw, CopyReply)
        else:
            assert decode(raw).kind == raw[0]
    except ProtocolViolation:
        pass
