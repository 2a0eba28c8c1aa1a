"""Handshake framing and layout parsing: garbage gives LinkError, nothing else."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.hv import LinkError
from xenpv.hv.handshake import Layout
from xenpv.hv.messages import HANDSHAKE_MAX, frame, frame_length, parse_frame


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
