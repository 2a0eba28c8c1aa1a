"""Payload tags: every byte a workload writes says who wrote it, where and when.

A checker that knows what each payload must be needs no search: a block is a register whose
reads must return its last acknowledged write (or one in flight), and a frame either arrives
intact, in order and once, or its absence is explained by a fault.

Block sector tag (the first 48 bytes of every written sector; the rest is a pattern derived
from the header, so a change anywhere in the sector is caught):

    magic "XPVB" | version u8 | pad 3 | block u64 | seq u64 | writer 16 bytes (NUL-padded)
    | crc32 of everything else in the sector u32 | pad 4          (big-endian)

Net frame payload (the frame's data after any Ethernet header):

    magic "XPVF" | version u8 | pad 3 | flow u32 | seq u64 | length u32 | crc32 of the
    header fields and the fill u32 | fill                           (big-endian)

All-zero data parses as `None` (the initial value of a fresh disk); anything else that is not
a valid tag raises `TagError`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

BLOCK_MAGIC = b"XPVB"
FRAME_MAGIC = b"XPVF"
VERSION = 1
_BLOCK_HEADER = struct.Struct(">4sB3xQQ16sI4x")  # 48 bytes
_FRAME_HEADER = struct.Struct(">4sB3xIQII")  # 28 bytes
BLOCK_HEADER_SIZE = _BLOCK_HEADER.size
FRAME_HEADER_SIZE = _FRAME_HEADER.size
# What each CRC covers first: the header up to the CRC (block: CRC + 4 pad bytes; frame: CRC).
_BLOCK_HEAD = BLOCK_HEADER_SIZE - 8
_FRAME_HEAD = FRAME_HEADER_SIZE - 4
WRITER_MAX = 16
INITIAL = "initial"  # the history value of a read that found zeroes


class TagError(ValueError):
    """Data that should carry a tag does not (corrupt, torn, or never written by a workload)."""


def _fill(seed: bytes, length: int) -> bytes:
    """A deterministic pattern: SHAKE-128 of the header, so every byte depends on it."""
    return hashlib.shake_128(seed).digest(length) if length > 0 else b""


@dataclass(frozen=True, slots=True)
class BlockTag:
    writer: str
    block: int
    seq: int

    @property
    def text(self) -> str:
        """How histories name this value: `writer/block/seq`."""
        return f"{self.writer}/{self.block}/{self.seq}"


def _sealed(header: struct.Struct, head_size: int, fields: tuple[Any, ...], length: int) -> bytes:
    """`length` bytes: `header` packed from `fields` and a CRC-32 of its first `head_size`
    bytes and of the fill that follows it (derived from those bytes)."""
    head = header.pack(*fields, 0)[:head_size]
    fill = _fill(head, length - header.size)
    return header.pack(*fields, zlib.crc32(head + fill)) + fill


def pack_sector(tag: BlockTag, sector_size: int = 512) -> bytes:
    writer = tag.writer.encode()
    if not 0 < len(writer) <= WRITER_MAX or b"\0" in writer:
        raise ValueError(f"writer name must be 1..{WRITER_MAX} bytes without NUL: {tag.writer!r}")
    if sector_size < BLOCK_HEADER_SIZE:
        raise ValueError(f"a sector of {sector_size} bytes cannot hold a tag")
    fields = (BLOCK_MAGIC, VERSION, tag.block, tag.seq, writer)
    return _sealed(_BLOCK_HEADER, _BLOCK_HEAD, fields, sector_size)


def pack_block(tag: BlockTag, size: int, sector_size: int = 512) -> bytes:
    """A whole block of `size` bytes: the same tag in every sector (a torn write shows)."""
    if size % sector_size:
        raise ValueError(f"block size {size} is not a multiple of the sector {sector_size}")
    return pack_sector(tag, sector_size) * (size // sector_size)


def parse_sector(data: bytes | bytearray | memoryview) -> BlockTag | None:
    data = bytes(data)
    if not data.strip(b"\0"):
        return None
    if len(data) < BLOCK_HEADER_SIZE:
        raise TagError(f"{len(data)} bytes cannot hold a block tag")
    magic, version, block, seq, writer, crc = _BLOCK_HEADER.unpack_from(data)
    if magic != BLOCK_MAGIC or version != VERSION:
        raise TagError(f"no block tag (starts {data[:8].hex()})")
    head = data[:_BLOCK_HEAD]
    if zlib.crc32(head + data[BLOCK_HEADER_SIZE:]) != crc:
        raise TagError(f"checksum mismatch in the sector of block {block} seq {seq}")
    tag = BlockTag(writer.rstrip(b"\0").decode(errors="replace"), block, seq)
    try:
        expected = pack_sector(tag, len(data))
    except ValueError as exc:
        raise TagError(f"block {block} seq {seq}: {exc}") from None
    if expected != data:  # padding, fill or writer bytes the checksum alone did not pin
        raise TagError(f"sector of block {block} seq {seq} altered")
    return tag


def parse_block(data: bytes | bytearray | memoryview, sector_size: int = 512) -> BlockTag | None:
    """The tag of a whole block; TagError if its sectors disagree (a torn write)."""
    view = memoryview(bytes(data))
    if len(view) % sector_size or not len(view):
        raise TagError(f"{len(view)} bytes is not a whole number of {sector_size}-byte sectors")
    tags = {parse_sector(view[i : i + sector_size]) for i in range(0, len(view), sector_size)}
    if len(tags) != 1:
        found = ", ".join(sorted(t.text if t else INITIAL for t in tags))
        raise TagError(f"torn block: its sectors hold {found}")
    return tags.pop()


def read_value(data: bytes | bytearray | memoryview, sector_size: int = 512) -> str:
    """What a history records for a read: the tag text, `initial`, or `corrupt: why`."""
    try:
        tag = parse_block(data, sector_size)
    except TagError as exc:
        return f"corrupt: {exc}"
    return INITIAL if tag is None else tag.text


@dataclass(frozen=True, slots=True)
class FrameTag:
    flow: int
    seq: int


def pack_frame(tag: FrameTag, size: int) -> bytes:
    """A frame payload of `size` bytes (at least the header) carrying `tag`."""
    if size < FRAME_HEADER_SIZE:
        raise ValueError(f"a frame payload needs at least {FRAME_HEADER_SIZE} bytes")
    return _sealed(
        _FRAME_HEADER, _FRAME_HEAD, (FRAME_MAGIC, VERSION, tag.flow, tag.seq, size), size
    )


def parse_frame(data: bytes | bytearray | memoryview) -> FrameTag:
    data = bytes(data)
    if len(data) < FRAME_HEADER_SIZE:
        raise TagError(f"{len(data)} bytes cannot hold a frame tag")
    magic, version, flow, seq, size, crc = _FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or version != VERSION:
        raise TagError(f"no frame tag (starts {data[:8].hex()})")
    if size != len(data):
        raise TagError(f"flow {flow} seq {seq}: {len(data)} bytes, the tag says {size}")
    head = data[:_FRAME_HEAD]
    if zlib.crc32(head + data[FRAME_HEADER_SIZE:]) != crc:
        raise TagError(f"checksum mismatch in flow {flow} seq {seq}")
    if pack_frame(FrameTag(flow, seq), size) != data:
        raise TagError(f"frame of flow {flow} seq {seq} altered")
    return FrameTag(flow, seq)
