"""A domain's memory: a memfd addressed in 4 KiB frames, allocated in pages of the domain's size.

The file holds the domain's RAM followed by its grant table (see grant.py). It is a memfd so
that a peer on the same host can map it (the shared-memory transport passes the descriptor
over the Unix link with SCM_RIGHTS). Pages are `page_size` bytes (4, 16 or 64 KiB), aligned,
made of `page_size // 4096` contiguous frames.

Writes to memory that peers replicate (the socket transport) must be announced with
`written()`; the memory forwards each range to the watchers of the frames it touches, in
program order. With a shared-memory peer, `written()` is also the memory barrier that ring.h
puts between a store and the following load of the peer's index (see `barrier`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Protocol

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.hv.errors import HvError
from xenpv.hv.grant import GRANT_ENTRY_SIZE

PAGE_SIZES = (4096, 16384, 65536)
FRAME_SHIFT = 12

_fence_lock = threading.Lock()


def barrier() -> None:
    """A full memory barrier, as ring.h's mb(), for stores to memory a peer process maps.

    CPython offers no fence; an uncontended lock acquire/release goes through glibc's
    semaphore fast path, a locked read-modify-write (a full barrier on x86-64).
    """
    _fence_lock.acquire()
    _fence_lock.release()


class OutOfMemory(HvError):
    """The domain has no free pages (or no contiguous run) of the size asked for."""


class FrameWatcher(Protocol):
    """Receives writes to frames a peer replicates (a socket-transport mapping)."""

    def frame_written(
        self, gref: int, offset: int, length: int, source: memoryview, start: int
    ) -> None:
        """`length` bytes at `offset` inside grant `gref` changed; they are `source[start:]`."""
        ...


class Page:
    """One page (or, from `alloc_buffer`, a run of contiguous pages) of domain memory.

    A `SharedBuffer`: `view` is the memory itself, `written` announces changes.
    """

    __slots__ = ("_memory", "_offset", "frame", "nframes", "view")

    def __init__(self, memory: DomainMemory, frame: int, nframes: int) -> None:
        self._memory = memory
        self.frame = frame
        self.nframes = nframes
        self._offset = frame << FRAME_SHIFT
        self.view = memory.view[self._offset : self._offset + (nframes << FRAME_SHIFT)]

    def frames(self) -> range:
        """Every 4 KiB frame of this page, for granting each one."""
        return range(self.frame, self.frame + self.nframes)

    def written(self, offset: int, length: int) -> None:
        self._memory.written(self._offset + offset, length)

    def __repr__(self) -> str:
        return f"Page(frame={self.frame}, nframes={self.nframes})"


class SharedPeerMemory:
    """A peer's memory file mapped here (shared-memory transport): its frames and grant table."""

    __slots__ = ("fd", "nr_frames", "nr_grants", "table", "view")

    def __init__(self, fd: int, view: memoryview, nr_frames: int, nr_grants: int) -> None:
        self.fd = fd
        self.view = view
        self.nr_frames = nr_frames
        self.nr_grants = nr_grants
        table_offset = nr_frames << FRAME_SHIFT
        self.table = view[table_offset : table_offset + nr_grants * GRANT_ENTRY_SIZE]


