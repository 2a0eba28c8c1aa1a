"""Positional scatter/gather file I/O that survives short transfers and the IOV_MAX limit.

`os.preadv` / `os.pwritev` may move fewer bytes than asked (a signal, RWF_NOWAIT finding only
part of the range in the page cache) and take at most IOV_MAX buffers per call; these helpers
loop until everything moved, resuming mid-buffer where the previous call stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def as_views(buffers: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
    """Byte-format views of `buffers` (casting typed memoryviews to 'B')."""
    views = []
    for buf in buffers:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        views.append(view)
    return views


def skip(views: list[memoryview], done: int) -> list[memoryview]:
    """The part of `views` that remains after the first `done` bytes."""
    for i, view in enumerate(views):
        n = view.nbytes
        if done < n:
            return [view[done:], *views[i + 1 :]] if done else views[i:]
        done -= n
    return []


def preadv_all(fd: int, views: list[memoryview], offset: int, done: int = 0) -> None:
    """Fill `views` from `fd` at `offset`, starting `done` bytes in. EOF is an OSError."""
    _transfer_all(
        os.preadv,
        fd,
        views,
        offset,
        done,
        "short read: the image ends before the disk does (truncated?)",
    )


def pwritev_all(fd: int, views: list[memoryview], offset: int, done: int = 0) -> None:
    """Write all of `views` to `fd` at `offset`, starting `done` bytes in."""
    _transfer_all(os.pwritev, fd, views, offset, done, "write made no progress")


def _transfer_all(
    call: Callable[[int, list[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    done: int,
    stalled: str,
) -> None:
    """Repeat `call` (preadv or pwritev, IOV_MAX buffers at a time) until every byte of
    `views` past the first `done` is moved; a call that moves nothing is `stalled`."""
    rest = skip(views, done)
    offset += done
    while rest:
        n = call(fd, rest[:IOV_MAX], offset)
        if n == 0:
            raise OSError(0, stalled)
        offset += n
        rest = skip(rest, n)
