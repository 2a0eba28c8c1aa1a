"""The backend's request core (sans-IO): one ring slot in, an I/O plan or a rejection out.

`RequestCore.decode(slot)` applies, to the single private copy of a request, every check
Linux blkback makes before touching the disk (`dispatch_rw_block_io`, `xen_vbd_translate`,
`dispatch_discard_io`, `dispatch_other_io`), in its order:

- the codec (`xenpv.abi.blkif`): segment counts, `first_sect <= last_sect <= 7`, known
  operations, INDIRECT only when offered and within `feature-max-indirect-segments`;
- the device's features: FLUSH_DISKCACHE / WRITE_BARRIER / DISCARD on a device that did not
  offer them → BLKIF_RSP_EOPNOTSUPP (blkif.h allows it "at any time"); unknown operations
  → EOPNOTSUPP;
- the device: writing (or discarding, or flushing with data) a read-only device, or a range
  that ends past the capacity → BLKIF_RSP_ERROR ("access denied");
- on a 4096-byte-sector disk, a start sector or a segment length that is not a multiple of 8
  512-byte sectors → ERROR ("Misaligned I/O request").

A secure discard on a device that did not advertise `discard-secure` is an ordinary discard
(blkif.h: BLKIF_DISCARD_SECURE is "ignored if discard-secure=0", as in Linux).
The response to an INDIRECT request carries its `indirect_op`, as Linux's `make_response`.
Nothing here raises for anything a frontend can write.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from backends.blkback.keys import DeviceFeatures
from xenpv.abi.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    SECTOR_SIZE,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifRequest,
    decode_indirect_segments,
)
from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import BlkifError, BlkifUnsupportedOp


class IoKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"  # FLUSH_DISKCACHE: write the data (if any), then fdatasync
    BARRIER = "barrier"  # WRITE_BARRIER: drain in-flight I/O, write the data, fdatasync
    DISCARD = "discard"


class DataSegment(NamedTuple):
    """`length` bytes at byte `offset` of the frame granted by `gref` (a tuple: requests
    carry up to 4096 of these, so they must be cheap to make)."""

    gref: int
    offset: int
    length: int


@dataclass(slots=True)
class IoRequest:
    """A validated request: what to do with which bytes of the disk and of the guest."""

    id: int
    operation: int  # the response's `operation`
    kind: IoKind
    offset: int  # bytes on the disk
    length: int  # bytes (data length, or discard length)
    segments: tuple[DataSegment, ...] = ()
    secure: bool = False


@dataclass(slots=True)
class Rejected:
    """A request answered without I/O."""

    id: int
    operation: int
    status: int
    reason: str


@dataclass(slots=True)
class NeedIndirect:
    """An INDIRECT request: copy its indirect pages, then call `RequestCore.finish_indirect`."""

    request: BlkifIndirectRequest


Decoded = IoRequest | Rejected | NeedIndirect

_new_tuple = tuple.__new__  # builds a DataSegment without its Python-level __new__


def _data_segments(raw: Iterable[tuple[int, int, int]]) -> tuple[DataSegment, ...]:
    """(gref, first_sect, last_sect) descriptors → DataSegments (validated already)."""
    return tuple(
        [
            _new_tuple(DataSegment, (gref, first << 9, (last - first + 1) << 9))
            for gref, first, last in raw
        ]
    )


@dataclass(slots=True)
class DeviceLimits:
    """What requests are checked against; `size` changes on a capacity change."""

    size: int  # bytes
    sector_size: int
    read_only: bool
    features: DeviceFeatures
    max_indirect_segments: int
    granule: int = XEN_PAGE_SIZE  # the negotiated grant size; 4 KiB baseline


_KIND: dict[int, IoKind] = {
    BLKIF_OP_READ: IoKind.READ,
    BLKIF_OP_WRITE: IoKind.WRITE,
    BLKIF_OP_FLUSH_DISKCACHE: IoKind.FLUSH,
    BLKIF_OP_WRITE_BARRIER: IoKind.BARRIER,
}


class RequestCore:
    """Decode and validate requests of one ring (its protocol, its device's limits)."""

    __slots__ = ("limits", "protocol")

    def __init__(self, protocol: BlkifProtocol, limits: DeviceLimits) -> None:
        self.protocol = protocol
        self.limits = limits

    def decode(self, data: bytes) -> Decoded:
        limits = self.limits
        one = self.protocol.single_segment(data)
        if one is not None:  # a READ/WRITE of one segment: most small I/O, no codec objects
            operation, id, sector, gref, first, last = one
            if first <= last < limits.granule >> 9:
                kind = IoKind.READ if operation == BLKIF_OP_READ else IoKind.WRITE
                segment = _new_tuple(DataSegment, (gref, first << 9, (last - first + 1) << 9))
                return self._plan(id, operation, kind, sector, (segment,))
            # a bad sector range: the codec below refuses it with its message
        try:
            request = self.protocol.decode_request(
                data, max_indirect_segments=limits.max_indirect_segments, granule=limits.granule
            )
        except BlkifUnsupportedOp as exc:
            return self._reject(data, exc, BLKIF_RSP_EOPNOTSUPP)
        except BlkifError as exc:
            return self._reject(data, exc, BLKIF_RSP_ERROR)
        if isinstance(request, BlkifRequest):
            kind = _KIND[request.operation]
            features = limits.features
            if (kind is IoKind.FLUSH and not features.flush) or (
                kind is IoKind.BARRIER and not features.barrier
            ):
                return Rejected(
                    request.id,
                    request.operation,
                    BLKIF_RSP_EOPNOTSUPP,
                    f"{kind.value} not offered on this device",
                )
            planned = _data_segments(
                (seg.gref, seg.first_sect, seg.last_sect) for seg in request.segments
            )
            return self._plan(request.id, request.operation, kind, request.sector_number, planned)
        if isinstance(request, BlkifDiscardRequest):
            return self._discard(request)
        return NeedIndirect(request)

    def finish_indirect(self, request: BlkifIndirectRequest, pages: Sequence[bytes]) -> Decoded:
        """The plan of an INDIRECT request once its indirect pages were copied out."""
        try:
            raw = decode_indirect_segments(pages, request, self.limits.granule)
        except BlkifError as exc:
            return Rejected(request.id, request.indirect_op, BLKIF_RSP_ERROR, exc.reason)
        kind = IoKind.READ if request.indirect_op == BLKIF_OP_READ else IoKind.WRITE
        planned = _data_segments(raw)
        return self._plan(request.id, request.indirect_op, kind, request.sector_number, planned)

    def response(self, id: int, operation: int, status: int) -> bytes:
        return self.protocol.pack_response(id, operation & 0xFF, status)

    # -- checks ----------------------------------------------------------------------------

    def _reject(self, data: bytes, exc: BlkifError, status: int) -> Rejected:
        operation = exc.operation if exc.operation is not None else (data[:1] or b"\0")[0]
        if operation == BLKIF_OP_INDIRECT and len(data) > 1:
            operation = data[1]  # Linux answers with indirect_op
        return Rejected(exc.id if exc.id is not None else 0, operation, status, exc.reason)

    def _plan(
        self,
        id: int,
        operation: int,
        kind: IoKind,
        sector: int,
        planned: tuple[DataSegment, ...],
    ) -> IoRequest | Rejected:
        limits = self.limits
        length = sum([seg[2] for seg in planned])
        nr_sects = length >> 9
        ratio = limits.sector_size // SECTOR_SIZE
        if ratio > 1:
            for seg in planned:
                if ((sector << 9) | seg.length) & (limits.sector_size - 1):
                    return Rejected(
                        id,
                        operation,
                        BLKIF_RSP_ERROR,
                        f"misaligned I/O request: sector {sector}, segment of "
                        f"{seg.length >> 9} sectors on a {limits.sector_size}-byte-sector device",
                    )
        if kind is not IoKind.READ and limits.read_only:
            return Rejected(id, operation, BLKIF_RSP_ERROR, f"{kind.value} on a read-only device")
        if nr_sects and sector + nr_sects > limits.size // SECTOR_SIZE:
            return Rejected(
                id,
                operation,
                BLKIF_RSP_ERROR,
                f"access denied: sectors [{sector}, {sector + nr_sects}) beyond the "
                f"{limits.size // SECTOR_SIZE}-sector device",
            )
        # A flush/barrier without data has no range (Linux skips the bounds check for it).
        offset = sector * SECTOR_SIZE if nr_sects else 0
        return IoRequest(id, operation, kind, offset, length, planned)

    def _discard(self, request: BlkifDiscardRequest) -> IoRequest | Rejected:
        limits = self.limits
        features = limits.features
        if not features.discard:
            return Rejected(
                request.id, BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP, "discard not offered"
            )
        start, count = request.sector_number, request.nr_sectors
        if start + count > limits.size // SECTOR_SIZE:
            return Rejected(
                request.id,
                BLKIF_OP_DISCARD,
                BLKIF_RSP_ERROR,
                f"access denied: discard [{start}, {start + count}) beyond the device",
            )
        ratio = limits.sector_size // SECTOR_SIZE
        if (start | count) & (ratio - 1):
            return Rejected(
                request.id,
                BLKIF_OP_DISCARD,
                BLKIF_RSP_ERROR,
                f"misaligned discard [{start}, {start + count})",
            )
        return IoRequest(
            request.id,
            BLKIF_OP_DISCARD,
            IoKind.DISCARD,
            start * SECTOR_SIZE,
            count * SECTOR_SIZE,
            secure=request.secure and features.discard_secure,
        )
