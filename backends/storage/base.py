"""What the block backend asks of a disk: the `Storage` protocol, its records and its errors.

Offsets and lengths are in bytes. Every data operation must be aligned to the device's
logical sector size (512 or 4096), both the request as a whole and each scatter/gather buffer,
as Linux blkback requires of each segment on a large-sector device. `info().sectors` counts
512-byte units whatever the sector size, because that is what blkif's `sectors` key counts.

Checks happen before any byte moves, so a refused call never changes the disk. Every call
then passes one interposition point, `StorageFaults.before(op, offset, length)`, which a fault
plan may use to fail (raise) or delay (await) that call; it runs after validation, so a plan
only ever sees well-formed calls, and before any I/O, so a failed call changes nothing.
It is told (op, offset, length) in bytes; FLUSH passes (0, 0) and RESIZE (new size, 0).

Calls may run concurrently (the backend keeps a queue depth); like a real disk, the order in
which overlapping requests in flight reach the medium is not defined, and shrinking a disk
under requests in flight makes those that end past the new size fail with an I/O error.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from xenpv.errors import XenpvError

BLKIF_SECTOR = 512  # blkif counts `sectors`, `sector_number` and `nr_sectors` in these
SECTOR_SIZES = (512, 4096)

ReadBuffer = memoryview | bytearray
WriteBuffer = bytes | bytearray | memoryview


class StorageOp(enum.Enum):
    """The operations that pass the fault seam."""

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    RESIZE = "resize"


class StorageErrorKind(enum.Enum):
    """Why a storage call was refused; the block backend maps UNSUPPORTED to
    BLKIF_RSP_EOPNOTSUPP and every other kind to BLKIF_RSP_ERROR."""

    OUT_OF_RANGE = "out of range"
    MISALIGNED = "misaligned"
    READ_ONLY = "read-only"
    UNSUPPORTED = "unsupported"
    INVALID = "invalid argument"
    CLOSED = "closed"
    IO = "I/O error"


class StorageError(XenpvError):
    """A storage call was refused or failed; `kind` says why, the message says what."""

    def __init__(self, kind: StorageErrorKind, message: str) -> None:
        super().__init__(f"storage {kind.value}: {message}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class StorageInfo:
    """What a backend advertises in xenstore for this disk (at the time of the call)."""

    size: int  # bytes, a multiple of sector_size
    sector_size: int  # logical: 512 or 4096 (`sector-size`)
    physical_sector_size: int  # `physical-sector-size`
    read_only: bool  # `info` bit 4 / mode "r"
    flush: bool  # `feature-flush-cache` and `feature-barrier` (both map to fdatasync)
    discard: bool  # `feature-discard`
    discard_granularity: int  # bytes (`discard-granularity`)
    discard_alignment: int  # bytes (`discard-alignment`)
    discard_secure: bool  # `discard-secure`

    @property
    def sectors(self) -> int:
        """Capacity in 512-byte units, as blkif's `sectors` key counts it."""
        return self.size // BLKIF_SECTOR


class StorageFaults(Protocol):
    """The fault seam: awaited once per storage call, after validation, before any I/O.

    Raise (preferably `StorageError(StorageErrorKind.IO, ...)`) to fail the call, or await
    (e.g. `trio.sleep`) to delay it.
    """

    async def before(self, op: StorageOp, offset: int, length: int) -> None: ...


class Storage(Protocol):
    """A disk as the block backend sees it. Implementations: `RawImage`, `MemoryDisk`."""

    def info(self) -> StorageInfo: ...

    @property
    def closed(self) -> bool: ...

    async def readinto(self, offset: int, buffers: Sequence[ReadBuffer]) -> None:
        """Fill `buffers` in order (scatter) from the disk starting at `offset`."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        """Write `buffers` in order (gather) to the disk starting at `offset`."""
        ...

    async def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        """Forget a range: it reads back as zeroes and (for files) its blocks are freed."""
        ...

    async def resize(self, new_size: int) -> None:
        """Change the capacity (the backend then re-writes `sectors` and Connected)."""
        ...

    async def close(self) -> None:
        """Wait for calls in flight, then release the disk; later calls raise CLOSED."""
        ...


class ImmediateStorage(Storage, Protocol):
    """A `Storage` that can also complete a call inside the calling task when that cannot
    wait for a device (a page-cache hit, a RAM disk). Both return False, having promised
    nothing, when the call must go through the async method instead; errors raise
    `StorageError` as the async methods do. Blkback uses them to answer requests inside
    its ring loop: a task per request costs more than a cached 4 KiB read."""

    def readinto_now(self, offset: int, buffers: Sequence[ReadBuffer]) -> bool: ...

    def write_now(self, offset: int, buffers: Sequence[WriteBuffer]) -> bool: ...


def check_sector_size(sector_size: int) -> None:
    if sector_size not in SECTOR_SIZES:
        raise StorageError(
            StorageErrorKind.INVALID, f"sector size {sector_size} is not one of {SECTOR_SIZES}"
        )


def check_size(size: int, sector_size: int) -> None:
    if size < 0 or size % sector_size:
        raise StorageError(
            StorageErrorKind.MISALIGNED,
            f"size {size} is not a non-negative multiple of the {sector_size}-byte sector",
        )


def check_range(offset: int, length: int, size: int, sector_size: int) -> None:
    """Refuse a byte range that is misaligned or not inside a disk of `size` bytes."""
    if (offset | length) % sector_size:
        raise StorageError(
            StorageErrorKind.MISALIGNED,
            f"range {offset}+{length} is not aligned to the {sector_size}-byte sector",
        )
    if offset < 0 or length < 0 or offset + length > size:
        raise StorageError(
            StorageErrorKind.OUT_OF_RANGE,
            f"range {offset}+{length} is outside the disk (size {size})",
        )


def buffer_lengths(buffers: Sequence[WriteBuffer], sector_size: int, *, writable: bool) -> int:
    """The total byte length of a scatter/gather list whose every buffer is whole sectors."""
    total = 0
    for buf in buffers:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if writable and view.readonly:
            raise StorageError(StorageErrorKind.INVALID, "read buffer is not writable")
        n = view.nbytes
        if n % sector_size:
            raise StorageError(
                StorageErrorKind.MISALIGNED,
                f"buffer of {n} bytes is not a whole number of {sector_size}-byte sectors",
            )
        total += n
    return total


def check_writable(read_only: bool, op: StorageOp) -> None:
    # Linux blkback refuses every non-read operation (flush included) on a read-only vbd.
    if read_only:
        raise StorageError(StorageErrorKind.READ_ONLY, f"{op.value} on a read-only disk")


async def enter_call(
    faults: StorageFaults | None,
    op: StorageOp,
    offset: int,
    length: int,
    check_open: Callable[[], None],
) -> None:
    """The start of every validated storage call: a cancellation point (trio's contract: one
    before the operation starts, none after), then the fault seam, after which the disk must
    still be open (a fault may have delayed the call past `close`)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if faults is not None:
        await faults.before(op, offset, length)
        check_open()
