"""The shared-memory seam between protocol code (this package) and the emulated hypervisor.

Ring and codec code (sans-IO) reads and writes a `SharedBuffer`: a contiguous, writable view
of memory that another domain may also see (a granted page, a mapped grant, several pages
mapped side by side for a multi-page ring). Writers call `written(offset, length)` after
changing bytes, so that the socket-copy transport knows which ranges to ship to the peer
before the next event notification (the coherence rule in docs/architecture.md). On the
shared-memory transport `written` costs nothing: both domains see one mmap.
"""

from __future__ import annotations

from typing import Protocol

XEN_PAGE_SIZE = 4096  # the ABI frame size: grants, rings and sector ranges count in these


class SharedBuffer(Protocol):
    """Memory visible to two domains."""

    @property
    def view(self) -> memoryview:
        """Writable, contiguous, format 'B'. Its length is a multiple of 4096."""
        ...

    def written(self, offset: int, length: int) -> None:
        """Record that `view[offset:offset+length]` was changed by this domain."""
        ...


class LocalBuffer:
    """A `SharedBuffer` backed by a private bytearray: for sans-IO tests and single-process use.

    It records written ranges so tests can check what a transport would ship.
    """

    __slots__ = ("_view", "dirty")

    def __init__(self, size: int = XEN_PAGE_SIZE, data: bytes | None = None) -> None:
        if data is not None:
            size = len(data)
        self._view = memoryview(bytearray(data if data is not None else size))
        self.dirty: list[tuple[int, int]] = []

    @property
    def view(self) -> memoryview:
        return self._view

    def written(self, offset: int, length: int) -> None:
        self.dirty.append((offset, length))
