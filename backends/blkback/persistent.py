"""Persistent grants: a ring's cache of the frontend's data pages, mapped once and kept.

When both ends set `feature-persistent`, blkfront reuses a fixed pool of granted pages, so
the backend maps each grant the first time it sees it and keeps the mapping until the ring
disconnects (Linux: the per-ring `persistent_gnts` tree). Like Linux we cap the cache at
`xen_blkif_max_pgrants` (1056) mappings per ring; past the cap, or when a map fails (a bad or
read-only grant, maptrack full), the segment simply goes through grant copy, which reports
the grant's own status. Linux also purges least-recently-used entries in the background;
we keep every mapping until disconnect (the frontend's pool is bounded anyway).

Grants missing from the cache are mapped in one `map_grants` call per request (one link
round trip); that call maps them side by side, and the cache remembers each gref's offset
in it. Mappings are writable: blkif.h note 8 requires a persistent frontend to allow it.

The emulated maptrack is small (`Domain.max_maps`, 4096 by default, where Xen's default is
about half a million entries), so persistent grants of all devices of one backend domain
together may use at most half of it: the rest stays for rings (and netback), so that one
guest's grant pool can never stop another guest's device from connecting.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import structlog

from xenpv.hv import Domain, GrantMapping, HvError

log = structlog.get_logger()

# Persistent mappings held by blkback in each backend domain (see the module docstring).
_in_use: weakref.WeakKeyDictionary[Domain, int] = weakref.WeakKeyDictionary()


def domain_budget(dom: Domain) -> int:
    """How many more grants blkback may map persistently in `dom`."""
    return dom.max_maps // 2 - _in_use.get(dom, 0)


class PersistentGrants:
    """gref → (mapping, byte offset of that grant's page in the mapping), for one ring."""

    __slots__ = ("_dom", "_entries", "_granule", "_mappings", "_pending", "limit", "remote")

    def __init__(self, dom: Domain, remote: int, limit: int, granule: int) -> None:
        self._dom = dom
        self.remote = remote
        self.limit = limit
        self._granule = granule
        self._entries: dict[int, tuple[GrantMapping, int]] = {}
        self._mappings: list[GrantMapping] = []
        self._pending: set[int] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, gref: int) -> tuple[GrantMapping, int] | None:
        entry = self._entries.get(gref)
        if entry is not None and entry[0].dead:
            self._evict(gref)
            return None
        return entry

    def _evict(self, gref: int) -> None:
        """A cached mapping died under us (its grant revoked by the frontend): forget the
        gref, so that it is mapped or copied again (and fails, while it stays revoked)."""
        del self._entries[gref]
        _in_use[self._dom] = _in_use.get(self._dom, 0) - 1

    def views(
        self,
        segments: Iterable[tuple[int, int, int]],
        missing: Callable[[int, int, int], memoryview] | None = None,
    ) -> tuple[list[memoryview], list[tuple[GrantMapping, int, int]]] | None:
        """The disk's buffers for (gref, offset, length) segments: segments side by side in
        one mapping become one buffer (blkfront hands out its pool in a stable order, so a
        large request is a few iovecs), plus the mapped ranges, for `written()` after a read.
        A gref not cached makes it None, unless `missing(gref, offset, length)` gives a
        buffer to stand in for that segment (a bounce buffer to grant-copy)."""
        entries = self._entries
        buffers: list[memoryview] = []
        mapped: list[tuple[GrantMapping, int, int]] = []
        run: GrantMapping | None = None
        run_start = run_length = 0
        for gref, offset, length in segments:
            entry = entries.get(gref)
            if entry is not None and entry[0].dead:
                self._evict(gref)
                entry = None
            if entry is not None:
                mapping, base = entry
                start = base + offset
                if mapping is run and run_start + run_length == start:
                    run_length += length
                    continue
            elif missing is None:
                return None
            if run is not None:
                buffers.append(run.view[run_start : run_start + run_length])
                mapped.append((run, run_start, run_length))
                run = None
            if entry is None:
                buffers.append(missing(gref, offset, length))  # type: ignore[misc]
            else:
                run, run_start, run_length = mapping, start, length
        if run is not None:
            buffers.append(run.view[run_start : run_start + run_length])
            mapped.append((run, run_start, run_length))
        return buffers, mapped

    async def map_missing(self, grefs: Iterable[int]) -> None:
        """Map the grants not cached yet (up to the cap); failures leave them uncached."""
        entries, pending = self._entries, self._pending
        missing = list(dict.fromkeys(g for g in grefs if g not in entries and g not in pending))
        room = min(self.limit - len(self._entries) - len(self._pending), domain_budget(self._dom))
        missing = missing[: max(room, 0)]
        if not missing:
            return
        dom = self._dom
        self._pending.update(missing)
        _in_use[dom] = _in_use.get(dom, 0) + len(missing)
        try:
            mapping = await dom.map_grants(self.remote, missing)
        except HvError as exc:
            log.debug("persistent map failed", remote=self.remote, error=str(exc))
            _in_use[dom] -= len(missing)
            return
        except BaseException:
            _in_use[dom] -= len(missing)
            raise
        finally:
            self._pending.difference_update(missing)
        if len(mapping.view) != len(missing) * self._granule:
            # A grant of another size than the negotiated granule: don't cache it.
            _in_use[dom] -= len(missing)
            await mapping.unmap()
            return
        self._mappings.append(mapping)
        for i, gref in enumerate(missing):
            self._entries[gref] = (mapping, i * self._granule)

    async def release(self) -> None:
        """Unmap everything (once no request uses the cache any more)."""
        mappings, self._mappings = self._mappings, []
        self._entries.clear()
        _in_use[self._dom] = _in_use.get(self._dom, 0) - sum(len(m.grefs) for m in mappings)
        for mapping in mappings:
            await mapping.unmap()
