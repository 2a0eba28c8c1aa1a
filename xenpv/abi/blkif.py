"""blkif requests and responses, byte-exact with Xen's io/blkif.h.

Three `protocol` values exist (io/protocols.h): `x86_64-abi` and `arm-abi` share the native
64-bit layout (112-byte requests, id at offset 8); `x86_32-abi` is the same structs packed to
4-byte alignment (108-byte requests, id at offset 4, as Linux blkback's
`blkif_x86_32_request`). A backend picks the codec from the frontend's `protocol` key with
`blkif_protocol(name)`; a missing key means the backend's native ABI, x86_64 here (what Linux
blkback does on x86_64).

Decoding validates what the header and Linux blkback reject, raising `BlkifError` carrying the
request's id and operation so that the backend can still answer `BLKIF_RSP_ERROR`:
- READ / WRITE carry 1..11 segments; WRITE_BARRIER / FLUSH_DISKCACHE 0..11 (blkback allows 0
  only for these "preflush" operations);
- INDIRECT wraps READ or WRITE only, with 1..`max_indirect_segments` segments (the value the
  backend advertised in `feature-max-indirect-segments`; 0 = not advertised, and then INDIRECT
  is unsupported); its segment descriptors live in `ceil(n / (granule / 8))` indirect pages;
- every segment has `first_sect <= last_sect <= granule / 512 - 1` (a 4 KiB frame holds
  sectors 0..7; `granule` is the negotiated grant size, 4096 unless larger grants
  (docs/granule-extension.md) are in use; "feature-large-sector-size" is not implemented:
  sectors are 512 bytes);
- an unknown operation (RESERVED_1, 7..255) raises the subclass `BlkifUnsupportedOp`, which
  a backend answers with `BLKIF_RSP_EOPNOTSUPP`.
Whether the *device* supports discard / barrier / flush (its xenbus features) is the backend's
business, not the codec's. Unused trailing bytes of a ring slot are ignored on decode and
written as zeros on encode.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import BlkifError, BlkifUnsupportedOp
from xenpv.abi.ring import RingLayout


class BlkifOp(IntEnum):
    """BLKIF_OP_* request codes."""

    BLKIF_OP_READ = 0
    BLKIF_OP_WRITE = 1
    BLKIF_OP_WRITE_BARRIER = 2
    BLKIF_OP_FLUSH_DISKCACHE = 3
    BLKIF_OP_RESERVED_1 = 4
    BLKIF_OP_DISCARD = 5
    BLKIF_OP_INDIRECT = 6


class BlkifRsp(IntEnum):
    """BLKIF_RSP_* status codes."""

    BLKIF_RSP_EOPNOTSUPP = -2
    BLKIF_RSP_ERROR = -1
    BLKIF_RSP_OKAY = 0


class VdiskInfo(IntFlag):
    """Bits of the backend's `info` xenbus key."""

    VDISK_CDROM = 0x1
    VDISK_REMOVABLE = 0x2
    VDISK_READONLY = 0x4


BLKIF_OP_READ: Final = BlkifOp.BLKIF_OP_READ
BLKIF_OP_WRITE: Final = BlkifOp.BLKIF_OP_WRITE
BLKIF_OP_WRITE_BARRIER: Final = BlkifOp.BLKIF_OP_WRITE_BARRIER
BLKIF_OP_FLUSH_DISKCACHE: Final = BlkifOp.BLKIF_OP_FLUSH_DISKCACHE
BLKIF_OP_DISCARD: Final = BlkifOp.BLKIF_OP_DISCARD
BLKIF_OP_INDIRECT: Final = BlkifOp.BLKIF_OP_INDIRECT
BLKIF_RSP_EOPNOTSUPP: Final = BlkifRsp.BLKIF_RSP_EOPNOTSUPP
BLKIF_RSP_ERROR: Final = BlkifRsp.BLKIF_RSP_ERROR
BLKIF_RSP_OKAY: Final = BlkifRsp.BLKIF_RSP_OKAY

