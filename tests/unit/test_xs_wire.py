"""xs_wire codec: byte layout, round trips, incremental framing, garbage never crashes."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.xenstore.wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XSD_ERRORS,
    FrameReader,
    Message,
    XsError,
    XsProtocolError,
    XsType,
    encode_all,
    error_name,
    join_strings,
    split_strings,
    watch_event,
)

XS_WIRE_H = Path("/usr/include/xen/io/xs_wire.h")

messages = st.builds(
    Message,
    type=st.integers(0, 0xFFFFFFFF),
    req_id=st.integers(0, 0xFFFFFFFF),
    tx_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=XENSTORE_PAYLOAD_MAX),
)


def test_header_layout_matches_xsd_sockmsg() -> None:
    # struct xsd_sockmsg { uint32_t type, req_id, tx_id, len; } little-endian on x86/arm.
    raw = Message(XsType.XS_READ, 0x01020304, 7, b"/a\0").encode()
    assert raw[:HEADER_SIZE] == struct.pack("<IIII", 2, 0x01020304, 7, 3)
    assert raw[HEADER_SIZE:] == b"/a\0"


@pytest.mark.headers
def test_type_numbers_match_header() -> None:
    """Evaluate enum xsd_sockmsg_type from the installed header and compare every value."""
    header = XS_WIRE_H.read_text()
    body = header.split("enum xsd_sockmsg_type")[1].split("};")[0]
    values: dict[str, int] = {}
    nxt = 0
    for line in body.splitlines():
        line = line.split("/*")[0].strip().rstrip(",")
        if not line.startswith("XS_"):
            continue
        name, _, expr = line.partition("=")
        name = name.strip()
        if expr:
            expr = expr.strip()
            for known, value in values.items():
                expr = expr.replace(known, str(value))
            nxt = int(eval(expr, {}, {}))  # small arithmetic such as "19 + 2" or "0xffff"
        values[name] = nxt
        nxt += 1
    values.pop("XS_TYPE_COUNT")
    assert values == {t.name: t.value for t in XsType}


@pytest.mark.headers
def test_error_names_match_header() -> None:
    table = XS_WIRE_H.read_text().split("xsd_errors[]")[1].split("};")[0]
    assert tuple(re.findall(r"XSD_ERROR\((E[A-Z0-9]+)\)", table)) == XSD_ERRORS


def test_error_table_order() -> None:
    assert XSD_ERRORS[0] == "EINVAL" and XSD_ERRORS[-1] == "EPERM"
    assert len(XSD_ERRORS) == 16


def test_reply_helpers_echo_ids() -> None:
    req = Message(XsType.XS_WRITE, 9, 4, b"/x\0v")
    assert req.ok() == Message(XsType.XS_WRITE, 9, 4, b"OK\0")
    err = req.error("EACCES")
    assert err == Message(XsType.XS_ERROR, 9, 4, b"EACCES\0")
    assert error_name(err) == "EACCES"
    with pytest.raises(ValueError):
        req.error("EWHATEVER")
    with pytest.raises(ValueError):
        XsError("ENOTREAL")


def test_watch_event_encoding() -> None:
    ev = watch_event("/a/b", "tok")
    assert ev == Message(XsType.XS_WATCH_EVENT, 0, 0, b"/a/b\0tok\0")


def test_strings() -> None:
    assert split_strings(b"a\0b\0") == ["a", "b"]
    assert split_strings(b"a\0b") == ["a", "b"]
    assert split_strings(b"") == []
    assert join_strings("a", "", "c") == b"a\0\0c\0"


@given(st.lists(messages, max_size=5), st.integers(1, 64))
@settings(max_examples=200)
def test_round_trip_in_arbitrary_chunks(msgs: list[Message], chunk: int) -> None:
    data = encode_all(msgs)
    reader = FrameReader()
    out: list[Message] = []
    for i in range(0, len(data), chunk):
        out += reader.feed(data[i : i + chunk])
    assert out == msgs
    assert reader.pending == 0


def test_oversized_header_is_a_protocol_error() -> None:
    reader = FrameReader()
    with pytest.raises(XsProtocolError):
        reader.feed(struct.pack("<IIII", 2, 1, 0, XENSTORE_PAYLOAD_MAX + 1))


def test_truncated_frame_stays_pending() -> None:
    reader = FrameReader()
    raw = Message(XsType.XS_READ, 1, 0, b"/abc\0").encode()
    assert reader.feed(raw[:-2]) == []
    assert reader.pending == len(raw) - 2
    assert reader.feed(raw[-2:]) == [Message(XsType.XS_READ, 1, 0, b"/abc\0")]


@given(st.binary(max_size=9000))
@settings(max_examples=300)
def test_garbage_only_raises_protocol_errors(data: bytes) -> None:
    reader = FrameReader()
    try:
        for i in range(0, len(data), 97):
            for msg in reader.feed(data[i : i + 97]):
                assert len(msg.payload) <= XENSTORE_PAYLOAD_MAX
    except XsProtocolError:
        pass
