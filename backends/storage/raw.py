"""`RawImage`: a disk backed by a raw image file, with trio at the edge.

Where the blocking system calls run, chosen by `xenpv bench storage` (256 MiB image on ext4,
2 shared cores, 1.5 s per workload; IOPS for "thread" / "inline" / "auto"):

    4 KiB random read, cached, QD1      6,222 / 115,083 / 113,791
    4 KiB random read, cached, QD32     7,656 / 140,238 / 150,089
    4 KiB random write, QD1             8,584 / 102,166 / 106,238
    64 KiB random read, cached, QD1     6,249 /  60,348 /  57,983
    64 KiB random write, QD1            7,271 /  46,825 /  43,079
    1 MiB sequential read, cached, QD1  5,794 /   8,604 /   8,145
    1 MiB sequential write, QD1         4,253 /   4,184 /   2,447 (noisy: auto = thread here)
    4 KiB random read, uncached, QD32   7,569 /  14,446 /   8,519

A hop through `trio.to_thread.run_sync` costs about 150 µs here, against 1.4 µs for a cached
4 KiB `preadv`, so small I/O runs on the trio thread. Inline calls that reach the device
block every task of the process (fast on this virtio disk, fatal on a slow one), so the
default policy ("auto") only stays inline where it cannot wait for the device:
- reads up to `inline_read_max` (1 MiB) try `preadv(..., RWF_NOWAIT)` inline, which copies
  only what the page cache holds and never blocks; whatever it could not deliver is read on
  a worker thread;
- writes up to `inline_write_max` (64 KiB) use `pwritev` inline (with RWF_NOWAIT where the
  filesystem supports it for buffered writes; ext4 answers EOPNOTSUPP, so there they are
  plain page-cache writes, which can stall on dirty-page throttling); larger ones, where
  inline no longer wins, go to a worker thread;
- fdatasync, hole punching and ftruncate always go to a worker thread.

The image is flock()ed (shared when read-only, exclusive otherwise) so that two backends
cannot serve one writable image. A file whose size is not a whole number of sectors exposes
only its whole sectors, as the Linux loop driver does.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
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
from backends.storage.fallocate import punch_hole
from backends.storage.vectored import IOV_MAX, as_views, preadv_all, pwritev_all

log = structlog.get_logger()

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True, slots=True)
class IoPolicy:
    """Where `RawImage` runs preadv/pwritev: "auto" (see the module docstring), "inline"
    (always on the trio thread, blocking it) or "thread" (always on a worker thread)."""

    mode: Literal["auto", "inline", "thread"] = "auto"
    # "auto": reads up to this size first try RWF_NOWAIT inline (a cache hit is a memcpy)
    inline_read_max: int = 1024 * 1024
    # "auto": writes up to this size run inline, larger ones on a worker thread
    inline_write_max: int = 64 * 1024


class RawImage:
    """A raw image file as a `Storage`.

    `create=True` creates a new sparse file of `size` bytes (refusing an existing one);
    otherwise the file must exist and, if `size` is given, have exactly that size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        create: bool = False,
        read_only: bool = False,
        sector_size: int = 512,
        faults: StorageFaults | None = None,
        policy: IoPolicy = IoPolicy(),
    ) -> None:
        check_sector_size(sector_size)
        self.path = Path(path)
        self._sector_size = sector_size
        self._read_only = read_only
        self._faults = faults
        self._policy = policy
        self._closed = False
        self._inflight = 0
        self._idle = trio.Event()
        self._nowait_read = policy.mode == "auto"
        self._nowait_write = policy.mode == "auto"
        if create:
            if read_only:
                raise StorageError(StorageErrorKind.INVALID, "cannot create a read-only image")
            if size is None:
                raise StorageError(StorageErrorKind.INVALID, "creating an image needs a size")
            check_size(size, sector_size)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise StorageError(
                StorageErrorKind.IO, f"cannot open image {str(self.path)!r}: {exc.strerror}"
            ) from None
        try:
            self._setup(size, create)
        except BaseException:
            os.close(self._fd)
            if create:
                self.path.unlink(missing_ok=True)
            raise
        log.debug(
            "storage.open",
            path=str(self.path),
            size=self._size,
            sector_size=sector_size,
            read_only=read_only,
            discard=self._discard,
        )

    def _setup(self, size: int | None, create: bool) -> None:
        try:
            fcntl.flock(
                self._fd, (fcntl.LOCK_SH if self._read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB
            )
        except BlockingIOError:
            raise StorageError(
                StorageErrorKind.INVALID, f"image {str(self.path)!r} is in use by another backend"
            ) from None
        if create:
            assert size is not None
            os.ftruncate(self._fd, size)  # sparse: no block is allocated
        st = os.fstat(self._fd)
        if not create and size is not None and st.st_size != size:
            raise StorageError(
                StorageErrorKind.INVALID,
                f"image {str(self.path)!r} has {st.st_size} bytes, expected {size}",
            )
        self._size = st.st_size - st.st_size % self._sector_size
        block = st.st_blksize
        block_ok = block & (block - 1) == 0 and self._sector_size <= block <= 65536
        self._physical = block if block_ok else self._sector_size
        self._discard_granularity = block if block_ok else self._sector_size
        self._discard = not self._read_only and self._probe_discard()

    def _probe_discard(self) -> bool:
        """Punch a hole past the end of the file: a no-op where punching works, EOPNOTSUPP
        where the filesystem cannot, so `info()` says so up front rather than failing later."""
        g = self._discard_granularity
        try:
            punch_hole(self._fd, -(-self._size // g) * g, g)
        except OSError as exc:
            log.info("storage.discard_unsupported", path=str(self.path), error=exc.strerror)
            return False
        return True

    # --- Storage -------------------------------------------------------------------------

    def info(self) -> StorageInfo:
        return StorageInfo(
            size=self._size,
            sector_size=self._sector_size,
            physical_sector_size=self._physical,
            read_only=self._read_only,
            flush=not self._read_only,
            discard=self._discard,
            discard_granularity=self._discard_granularity,
            discard_alignment=0,
            discard_secure=False,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._fd

    async def readinto(self, offset: int, buffers: Sequence[ReadBuffer]) -> None:
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=True)
        check_range(offset, length, self._size, self._sector_size)
        await self._enter(StorageOp.READ, offset, length)
        try:
            views = as_views(buffers)
            done = 0
            if (
                self._nowait_read
                and 0 < length <= self._policy.inline_read_max
                and len(views) <= IOV_MAX
            ):
                done = self._try_nowait(os.preadv, views, offset)
            if done < length:
                if self._policy.mode == "inline":
                    preadv_all(self._fd, views, offset, done)
                else:
                    await trio.to_thread.run_sync(preadv_all, self._fd, views, offset, done)
        except OSError as exc:
            raise self._io_error(StorageOp.READ, offset, length, exc) from None
        finally:
            await self._leave()

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await self.readinto(offset, [buf])
        return bytes(buf)

    def readinto_now(self, offset: int, buffers: Sequence[ReadBuffer]) -> bool:
        """`readinto` without leaving the calling task, when the page cache holds the whole
        range (one RWF_NOWAIT `preadv`, policy "auto"). False: nothing was promised (the
        buffers may hold part of the data), call `readinto`. Skipped when a fault plan is
        installed, so that every call still passes the fault seam. Lets blkback answer a
        cached read inside its ring loop instead of starting a task for it."""
        if self._faults is not None or not self._nowait_read or self._closed:
            return False
        length = buffer_lengths(buffers, self._sector_size, writable=True)
        check_range(offset, length, self._size, self._sector_size)
        if not 0 < length <= self._policy.inline_read_max or len(buffers) > IOV_MAX:
            return False
        try:
            return self._try_nowait(os.preadv, as_views(buffers), offset) == length
        except OSError as exc:
            raise self._io_error(StorageOp.READ, offset, length, exc) from None

    def write_now(self, offset: int, buffers: Sequence[WriteBuffer]) -> bool:
        """`write` without leaving the calling task, for the writes the policy runs inline
        anyway (up to `inline_write_max`). False: not done (a partial RWF_NOWAIT write may
        have stored a prefix of the same data), call `write`. Skipped under a fault plan."""
        if self._faults is not None or self._closed or self._policy.mode == "thread":
            return False
        length = buffer_lengths(buffers, self._sector_size, writable=False)
        check_range(offset, length, self._size, self._sector_size)
        check_writable(self._read_only, StorageOp.WRITE)
        if self._policy.mode == "auto" and length > self._policy.inline_write_max:
            return False
        if not length or len(buffers) > IOV_MAX:
            return False
        views = as_views(buffers)
        try:
            if self._nowait_write:
                done = self._try_nowait(os.pwritev, views, offset)
                if done != -1:
                    # all of it, or it would have blocked (`write` finishes on a thread)
                    return done == length
                self._nowait_write = False  # RWF_NOWAIT unsupported for buffered writes here
            pwritev_all(self._fd, views, offset)
        except OSError as exc:
            raise self._io_error(StorageOp.WRITE, offset, length, exc) from None
        return True

    async def write(self, offset: int, buffers: Sequence[WriteBuffer]) -> None:
        self._check_open()
        length = buffer_lengths(buffers, self._sector_size, writable=False)
        check_range(offset, length, self._size, self._sector_size)
        check_writable(self._read_only, StorageOp.WRITE)
        await self._enter(StorageOp.WRITE, offset, length)
        try:
            views = as_views(buffers)
            mode = self._policy.mode
            inline = mode == "inline" or (
                mode == "auto" and length <= self._policy.inline_write_max
            )
            done = 0
            if inline and self._nowait_write and length and len(views) <= IOV_MAX:
                done = self._try_nowait(os.pwritev, views, offset)
                if done == -1:  # RWF_NOWAIT unsupported for buffered writes here
                    self._nowait_write = False
                    done = 0
                elif done < length:
                    inline = False  # it would have blocked: finish on a thread
            if done < length:
                if inline:
                    pwritev_all(self._fd, views, offset, done)
                else:
                    await trio.to_thread.run_sync(pwritev_all, self._fd, views, offset, done)
        except OSError as exc:
            raise self._io_error(StorageOp.WRITE, offset, length, exc) from None
        finally:
            await self._leave()

    async def flush(self) -> None:
        self._check_open()
        check_writable(self._read_only, StorageOp.FLUSH)
        await self._enter(StorageOp.FLUSH, 0, 0)
        try:
            await trio.to_thread.run_sync(os.fdatasync, self._fd)
        except OSError as exc:
            raise self._io_error(StorageOp.FLUSH, 0, 0, exc) from None
        finally:
            await self._leave()

    async def discard(self, offset: int, length: int, *, secure: bool = False) -> None:
        self._check_open()
        check_range(offset, length, self._size, self._sector_size)
        check_writable(self._read_only, StorageOp.DISCARD)
        if not self._discard:
            raise StorageError(StorageErrorKind.UNSUPPORTED, "the image cannot punch holes")
        if secure:
            raise StorageError(StorageErrorKind.UNSUPPORTED, "secure discard of an image file")
        await self._enter(StorageOp.DISCARD, offset, length)
        try:
            if length:
                await trio.to_thread.run_sync(punch_hole, self._fd, offset, length)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                self._discard = False
                raise StorageError(
                    StorageErrorKind.UNSUPPORTED, f"the image cannot punch holes: {exc.strerror}"
                ) from None
            raise self._io_error(StorageOp.DISCARD, offset, length, exc) from None
        finally:
            await self._leave()

    async def resize(self, new_size: int) -> None:
        self._check_open()
        check_size(new_size, self._sector_size)
        check_writable(self._read_only, StorageOp.RESIZE)
        await self._enter(StorageOp.RESIZE, new_size, 0)
        try:
            await trio.to_thread.run_sync(os.ftruncate, self._fd, new_size)
        except OSError as exc:
            raise self._io_error(StorageOp.RESIZE, new_size, 0, exc) from None
        finally:
            await self._leave()
        log.info("storage.resize", path=str(self.path), old=self._size, new=new_size)
        self._size = new_size

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inflight:
            await self._idle.wait()
        os.close(self._fd)  # also drops the flock
        log.debug("storage.close", path=str(self.path))

    # --- helpers -------------------------------------------------------------------------

    def _try_nowait(self, call: Callable[..., int], views: list[memoryview], offset: int) -> int:
        """One non-blocking attempt: bytes moved, 0 if it would block, -1 if unsupported."""
        try:
            return call(self._fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                if call is os.preadv:
                    self._nowait_read = False
                return -1 if call is os.pwritev else 0
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(StorageErrorKind.CLOSED, f"image {str(self.path)!r} is closed")

    async def _enter(self, op: StorageOp, offset: int, length: int) -> None:
        await enter_call(self._faults, op, offset, length, self._check_open)
        self._inflight += 1

    async def _leave(self) -> None:
        self._inflight -= 1
        if self._closed and not self._inflight:
            self._idle.set()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def _io_error(self, op: StorageOp, offset: int, length: int, exc: OSError) -> StorageError:
        log.warning(
            "storage.io_error",
            path=str(self.path),
            op=op.value,
            offset=offset,
            length=length,
            error=exc.strerror,
        )
        return StorageError(
            StorageErrorKind.IO, f"{op.value} {offset}+{length} failed: {exc.strerror}"
        )