BLKIF_MAX_SEGMENTS_PER_REQUEST: Final = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: Final = 8
BLKIF_DISCARD_SECURE: Final = 1 << 0
SECTOR_SIZE: Final = 512
SEGMENT_SIZE: Final = 8  # sizeof(struct blkif_request_segment)

XEN_IO_PROTO_ABI_X86_32: Final = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64: Final = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM: Final = "arm-abi"

# plain ints for the hot path: direct requests are ops 0..3, data ops (>= 1 segment) 0..1
_OP_WRITE: Final = 1
_OP_FLUSH_DISKCACHE: Final = 3
_DATA_OPS = frozenset((BLKIF_OP_READ, BLKIF_OP_WRITE))  # INDIRECT wraps only these
_OPS: Final = tuple(BlkifOp)  # value -> member, cheaper than BlkifOp(value)

_SEGMENT = struct.Struct("<IBBxx")


@dataclass(slots=True)
class BlkifSegment:
    """struct blkif_request_segment: sectors first_sect..last_sect of granted frame `gref`."""

    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        return self.last_sect - self.first_sect + 1


@dataclass(slots=True)
class BlkifRequest:
    """struct blkif_request: READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE."""

    operation: int  # a BlkifOp member when decoded
    id: int
    sector_number: int = 0
    segments: tuple[BlkifSegment, ...] = ()
    handle: int = 0


@dataclass(slots=True)
class BlkifDiscardRequest:
    """struct blkif_request_discard (operation BLKIF_OP_DISCARD)."""

    id: int
    sector_number: int
    nr_sectors: int
    flag: int = 0  # BLKIF_DISCARD_SECURE or 0; other bits are ignored, as by Linux blkback
    handle: int = 0

    @property
    def operation(self) -> int:
        return BLKIF_OP_DISCARD

    @property
    def secure(self) -> bool:
        return bool(self.flag & BLKIF_DISCARD_SECURE)


@dataclass(slots=True)
class BlkifIndirectRequest:
    """struct blkif_request_indirect: segment descriptors live in granted indirect pages.

    `indirect_grefs` holds only the pages in use (`indirect_pages(nr_segments, granule)`);
    the remaining entries of the 8-entry array are zero on the wire and ignored on decode.
    """

    indirect_op: int  # BLKIF_OP_READ or BLKIF_OP_WRITE (a BlkifOp member when decoded)
    id: int
    sector_number: int
    nr_segments: int
    indirect_grefs: tuple[int, ...]
    handle: int = 0

    @property
    def operation(self) -> int:
        return BLKIF_OP_INDIRECT


@dataclass(slots=True)
class BlkifResponse:
    """struct blkif_response: `status` is a BLKIF_RSP_* value (kept raw: peers may send others)."""

    id: int
    operation: int
    status: int


AnyBlkifRequest = BlkifRequest | BlkifDiscardRequest | BlkifIndirectRequest


def max_sector_in_frame(granule: int = XEN_PAGE_SIZE) -> int:
    """The largest `last_sect` a segment may name in a granted frame of `granule` bytes."""
    if granule < SECTOR_SIZE or granule % SECTOR_SIZE:
        raise ValueError(f"granule must be a multiple of {SECTOR_SIZE}, not {granule}")
    return granule // SECTOR_SIZE - 1


def segments_per_indirect_page(granule: int = XEN_PAGE_SIZE) -> int:
    """Segment descriptors per indirect page: 512 in a 4 KiB frame."""
    return granule // SEGMENT_SIZE


def indirect_pages(nr_segments: int, granule: int = XEN_PAGE_SIZE) -> int:
    """Indirect pages needed for `nr_segments` descriptors (INDIRECT_PAGES() in Linux)."""
    per_page = segments_per_indirect_page(granule)
    return (nr_segments + per_page - 1) // per_page


def max_indirect_segments_limit(granule: int = XEN_PAGE_SIZE) -> int:
    """The most segments one indirect request can describe: 8 pages of descriptors."""
    return BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * segments_per_indirect_page(granule)