class DomainMemory:
    """The RAM and grant table of one domain, in one memfd."""

    def __init__(self, domid: int, memory_bytes: int, page_size: int, nr_grants: int) -> None:
        if page_size not in PAGE_SIZES:
            raise HvError(f"page size {page_size} not one of {PAGE_SIZES}")
        if memory_bytes <= 0 or memory_bytes % page_size:
            raise HvError(f"memory size {memory_bytes} is not a positive multiple of {page_size}")
        self.page_size = page_size
        self.frames_per_page = page_size // XEN_PAGE_SIZE
        self.nr_frames = memory_bytes >> FRAME_SHIFT
        self.memory_bytes = memory_bytes
        self.table_offset = memory_bytes
        table_bytes = -(-nr_grants * GRANT_ENTRY_SIZE // XEN_PAGE_SIZE) * XEN_PAGE_SIZE
        self.size = memory_bytes + table_bytes
        self.fd = os.memfd_create(f"xenpv-dom{domid}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._mmap = mmap.mmap(self.fd, self.size)
        self.view = memoryview(self._mmap)
        self.table = self.view[self.table_offset : self.table_offset + nr_grants * GRANT_ENTRY_SIZE]
        self._used = bytearray(self.nr_frames // self.frames_per_page)
        self._hint = 0
        # Pages from here on were never handed out: still the zeros of the new memfd, so
        # allocating them needs no zeroing (which would also make them resident).
        self._untouched = 0
        # frame -> [(watcher, gref, first frame of the granule)]: socket-transport replicas.
        self._watch: dict[int, list[tuple[FrameWatcher, int, int]]] = {}
        self.shm_peers = 0  # links on the shared-memory transport: written() is then a barrier

    def close(self) -> None:
        """Release the memfd descriptor (the mapping lives on while views of it exist)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- allocation -------------------------------------------------------------------------

    def alloc_pages(self, n: int) -> list[Page]:
        """`n` zeroed pages (not necessarily adjacent)."""
        if n < 0 or n > self._used.count(0):
            raise OutOfMemory(f"cannot allocate {n} pages: {self._used.count(0)} free")
        return [self._alloc_run(1) for _ in range(n)]

    def alloc_buffer(self, nframes: int) -> Page:
        """A zeroed region of at least `nframes` consecutive frames, page aligned (rings)."""
        if nframes < 1:
            raise HvError("a buffer needs at least one frame")
        pages = -(-nframes // self.frames_per_page)
        page = self._alloc_run(pages)
        return Page(self, page.frame, nframes) if page.nframes != nframes else page

    def free_pages(self, pages: Sequence[Page]) -> None:
        """Return pages to the allocator. Grants on them must have been ended first."""
        for page in pages:
            first = page.frame // self.frames_per_page
            count = -(-page.nframes // self.frames_per_page)
            for index in range(first, first + count):
                if not self._used[index]:
                    raise HvError(f"page at frame {page.frame} freed twice")
                self._used[index] = 0
            self._hint = min(self._hint, first)

    def _alloc_run(self, count: int) -> Page:
        used = self._used
        run = bytes(count)
        index = used.find(run, self._hint)
        if index < 0:
            index = used.find(run)
        if index < 0:
            raise OutOfMemory(f"no run of {count} free pages of {self.page_size} bytes")
        used[index : index + count] = b"\x01" * count
        self._hint = index + count
        frame = index * self.frames_per_page
        page = Page(self, frame, count * self.frames_per_page)
        if index < self._untouched:
            reused = min(index + count, self._untouched) - index
            page.view[: reused * self.page_size] = bytes(reused * self.page_size)
        self._untouched = max(self._untouched, index + count)
        return page

    def frame_view(self, frame: int, nframes: int = 1) -> memoryview:
        start = frame << FRAME_SHIFT
        return self.view[start : start + (nframes << FRAME_SHIFT)]

    # -- replication --------------------------------------------------------------------------

    def watch(self, frame: int, nframes: int, watcher: FrameWatcher, gref: int) -> None:
        for f in range(frame, frame + nframes):
            self._watch.setdefault(f, []).append((watcher, gref, frame))

    def unwatch(self, frame: int, nframes: int, watcher: FrameWatcher, gref: int) -> None:
        for f in range(frame, frame + nframes):
            entries = self._watch.get(f)
            if entries is None:
                continue
            with contextlib.suppress(ValueError):
                entries.remove((watcher, gref, frame))
            if not entries:
                del self._watch[f]

    def written(self, offset: int, length: int, exclude: object = None) -> None:
        """Bytes `[offset, offset+length)` of memory changed: tell every replica, in order."""
        if self.shm_peers:
            barrier()
        if not self._watch or length <= 0:
            return
        end = offset + length
        frame = offset >> FRAME_SHIFT
        last = (end - 1) >> FRAME_SHIFT
        watch = self._watch
        view = self.view
        while frame <= last:
            entries = watch.get(frame)
            if entries:
                lo = max(offset, frame << FRAME_SHIFT)
                hi = min(end, (frame + 1) << FRAME_SHIFT)
                for watcher, gref, first in entries:
                    if watcher is not exclude:
                        watcher.frame_written(gref, lo - (first << FRAME_SHIFT), hi - lo, view, lo)
            frame += 1
