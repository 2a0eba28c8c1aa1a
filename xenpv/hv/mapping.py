"""A mapping of another domain's grants: one contiguous view of several granules.

Socket transport: the view is a private replica, filled from the granter's memory when the
mapping is made; the granter ships its later writes (UPDATE messages) and this side ships
the writes announced with `written()`. Shared-memory transport: the view IS the granter's
memory: its frames are mapped side by side with `mmap(MAP_FIXED)` into a region reserved for
the mapping (one mmap per run of consecutive frames), as Linux vmaps a multi-page ring; unmap
or the peer's death replaces them with private zero pages, so the granter's memory is no longer
reachable through old views (on hosts with pages larger than 4 KiB: a slice of the granter's
memory file, consecutive frames only, not revocable).

After `unmap()` or the peer's death the mapping is dead: `view` and `written` raise
(`PeerGone`). A mapping whose granter revoked a grant of it by force (`revoke`) dies the same
way but raises `GrantError(GNTST_general_error)`: the peer is still there, the access faulted.
A view obtained earlier stays safe to touch (it never points at freed memory) but is no
longer shared.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from xenpv.hv.errors import GrantError, HvError, PeerGone
from xenpv.hv.gntst import GNTST
from xenpv.hv.memory import barrier
from xenpv.hv.messages import UnmapReply, UnmapRequest, Whose

if TYPE_CHECKING:
    from xenpv.hv.link import Link

FRAME = 4096


class GrantMapping:
    """The `SharedBuffer` returned by `Domain.map_grants`."""

    __slots__ = (
        "_dead",
        "_fixed",
        "_link",
        "_release",
        "_revoked",
        "_sizes",
        "_view",
        "_writable",
        "bases",
        "domid",
        "grefs",
        "readonly",
    )

    def __init__(
        self,
        link: Link,
        grefs: Sequence[int],
        sizes: Sequence[int],
        view: memoryview,
        readonly: bool,
        fixed: FixedRegion | None = None,
        release: Callable[[GrantMapping], None] | None = None,
    ) -> None:
        self._link = link
        # Runs once when the mapping dies (unmapped or the peer gone): the mapper forgets it
        # and gives its maptrack entries back.
        self._release = release
        self.domid = link.peer
        self.grefs = list(grefs)
        self._sizes = list(sizes)
        bases = []
        offset = 0
        for size in sizes:
            bases.append(offset)
            offset += size
        self.bases = bases  # offset of each granule in the view
        self._writable = view  # the replica must follow the granter even when read-only here
        self._view = view.toreadonly() if readonly else view
        self.readonly = readonly
        self._fixed = fixed
        self._dead: str | None = None
        self._revoked = False

    @property
    def shared(self) -> bool:
        """True on the shared-memory transport (the view is the granter's memory)."""
        return self._link.shared is not None

    @property
    def dead(self) -> bool:
        return self._dead is not None

    @property
    def view(self) -> memoryview:
        if self._dead is not None:
            raise self._death()
        return self._view

    def _death(self) -> HvError:
        what = f"mapping of domain {self.domid} grants {self.grefs}: {self._dead}"
        if self._revoked:
            return GrantError(GNTST.GNTST_general_error, what)
        return PeerGone(what)

    def written(self, offset: int, length: int) -> None:
        if self._dead is not None:
            raise self._death()
        if self.readonly:
            raise GrantError(GNTST.GNTST_general_error, "write to a read-only mapping")
        if self._link.shared is not None:
            barrier()
            return
        if offset < 0 or offset + length > len(self._view):
            raise HvError(f"written({offset}, {length}) outside a {len(self._view)}-byte mapping")
        # Split the range over the granules it touches.
        end = offset + length
        for gref, base, size in zip(self.grefs, self.bases, self._sizes, strict=True):
            lo = max(offset, base)
            hi = min(end, base + size)
            if lo < hi:
                self._link.add_dirty(Whose.RECEIVER, gref, lo - base, hi - lo, self._view, lo)

    async def unmap(self) -> None:
        """GNTTABOP_unmap_grant_ref: returns once the granter dropped its pins, so that its
        `end_access` succeeds from then on (as after the synchronous hypercall in Xen)."""
        link = self._link
        if self._detach() and link.dead is None:
            with contextlib.suppress(PeerGone):
                await link.call(UnmapRequest(0, self.grefs, self.readonly), UnmapReply)

    def unmap_nowait(self) -> None:
        """Unmap without waiting for the granter (for synchronous clean-up paths)."""
        link = self._link
        if self._detach() and link.dead is None:
            link.send(UnmapRequest(0, self.grefs, self.readonly))

    def _detach(self) -> bool:
        if self._dead is not None:
            return False
        self._dead = "unmapped"
        self._released()
        if self._fixed is not None:
            self._fixed.retire()
        return True

    def revoke(self, reason: str) -> None:
        """The granter ended a grant of this mapping by force: it dies, and later accesses
        fault with a GNTST error."""
        if self._dead is None:
            self._revoked = True
            self.kill(reason)

    def kill(self, reason: str) -> None:
        """The peer is gone: the mapping dies (its memory stays readable, no longer shared)."""
        if self._dead is None:
            self._dead = reason
            self._released()
            if self._fixed is not None:
                self._fixed.retire()

    def _released(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)

    def apply(self, base: int, offset: int, data: bytes) -> bool:
        """Apply the granter's write to the replica (socket transport); False if the replica
        already held those bytes."""
        start = base + offset
        target = self._writable[start : start + len(data)]
        if target == data:
            return False
        # Writable underlying buffer even for a read-only mapping: the replica must follow.
        target[:] = data
        return True

    def __repr__(self) -> str:
        return f"GrantMapping(domid={self.domid}, grefs={self.grefs}, readonly={self.readonly})"


# -- mmap(MAP_FIXED) of scattered frames -------------------------------------------------------

_PROT_NONE = 0
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc = libc
    return _libc


class FixedRegion:
    """A reserved address range with granules of a peer's memory file mapped into it."""

    __slots__ = ("address", "size")

    def __init__(self, fd: int, runs: Sequence[tuple[int, int]], readonly: bool) -> None:
        """`runs`: (first frame, number of frames) of each granule, laid out in order."""
        if not self.supported():
            raise HvError(f"frame-granular mappings need 4 KiB host pages, not {mmap.PAGESIZE}")
        merged: list[tuple[int, int]] = []
        for frame, nframes in runs:  # one mmap per run of consecutive frames
            if merged and merged[-1][0] + merged[-1][1] == frame:
                merged[-1] = (merged[-1][0], merged[-1][1] + nframes)
            else:
                merged.append((frame, nframes))
        runs = merged
        libc = _c()
        self.size = sum(n for _f, n in runs) * FRAME
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        address = libc.mmap(None, self.size, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS, -1, 0)
        if address in (None, _MAP_FAILED):
            raise HvError(f"cannot reserve {self.size} bytes of address space")
        self.address: int = address
        offset = 0
        for frame, nframes in runs:
            got = libc.mmap(
                address + offset, nframes * FRAME, prot, _MAP_SHARED | _MAP_FIXED, fd, frame * FRAME
            )
            if got != address + offset:
                self.retire()
                raise HvError(f"mmap of frame {frame} failed (errno {ctypes.get_errno()})")
            offset += nframes * FRAME

    @staticmethod
    def supported() -> bool:
        return mmap.PAGESIZE == FRAME

    def view(self) -> memoryview:
        return memoryview((ctypes.c_char * self.size).from_address(self.address)).cast("B")

    def retire(self) -> None:
        """Replace the shared frames with private zero pages: old views stay safe to touch."""
        _c().mmap(
            self.address,
            self.size,
            mmap.PROT_READ | mmap.PROT_WRITE,
            _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED,
            -1,
            0,
        )