_MAX_SECT_4K: Final = max_sector_in_frame(XEN_PAGE_SIZE)


def _check_segments(
    segments: Sequence[BlkifSegment],
    max_sect: int,
    id: int | None,
    operation: int | None,
    *,
    first_index: int = 0,
) -> None:
    for i, seg in enumerate(segments, first_index):
        if not seg.first_sect <= seg.last_sect <= max_sect:
            raise BlkifError(
                f"segment {i}: sectors {seg.first_sect}..{seg.last_sect} outside 0..{max_sect} "
                "of its frame",
                id=id,
                operation=operation,
            )


def encode_indirect_pages(
    segments: Sequence[BlkifSegment], granule: int = XEN_PAGE_SIZE
) -> list[bytes]:
    """The indirect pages (each `granule` bytes, zero padded) holding `segments`.

    Like `BlkifProtocol.encode_request`, this checks representability only, so tests can
    build the invalid descriptors a hostile frontend would.
    """
    per_page = segments_per_indirect_page(granule)
    pages = []
    for start in range(0, len(segments), per_page):
        page = bytearray(granule)
        for i, seg in enumerate(segments[start : start + per_page]):
            try:
                _SEGMENT.pack_into(page, i * SEGMENT_SIZE, seg.gref, seg.first_sect, seg.last_sect)
            except struct.error as exc:
                raise BlkifError(f"segment {start + i}: {exc}") from None
        pages.append(bytes(page))
    return pages


def decode_indirect_pages(
    pages: Sequence[bytes],
    request: BlkifIndirectRequest,
    granule: int = XEN_PAGE_SIZE,
) -> tuple[BlkifSegment, ...]:
    """The `request.nr_segments` descriptors from its indirect pages (copied out already).

    `pages[i]` is the copy of the page granted by `request.indirect_grefs[i]`.
    """
    return tuple(
        BlkifSegment(gref, first, last)
        for gref, first, last in decode_indirect_segments(pages, request, granule)
    )


def decode_indirect_segments(
    pages: Sequence[bytes],
    request: BlkifIndirectRequest,
    granule: int = XEN_PAGE_SIZE,
) -> list[tuple[int, int, int]]:
    """`decode_indirect_pages` as plain (gref, first_sect, last_sect) tuples, with the same
    checks: the hot path of large requests (256 descriptors per 1 MiB of 4 KiB grants),
    where a dataclass per descriptor costs more than the descriptors' data copy. The sector
    bounds are checked on byte slices of the descriptors (C speed); only a failing page is
    walked descriptor by descriptor, for the error message."""
    needed = indirect_pages(request.nr_segments, granule)
    if len(pages) != needed:
        raise BlkifError(
            f"{request.nr_segments} indirect segments need {needed} pages, got {len(pages)}",
            id=request.id,
            operation=BLKIF_OP_INDIRECT,
        )
    per_page = segments_per_indirect_page(granule)
    max_sect = max_sector_in_frame(granule)
    segments: list[tuple[int, int, int]] = []
    remaining = request.nr_segments
    for page in pages:
        count = min(remaining, per_page)
        if len(page) < count * SEGMENT_SIZE:
            raise BlkifError(
                f"indirect page of {len(page)} bytes cannot hold {count} segments",
                id=request.id,
                operation=BLKIF_OP_INDIRECT,
            )
        used = page[: count * SEGMENT_SIZE]
        firsts, lasts = used[4::SEGMENT_SIZE], used[5::SEGMENT_SIZE]
        if (count and max(lasts) > max_sect) or any(map(operator.gt, firsts, lasts)):
            done = len(segments)
            _check_segments(
                [BlkifSegment(*fields) for fields in _SEGMENT.iter_unpack(used)],
                max_sect,
                request.id,
                BLKIF_OP_INDIRECT,
                first_index=done,
            )
        segments.extend(_SEGMENT.iter_unpack(used))
        remaining -= count
    return segments


