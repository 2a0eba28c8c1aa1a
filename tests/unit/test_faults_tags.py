"""Payload tags: round trips, and every kind of damage is caught."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpv.faults.tags import (
    INITIAL,
    BlockTag,
    FrameTag,
    TagError,
    pack_block,
    pack_frame,
    pack_sector,
    parse_block,
    parse_frame,
    parse_sector,
    read_value,
)

writers = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/_-", min_size=1, max_size=16)


@given(writers, st.integers(0, 2**63), st.integers(0, 2**63), st.sampled_from([512, 4096]))
def test_block_round_trip(writer: str, block: int, seq: int, sector: int) -> None:
    tag = BlockTag(writer, block, seq)
    data = pack_block(tag, 2 * sector, sector)
    assert len(data) == 2 * sector
    assert parse_block(data, sector) == tag
    assert read_value(data, sector) == tag.text


@given(st.integers(0, 511), st.integers(1, 255))
def test_any_flipped_byte_in_a_sector_is_caught(position: int, flip: int) -> None:
    data = bytearray(pack_sector(BlockTag("w", 3, 4)))
    data[position] ^= flip
    with pytest.raises(TagError):
        parse_sector(bytes(data))


def test_initial_torn_and_garbage() -> None:
    assert parse_block(bytes(1024)) is None
    assert read_value(bytes(1024)) == INITIAL
    torn = pack_sector(BlockTag("w", 1, 1)) + pack_sector(BlockTag("w", 1, 2))
    with pytest.raises(TagError, match="torn block"):
        parse_block(torn)
    assert read_value(b"\x01" * 512).startswith("corrupt: no block tag")
    with pytest.raises(ValueError, match="writer name"):
        pack_sector(BlockTag("x" * 17, 0, 0))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(28, 2000))
def test_frame_round_trip(flow: int, seq: int, size: int) -> None:
    data = pack_frame(FrameTag(flow, seq), size)
    assert len(data) == size
    assert parse_frame(data) == FrameTag(flow, seq)


def test_frame_damage_is_caught() -> None:
    data = bytearray(pack_frame(FrameTag(1, 2), 100))
    data[60] ^= 0x10
    with pytest.raises(TagError, match="checksum mismatch in flow 1 seq 2"):
        parse_frame(bytes(data))
    with pytest.raises(TagError, match="the tag says 100"):
        parse_frame(pack_frame(FrameTag(1, 2), 100)[:99])
    with pytest.raises(TagError, match="no frame tag"):
        parse_frame(bytes(64))
