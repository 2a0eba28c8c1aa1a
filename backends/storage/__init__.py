"""Disks for the block backend: the `Storage` protocol and its implementations.

- `base`: the protocol, `StorageInfo`, `StorageError` (with a `kind`), the `StorageFaults` seam;
- `raw`: `RawImage`, a raw image file (sparse creation, flock, hole punching, inline fast path);
- `memory`: `MemoryDisk`, a RAM disk for tests;
- `vectored`, `fallocate`: the system-call helpers behind `RawImage`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backends.storage.base import (
    BLKIF_SECTOR,
    ImmediateStorage,
    ReadBuffer,
    Storage,
    StorageError,
    StorageErrorKind,
    StorageFaults,
    StorageInfo,
    StorageOp,
    WriteBuffer,
)
from backends.storage.memory import MemoryDisk
from backends.storage.raw import IoPolicy, RawImage

__all__ = [
    "BLKIF_SECTOR",
    "ImmediateStorage",
    "IoPolicy",
    "MemoryDisk",
    "RawImage",
    "ReadBuffer",
    "Storage",
    "StorageError",
    "StorageErrorKind",
    "StorageFaults",
    "StorageInfo",
    "StorageOp",
    "WriteBuffer",
]

if TYPE_CHECKING:  # both implementations satisfy the protocol (checked by mypy)

    def _conforms(raw: RawImage, memory: MemoryDisk) -> tuple[Storage, Storage]:
        return raw, memory

    def _immediate(raw: RawImage, memory: MemoryDisk) -> tuple[ImmediateStorage, ...]:
        return raw, memory