class BlkifProtocol:
    """The codec of one blkif ABI (`protocol` xenbus value): request/response layouts."""

    __slots__ = (
        "_discard",
        "_indirect",
        "_indirect_head",
        "_response",
        "_rw",
        "_rw_full",
        "_seg_structs",
        "name",
        "ring_layout",
    )

    def __init__(self, name: str, *, packed: bool) -> None:
        self.name = name
        # packed (x86_32): the native structs under #pragma pack(4): no hole before `id`.
        hole = "" if packed else "xxxx"
        self._rw = struct.Struct(f"<BBH{hole}QQ")  # op, nr_segments, handle, id, sector
        self._discard = struct.Struct(f"<BBH{hole}QQQ")  # op, flag, handle, id, sector, nr
        # op, indirect_op, nr_segments, id, sector, handle, grefs[8], tail padding to 64
        self._indirect_head = struct.Struct(f"<BBH{hole}QQHxx8I")
        self._indirect = struct.Struct(self._indirect_head.format + ("8x" if packed else "4x"))
        self._response = struct.Struct("<QBxh" if packed else "<QBxh4x")
        # the header and the first n segments, to decode a request in one unpack
        self._seg_structs = tuple(
            struct.Struct(self._rw.format + "IBBxx" * n)
            for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)
        )
        # the whole request for n segments, unused segments zeroed
        self._rw_full = tuple(
            struct.Struct(
                self._rw.format
                + "IBBxx" * n
                + f"{SEGMENT_SIZE * (BLKIF_MAX_SEGMENTS_PER_REQUEST - n)}x"
            )
            for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)
        )
        request_size = self._rw_full[0].size
        self.ring_layout = RingLayout(request_size, self._response.size, f"blkif[{name}]")

    def __repr__(self) -> str:
        return f"BlkifProtocol({self.name!r})"

    @property
    def request_size(self) -> int:
        """sizeof(struct blkif_request) in this ABI: 112, or 108 for x86_32."""
        return self.ring_layout.req_size

    @property
    def response_size(self) -> int:
        """sizeof(struct blkif_response) in this ABI: 16, or 12 for x86_32."""
        return self.ring_layout.rsp_size

    # -- requests ---------------------------------------------------------------------

    def encode_request(self, request: AnyBlkifRequest) -> bytes:
        """The request's bytes: a full `request_size` slot for r/w, the struct otherwise."""
        try:
            if isinstance(request, BlkifRequest):
                segments = request.segments
                if len(segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                    raise BlkifError(
                        f"{len(segments)} segments, at most {BLKIF_MAX_SEGMENTS_PER_REQUEST} "
                        "in a direct request (use BLKIF_OP_INDIRECT)",
                        id=request.id,
                        operation=request.operation,
                    )
                if len(segments) == 1:  # the common 4 KiB request
                    seg = segments[0]
                    return self._rw_full[1].pack(
                        request.operation,
                        1,
                        request.handle,
                        request.id,
                        request.sector_number,
                        seg.gref,
                        seg.first_sect,
                        seg.last_sect,
                    )
                fields: list[int] = [
                    request.operation,
                    len(segments),
                    request.handle,
                    request.id,
                    request.sector_number,
                ]
                for seg in segments:
                    fields += (seg.gref, seg.first_sect, seg.last_sect)
                return self._rw_full[len(segments)].pack(*fields)
            if isinstance(request, BlkifDiscardRequest):
                return self._discard.pack(
                    BLKIF_OP_DISCARD,
                    request.flag,
                    request.handle,
                    request.id,
                    request.sector_number,
                    request.nr_sectors,
                )
            grefs = request.indirect_grefs
            if len(grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
                raise BlkifError(
                    f"{len(grefs)} indirect pages, at most {BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}",
                    id=request.id,
                    operation=BLKIF_OP_INDIRECT,
                )
            padded = (*grefs, *(0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs)))
            return self._indirect.pack(
                BLKIF_OP_INDIRECT,
                request.indirect_op,
                request.nr_segments,
                request.id,
                request.sector_number,
                request.handle,
                *padded,
            )
        except struct.error as exc:
            raise BlkifError(f"cannot encode {request!r}: {exc}") from None

    def encode_rw(
        self,
        operation: int,
        id: int,
        sector_number: int,
        handle: int,
        segments: Sequence[tuple[int, int, int]],
    ) -> bytes:
        """`encode_request(BlkifRequest(...))` from plain (gref, first_sect, last_sect)
        tuples: a frontend's hot path, without a dataclass per segment."""
        count = len(segments)
        if count > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BlkifError(
                f"{count} segments, at most {BLKIF_MAX_SEGMENTS_PER_REQUEST} "
                "in a direct request (use BLKIF_OP_INDIRECT)",
                id=id,
                operation=operation,
            )
        try:
            if count == 1:
                return self._rw_full[1].pack(operation, 1, handle, id, sector_number, *segments[0])
            fields = [operation, count, handle, id, sector_number]
            for segment in segments:
                fields += segment
            return self._rw_full[count].pack(*fields)
        except struct.error as exc:
            raise BlkifError(f"cannot encode request {id}: {exc}") from None

    def single_segment(self, data: bytes) -> tuple[int, int, int, int, int, int] | None:
        """(operation, id, sector_number, gref, first_sect, last_sect) of a READ or WRITE
        with exactly one segment, else None: a backend's hot path, one unpack and no
        objects. The sector range is NOT checked: check it, or use `decode_request`."""
        seg1 = self._seg_structs[1]
        if len(data) < seg1.size or data[0] > _OP_WRITE or data[1] != 1:
            return None
        operation, _, _, id, sector, gref, first, last = seg1.unpack_from(data)
        return operation, id, sector, gref, first, last

    def decode_request(
        self,
        data: bytes,
        *,
        max_indirect_segments: int = 0,
        granule: int = XEN_PAGE_SIZE,
    ) -> AnyBlkifRequest:
        """Decode and validate one request copied out of the ring (see the module docstring)."""
        if len(data) < self._rw.size:
            raise BlkifError(f"{len(data)}-byte blkif request, need at least {self._rw.size}")
        operation = data[0]
        if operation <= _OP_FLUSH_DISKCACHE:  # a direct request (the hot path)
            nr_segments = data[1]
            if nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST or (
                nr_segments == 0 and operation <= _OP_WRITE
            ):
                raise BlkifError(
                    f"{BlkifOp(operation).name} with {nr_segments} segments (allowed: "
                    f"{int(operation <= _OP_WRITE)}..{BLKIF_MAX_SEGMENTS_PER_REQUEST})",
                    id=self._rw.unpack_from(data)[3],
                    operation=operation,
                )
            try:
                values = self._seg_structs[nr_segments].unpack_from(data)
            except struct.error:
                raise BlkifError(
                    f"{len(data)}-byte request cannot hold {nr_segments} segments",
                    id=self._rw.unpack_from(data)[3],
                    operation=operation,
                ) from None
            max_sect = _MAX_SECT_4K if granule == XEN_PAGE_SIZE else max_sector_in_frame(granule)
            if nr_segments == 1 and values[6] <= values[7] <= max_sect:  # one segment: fast path
                segment = BlkifSegment(values[5], values[6], values[7])
                return BlkifRequest(_OPS[operation], values[3], values[4], (segment,), values[2])
            fields = iter(values[5:])
            segments = [BlkifSegment(*seg) for seg in zip(fields, fields, fields, strict=True)]
            _check_segments(segments, max_sect, values[3], operation)
            return BlkifRequest(_OPS[operation], values[3], values[4], tuple(segments), values[2])
        id = self._rw.unpack_from(data)[3]
        if operation == BLKIF_OP_DISCARD:
            if len(data) < self._discard.size:
                raise BlkifError(
                    f"{len(data)}-byte discard request, need {self._discard.size}",
                    id=id,
                    operation=operation,
                )
            _, flag, handle, id, sector, nr_sectors = self._discard.unpack_from(data)
            return BlkifDiscardRequest(id, sector, nr_sectors, flag, handle)
        if operation == BLKIF_OP_INDIRECT and max_indirect_segments > 0:
            return self._decode_indirect(data, id, max_indirect_segments, granule)
        raise BlkifUnsupportedOp(
            f"unsupported blkif operation {operation}"
            + (" (indirect segments not advertised)" if operation == BLKIF_OP_INDIRECT else ""),
            id=id,
            operation=operation,
        )

    def _decode_indirect(
        self, data: bytes, id: int, max_indirect_segments: int, granule: int
    ) -> BlkifIndirectRequest:
        head = self._indirect_head
        if len(data) < head.size:
            raise BlkifError(
                f"{len(data)}-byte indirect request, need {head.size}",
                id=id,
                operation=BLKIF_OP_INDIRECT,
            )
        _, indirect_op, nr_segments, id, sector, handle, *grefs = head.unpack_from(data)
        if indirect_op not in _DATA_OPS:
            raise BlkifError(
                f"invalid indirect operation {indirect_op}", id=id, operation=BLKIF_OP_INDIRECT
            )
        limit = min(max_indirect_segments, max_indirect_segments_limit(granule))
        if not 1 <= nr_segments <= limit:
            raise BlkifError(
                f"indirect request with {nr_segments} segments (allowed: 1..{limit})",
                id=id,
                operation=BLKIF_OP_INDIRECT,
            )
        pages = indirect_pages(nr_segments, granule)
        return BlkifIndirectRequest(
            _OPS[indirect_op], id, sector, nr_segments, tuple(grefs[:pages]), handle
        )

    # -- responses --------------------------------------------------------------------

    def encode_response(self, response: BlkifResponse) -> bytes:
        """The `response_size` bytes of a response."""
        return self.pack_response(response.id, response.operation, response.status)

    def pack_response(self, id: int, operation: int, status: int) -> bytes:
        """`encode_response` from the three fields (a backend's hot path: no object)."""
        try:
            return self._response.pack(id, operation, status)
        except struct.error as exc:
            raise BlkifError(
                f"cannot encode response id={id} operation={operation} status={status}: {exc}"
            ) from None

    def response_fields(self, data: bytes) -> tuple[int, int, int]:
        """(id, operation, status) of a response copied out of its ring slot (a frontend's
        hot path: `decode_response` without the object)."""
        try:
            fields: tuple[int, int, int] = self._response.unpack_from(data)
        except struct.error:
            raise BlkifError(
                f"{len(data)}-byte blkif response, need {self._response.size}"
            ) from None
        return fields

    def decode_response(self, data: bytes) -> BlkifResponse:
        """Decode one response copied out of the ring (every field value is representable)."""
        try:
            return BlkifResponse(*self._response.unpack_from(data))
        except struct.error:
            raise BlkifError(
                f"{len(data)}-byte blkif response, need {self._response.size}"
            ) from None


BLKIF_X86_64: Final = BlkifProtocol(XEN_IO_PROTO_ABI_X86_64, packed=False)
BLKIF_ARM: Final = BlkifProtocol(XEN_IO_PROTO_ABI_ARM, packed=False)
BLKIF_X86_32: Final = BlkifProtocol(XEN_IO_PROTO_ABI_X86_32, packed=True)
BLKIF_NATIVE: Final = BLKIF_X86_64

BLKIF_PROTOCOLS: Final = {p.name: p for p in (BLKIF_X86_64, BLKIF_ARM, BLKIF_X86_32)}

# The ring of the native ABI: 112-byte requests, 16-byte responses, 32 slots in 4 KiB.
BLKIF_RING: Final = BLKIF_NATIVE.ring_layout


def blkif_protocol(name: str | None) -> BlkifProtocol:
    """The codec for a frontend's `protocol` value (None or "" = native x86_64)."""
    if not name:
        return BLKIF_NATIVE
    try:
        return BLKIF_PROTOCOLS[name]
    except KeyError:
        raise BlkifError(
            f"unknown blkif protocol {name!r} (known: {', '.join(sorted(BLKIF_PROTOCOLS))})"
        ) from None
