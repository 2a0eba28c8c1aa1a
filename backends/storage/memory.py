"""`MemoryDisk`: a `Storage` in a bytearray, for tests and benchmarks that must not touch disk.

It enforces exactly the same checks as `RawImage` and passes the same fault seam. Discard
zeroes the range (so secure discard is supported); flush has nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from backends.storage.base import (
    ReadBuffer,
    StorageError,
    StorageErrorKind,
    StorageFaults,
    StorageInfo,
    StorageOp,
    WriteBuffer,
    buffer_lengths,
    check_range,
    check_sector_size,
    check_size,
    check_writable,
    enter_call,
)
from backends.storage.vectored import as_views


class MemoryDisk:
    """A RAM disk of `size` bytes (zero-filled, or `data`)."""

    def __init__(
        self,
        size: int,
        *,
        sector_size: int = 512,
        read_only: bool = False,
        data: bytes | None = None,
        faults: StorageFaults | None = None,
    ) -> None:
        check_sector_size(sector_size)
        check_size(size, sector_size)
        if data is not None and len(data) > size:
            raise StorageError(StorageErrorKind.INVALID, "initial data larger than the disk")
        self._data = bytearray(size)
        if data is not None:
            self._data[: len(data)] = data
        self._sector_size = sector_size
        self._read_only = read_only
        self._faults = faults
        self._closed = False

    @property
    def data(self) -> bytearray:
        """The disk's bytes, for tests to inspect (the independent reader)."""
        return self._data

    @property
    def closed(self) -> bool:
        return self._closed

    def info(self) -> StorageInfo:
        return StorageInfo(
            size=len(self._data),
            sector_size=self._sector_size,
            physical_sector_size=self._sector_size,
            read_only=self._read_only,
            flush=not self._read_only,
            discard=not self._read_only,
            discard_granularity=self._sector_size,
            discard_alignment=0,
            discard_secure=not self._read_only,
        )

    async def readinto(self, offset: int, buffers: Sequence[ReadBuffer]) -> None:
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=True)
        check_range(offset, length, len(self._data), self._sector_size)
        await self._enter(StorageOp.READ, offset, length)
        self._copy_out(offset, buffers)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, [buf])
        return bytes(buf)

    def readinto_now(self, offset: int, buffers: Sequence[ReadBuffer]) -> bool:
        """`readinto` without awaiting (see `RawImage.readinto_now`); False under a fault
        plan, whose seam only `readinto` passes."""
        if self._faults is not None:
            return False
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=True)
        check_range(offset, length, len(self._data), self._sector_size)
        self._copy_out(offset, buffers)
        return True

    def write_now(self, offset: int, buffers: Sequence[WriteBuffer]) -> bool:
        """`write` without awaiting; False under a fault plan."""
        if self._faults is not None:
            return False
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=False)
        check_range(offset, length, len(self._data), self._sector_size)
        check_writable(self._read_only, StorageOp.WRITE)
        self._copy_in(offset, buffers)
        return True

    async def write(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=False)
        check_range(offset, length, len(self._data), self._sector_size)
        check_writable(self._read_only, StorageOp.WRITE)
        await self._enter(StorageOp.WRITE, offset, length)
        self._copy_in(offset, buffers)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def flush(self) -> None:
        self._check_open()
        check_writable(self._read_only, StorageOp.FLUSH)
        await self._enter(StorageOp.FLUSH, 0, 0)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        self._check_open()
        check_range(offset, length, len(self._data), self._sector_size)
        check_writable(self._read_only, StorageOp.DISCARD)
        await self._enter(StorageOp.DISCARD, offset, length)
        self._data[offset : offset + length] = bytes(length)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def resize(self, new_size: int) -> None:
        self._check_open()
        check_size(new_size, self._sector_size)
        check_writable(self._read_only, StorageOp.RESIZE)
        await self._enter(StorageOp.RESIZE, new_size, 0)
        if new_size < len(self._data):
            del self._data[new_size:]
        else:
            self._data.extend(bytes(new_size - len(self._data)))
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def close(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    def _copy_out(self, offset: int, buffers: Sequence[ReadBuffer]) -> None:
        src = memoryview(self._data)
        for view in as_views(buffers):
            n = view.nbytes
            view[:] = src[offset : offset + n]
            offset += n

    def _copy_in(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        dst = memoryview(self._data)
        for view in as_views(buffers):
            n = view.nbytes
            dst[offset : offset + n] = view
            offset += n

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(StorageErrorKind.CLOSED, "memory disk is closed")

    async def _enter(self, op: StorageOp, offset: int, length: int) -> None:
        await enter_call(self._faults, op, offset, length, self._check_open)
