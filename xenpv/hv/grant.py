"""The grant table of one domain (v1 semantics), sans-IO.

The table is an array of `struct grant_entry_v1` (flags u16, domid u16, frame u32, little
endian) living in the domain's memory file, exactly as Xen shares the grant table frames
between a guest and the hypervisor. On the shared-memory transport a peer reads the entries
directly to validate a grant copy; on the socket transport only the granting domain reads them.

Status codes follow Xen 4.17 `common/grant_table.c`: a reference beyond the table is
`GNTST_bad_gntref`; an entry that is not `GTF_permit_access` for the caller (never granted,
ended, granted to another domain) or a write pin of a `GTF_readonly` entry is
`GNTST_general_error` (`_set_status_v1`: "Bad flags or dom", "Attempt to write-pin a r/o grant
entry"); a copy outside the granule is `GNTST_bad_copy_arg`; a full maptrack is
`GNTST_no_space`. Mapping sets `GTF_reading` (and `GTF_writing` unless read-only) in the
entry while any pin is held, which is what makes `end_access` refuse (Linux
`gnttab_end_foreign_access_ref` checks those two bits).

`revoke` is what a hostile granter does that Xen does not let a guest do: end a grant its
peer still maps (Xen leaves a mapped page mapped until the mapper unmaps it; Linux defers
the free). The entry becomes invalid at once (new maps and copies of it fail with
GNTST_general_error), the peer's pins are forgotten, and the domain tells the mapper, whose
mappings of it die (`Domain.revoke_access`). The owner's later `end_access` of a revoked
reference succeeds; `restore` grants it again under the same reference (a fault's heal).
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass

from xenpv.hv.errors import GrantError
from xenpv.hv.gntst import (
    BAD_GNTREF,
    DOMID_FIRST_RESERVED,
    GENERAL,
    GNTST,
    GNTTAB_NR_RESERVED_ENTRIES,
    MAX_GRANULE_ORDER,
    OK,
    PERMIT,
    READING,
    READONLY,
    TYPE_MASK,
    WRITING,
    XENPV_GTF_ORDER_MASK,
    XENPV_GTF_ORDER_SHIFT,
)
from xenpv.metrics.counters import GrantTableStats

GRANT_ENTRY = struct.Struct("<HHI")  # struct grant_entry_v1
GRANT_ENTRY_SIZE = GRANT_ENTRY.size


@dataclass(frozen=True, slots=True)
class GrantEntry:
    """A decoded grant_entry_v1."""

    flags: int
    domid: int
    frame: int

    @property
    def order(self) -> int:
        return (self.flags & XENPV_GTF_ORDER_MASK) >> XENPV_GTF_ORDER_SHIFT


def check_entry(
    table: memoryview, nr_entries: int, gref: int, requester: int, write: bool
) -> tuple[int, int, int]:
    """Validate `requester`'s access to `gref`: (GNTST status, first frame, number of frames).

    Pure: reads one entry. Used by the granter (socket transport) and by a peer reading the
    granter's table through shared memory.
    """
    if not 0 <= gref < nr_entries:
        return BAD_GNTREF, 0, 0
    flags, domid, frame = GRANT_ENTRY.unpack_from(table, gref * GRANT_ENTRY_SIZE)
    if (flags & TYPE_MASK) != PERMIT or domid != requester:
        return GENERAL, 0, 0
    if write and flags & READONLY:
        return GENERAL, 0, 0
    return OK, frame, 1 << ((flags & XENPV_GTF_ORDER_MASK) >> XENPV_GTF_ORDER_SHIFT)


class GrantTable:
    """The granting side: issue and end grants, pin entries while peers map them."""

    __slots__ = (
        "_active",
        "_free",
        "_nr_frames",
        "_revoked",
        "_table",
        "domid",
        "nr_entries",
        "stats",
    )

    def __init__(self, domid: int, table: memoryview, nr_entries: int, nr_frames: int) -> None:
        """`table` views `nr_entries` grant entries; grants may name frames `< nr_frames`."""
        self.domid = domid
        self._table = table
        self.nr_entries = nr_entries
        self._nr_frames = nr_frames
        # FIFO reuse: a just-ended reference is reused as late as possible, so a peer that
        # keeps using a stale reference fails instead of silently reaching a new page.
        self._free = collections.deque(range(GNTTAB_NR_RESERVED_ENTRIES, nr_entries))
        self._active: dict[int, list[int]] = {}  # gref -> [read pins, write pins]
        self.stats = GrantTableStats()  # the owning Domain swaps in its registered record
        self._revoked: dict[int, int] = {}  # gref -> its flags before a forced revoke

    def grant_access(
        self, remote: int, frame: int, *, readonly: bool = False, order: int = 0
    ) -> int:
        """Let domain `remote` map or copy `2**order` frames from `frame`; returns the gref.

        Raises GrantError(GNTST_no_space) when the table is full (Linux: -ENOSPC).
        """
        if not 0 <= remote < DOMID_FIRST_RESERVED or remote == self.domid:
            raise GrantError(GNTST.GNTST_bad_domain, f"cannot grant to domain {remote}")
        if not 0 <= order <= MAX_GRANULE_ORDER:
            raise GrantError(GNTST.GNTST_general_error, f"granule order {order} not in 0..4")
        nframes = 1 << order
        if not 0 <= frame <= self._nr_frames - nframes or frame % nframes:
            raise GrantError(GNTST.GNTST_bad_page, f"frame {frame} (order {order}) not owned")
        if not self._free:
            raise GrantError(GNTST.GNTST_no_space, f"all {self.nr_entries} grant entries in use")
        gref = self._free.popleft()
        flags = PERMIT | (READONLY if readonly else 0) | (order << XENPV_GTF_ORDER_SHIFT)
        offset = gref * GRANT_ENTRY_SIZE
        # domid and frame first, flags last: the entry becomes valid atomically for readers.
        struct.pack_into("<HI", self._table, offset + 2, remote, frame)
        struct.pack_into("<H", self._table, offset, flags)
        self.stats.grants_issued += 1
        return gref

    def end_access(self, gref: int) -> None:
        """Revoke a grant. Refused with GNTST_eagain while a peer still maps it."""
        if self._revoked.pop(gref, None) is not None:  # its owner ends what was taken
            self._free.append(gref)
            return
        entry = self.entry(gref)
        if entry.flags & TYPE_MASK != PERMIT:
            raise GrantError(GNTST.GNTST_bad_gntref, f"grant {gref} is not in use")
        if entry.flags & (READING | WRITING):
            self.stats.end_refused += 1
            raise GrantError(GNTST.GNTST_eagain, f"grant {gref} is still mapped by the peer")
        struct.pack_into("<H", self._table, gref * GRANT_ENTRY_SIZE, 0)
        self._free.append(gref)
        self.stats.grants_ended += 1

    def revoke(self, gref: int) -> bool:
        """A hostile granter's forced end of a grant a peer maps (see the module docstring).
        False (nothing done) if the grant is not in use or not mapped."""
        entry = self.entry(gref)
        if entry.flags & TYPE_MASK != PERMIT or not entry.flags & (READING | WRITING):
            return False
        self._revoked[gref] = entry.flags & ~(READING | WRITING)
        self._active.pop(gref, None)
        struct.pack_into("<H", self._table, gref * GRANT_ENTRY_SIZE, 0)
        return True

    def restore(self, gref: int) -> None:
        """Grant again, under the same reference, what `revoke` took (unless its owner has
        ended it since)."""
        flags = self._revoked.pop(gref, None)
        if flags is not None:
            struct.pack_into("<H", self._table, gref * GRANT_ENTRY_SIZE, flags)

    @property
    def mapped(self) -> list[int]:
        """The grants some peer maps now (pinned)."""
        return sorted(self._active)

    @property
    def revoked(self) -> list[int]:
        return sorted(self._revoked)

    def entry(self, gref: int) -> GrantEntry:
        if not 0 <= gref < self.nr_entries:
            raise GrantError(GNTST.GNTST_bad_gntref, f"grant {gref} outside the table")
        return GrantEntry(*GRANT_ENTRY.unpack_from(self._table, gref * GRANT_ENTRY_SIZE))

    def in_use(self) -> int:
        return self.nr_entries - GNTTAB_NR_RESERVED_ENTRIES - len(self._free)

    def check(self, gref: int, requester: int, write: bool) -> tuple[int, int, int]:
        return check_entry(self._table, self.nr_entries, gref, requester, write)

    def pin(self, gref: int, requester: int, readonly: bool) -> tuple[int, int, int]:
        """Validate and pin for a mapping: sets GTF_reading / GTF_writing like Xen."""
        status, frame, nframes = self.check(gref, requester, not readonly)
        if status != OK:
            return status, frame, nframes
        pins = self._active.setdefault(gref, [0, 0])
        pins[0 if readonly else 1] += 1
        self._sync_flags(gref, pins)
        return status, frame, nframes

    def unpin(self, gref: int, readonly: bool) -> None:
        pins = self._active.get(gref)
        if pins is None:
            return
        index = 0 if readonly else 1
        if pins[index] > 0:
            pins[index] -= 1
        if pins == [0, 0]:
            del self._active[gref]
        self._sync_flags(gref, pins)

    def _sync_flags(self, gref: int, pins: list[int]) -> None:
        offset = gref * GRANT_ENTRY_SIZE
        (flags,) = struct.unpack_from("<H", self._table, offset)
        flags &= ~(READING | WRITING)
        if pins[0] or pins[1]:
            flags |= READING
        if pins[1]:
            flags |= WRITING
        struct.pack_into("<H", self._table, offset, flags)
