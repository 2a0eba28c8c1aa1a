"""The mapper side of grants: mapping, unmapping and copying a peer's grants.

`map_grants` asks the granter to pin (a MAP request) and builds the `GrantMapping` from its
reply, in the receiving task and in link order, so the mapping exists before the granter's
next UPDATE. `grant_copy` sends one COPY request per remote domain on the socket transport and
none on shared memory (copyengine.py does the copying).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.hv.copyengine import (
    GNTST_VALUES,
    CopyGroup,
    CopyOp,
    apply_copy_reply,
    copy_runs_shared,
    copy_shared,
    ops_from_groups,
    wire_segments,
)
from xenpv.hv.errors import GrantError, HvError, PeerGone
from xenpv.hv.gntst import GNTST, OK
from xenpv.hv.link import Link
from xenpv.hv.mapping import FixedRegion, GrantMapping
from xenpv.hv.memory import SharedPeerMemory
from xenpv.hv.messages import CopyReply, CopyRequest, MapReply, MapRequest, UnmapRequest
from xenpv.hv.peergrants import PeerGrants
from xenpv.hv.peerlinks import PeerLinks

_GRANULE_FRAMES = (1, 2, 4, 8, 16)


def check_map_reply(reply: MapReply, count: int, shared: SharedPeerMemory | None) -> None:
    """Raise ValueError (or TypeError) unless `reply` is a well-formed answer to a MAP of
    `count` references on this transport."""
    statuses = reply.statuses
    if len(statuses) != count or any(s not in GNTST_VALUES for s in statuses):
        raise ValueError("bad statuses")
    if not all(s == OK for s in statuses):
        return
    details = reply.details
    if details is None or len(details) != count:
        raise ValueError("bad details")
    for detail in details:
        if shared is None:
            if not isinstance(detail, bytes) or len(detail) // 4096 not in _GRANULE_FRAMES:
                raise ValueError("bad replica contents")
            if len(detail) % 4096:
                raise ValueError("bad replica contents")
        else:
            frame, nframes = detail
            if (
                type(frame) is not int
                or nframes not in _GRANULE_FRAMES
                or not 0 <= frame <= shared.nr_frames - nframes
            ):
                raise ValueError("frames outside the granter's memory")


class GrantFaults(Protocol):
    """The fault seam of grant operations this domain performs on its peers' grants (a fault
    run's agent implements it; None, the default, costs one check per operation)."""

    def fail(self, op: str, remote: int, count: int) -> Sequence[int] | None:
        """For `op` ("map" or "copy") of `count` elements on `remote`'s grants: a GNTST
        status per element to report instead (OK: that element is left alone), or None."""
        ...


class GrantMapper:
    """One domain's mappings of, and copies to and from, its peers' grants."""

    def __init__(
        self,
        domid: int,
        links: PeerLinks,
        held: Callable[[Link], PeerGrants],
        max_maps: int,
    ) -> None:
        self.domid = domid
        self._links = links
        self._held = held
        self.max_maps = max_maps
        self.maps_in_use = 0  # maptrack entries
        self.faults: GrantFaults | None = None

    # -- mapping -------------------------------------------------------------------------------

    async def map_grants(
        self, remote: int, grefs: Sequence[int], *, readonly: bool = False
    ) -> GrantMapping:
        """Map `remote`'s grants side by side (GNTTABOP_map_grant_ref for each).

        All or nothing: a failing reference unmaps the others and raises GrantError with its
        status. Peer death while waiting raises PeerGone.
        """
        grefs = [int(g) for g in grefs]
        if not grefs:
            raise GrantError(GNTST.GNTST_general_error, "no grant references to map")
        if self.maps_in_use + len(grefs) > self.max_maps:
            raise GrantError(GNTST.GNTST_no_space, f"maptrack full ({self.max_maps} entries)")
        if self.faults is not None:
            injected = self.faults.fail("map", remote, len(grefs))
            for gref, status in zip(grefs, injected or (), strict=False):
                if status != OK:  # all or nothing, as a real failing element
                    raise GrantError(status, f"map of domain {remote} grant {gref} (injected)")
        link = await self._links.connect(remote)
        link.stats.map_calls += 1
        link.stats.map_segments += len(grefs)

        def on_reply(reply: MapReply) -> GrantMapping:
            # Runs in the receiving task: the mapping exists before the next UPDATE is applied.
            try:
                check_map_reply(reply, len(grefs), link.shared)
            except (ValueError, TypeError) as exc:
                raise link.violation(f"malformed map reply: {exc}") from None
            for gref, status in zip(grefs, reply.statuses, strict=True):
                if status != OK:
                    raise GrantError(status, f"map of domain {remote} grant {gref}")
            assert reply.details is not None  # check_map_reply: all okay, so details
            try:
                return self._make_mapping(link, grefs, reply.details, readonly)
            except BaseException:
                if link.dead is None:
                    link.send(UnmapRequest(0, grefs, readonly))
                raise

        def on_abandoned(reply: MapReply | None) -> None:
            self.maps_in_use -= len(grefs)
            statuses = reply.statuses if reply is not None else None
            if (
                isinstance(statuses, list)
                and statuses
                and all(s == OK for s in statuses)
                and link.dead is None
            ):
                link.send(UnmapRequest(0, grefs, readonly))

        self.maps_in_use += len(grefs)
        try:
            return await link.call_then(
                MapRequest(0, grefs, readonly), MapReply, on_reply, on_abandoned
            )
        except trio.Cancelled:
            raise  # on_abandoned gives the maptrack entries back when the reply comes
        except BaseException:
            self.maps_in_use -= len(grefs)
            raise

    def _make_mapping(
        self, link: Link, grefs: list[int], details: Sequence[Any], readonly: bool
    ) -> GrantMapping:
        if link.dead is not None:
            raise PeerGone(f"domain {link.peer}: {link.dead}")
        held = self._held(link)

        def release(mapping: GrantMapping) -> None:
            link.stats.unmap_calls += 1
            link.stats.unmap_segments += len(mapping.grefs)
            held.remove_mapping(mapping)
            self.maps_in_use -= len(mapping.grefs)

        shared = link.shared
        if shared is None:
            sizes = [len(data) for data in details]
            view = memoryview(bytearray(sum(sizes)))
            offset = 0
            for data in details:
                view[offset : offset + len(data)] = data
                offset += len(data)
            mapping = GrantMapping(link, grefs, sizes, view, readonly, None, release)
            held.add_mapping(mapping, replica=True)
            return mapping
        runs = [(int(frame), int(nframes)) for frame, nframes in details]
        sizes = [n * XEN_PAGE_SIZE for _f, n in runs]
        if FixedRegion.supported():
            # Map the granter's frames into a region of our own (one mmap per run of
            # consecutive frames): unmap and peer death can then revoke them, as Xen does.
            region = FixedRegion(shared.fd, runs, readonly)
            mapping = GrantMapping(link, grefs, sizes, region.view(), readonly, region, release)
            held.add_mapping(mapping, replica=False)
            return mapping
        consecutive = all(runs[i][0] + runs[i][1] == runs[i + 1][0] for i in range(len(runs) - 1))
        if not consecutive:
            raise HvError("scattered shared-memory mappings need 4 KiB host pages")
        # Fallback (host pages larger than 4 KiB): a slice of the peer's memory, which an
        # unmap cannot revoke from views already taken.
        start = runs[0][0] * XEN_PAGE_SIZE
        view = shared.view[start : start + sum(sizes)]
        mapping = GrantMapping(link, grefs, sizes, view, readonly, None, release)
        held.add_mapping(mapping, replica=False)
        return mapping

    # -- copying -------------------------------------------------------------------------------

    async def grant_copy(self, ops: Sequence[CopyOp]) -> list[int]:
        """GNTTABOP_copy: a GNTST status per segment; one link round trip per remote domain."""
        # One function layer and no comprehension on the common one-remote path: a 4 KiB
        # copy over shared memory costs about as much as a dozen Python calls.
        faults = self.faults
        results = [OK] * len(ops)
        if ops:
            remote = ops[0].remote
            for op in ops:
                if op.remote != remote:
                    await self._copy_with_each(ops, results)
                    break
            else:
                await self._copy_with(remote, ops, range(len(ops)), results)
            if faults is not None:
                return _inject(faults, remote, results)
        return results

    async def _copy_with_each(self, ops: Sequence[CopyOp], results: list[int]) -> None:
        """One concurrent round trip per remote domain of `ops`."""
        async with trio.open_nursery() as nursery:
            for remote in {op.remote for op in ops}:
                indexes = [i for i, op in enumerate(ops) if op.remote == remote]
                nursery.start_soon(self._copy_with, remote, ops, indexes, results)

    async def grant_copy_runs(self, remote: int, groups: Sequence[CopyGroup]) -> list[int]:
        """GNTTABOP_copy with one remote domain, segments grouped by local buffer.

        Each segment `(direction, gref, offset, length, at)` moves `length` bytes between
        offset `offset` of `remote`'s grant `gref` and `local[at : at + length]` of its group.
        A GNTST status per segment, flattened in order: the same as `grant_copy` with the
        equivalent CopyOps (which is what the socket transport does). On shared memory,
        segments that are back to back on both sides are copied as one run.
        """
        if self.faults is not None:
            return _inject(self.faults, remote, await self._grant_copy_runs(remote, groups))
        return await self._grant_copy_runs(remote, groups)

    async def _grant_copy_runs(self, remote: int, groups: Sequence[CopyGroup]) -> list[int]:
        link = await self._links.connect(remote)
        shared = link.shared
        if shared is not None:
            stats = link.stats  # the socket path counts in _copy_with
            stats.copy_calls += 1
            for _local, segments in groups:
                stats.copy_segments += len(segments)
                for segment in segments:
                    stats.copy_bytes += segment[3]  # (direction, gref, offset, length, at)
            statuses = copy_runs_shared(shared, self.domid, groups)
            if link.dead is not None:
                raise PeerGone(f"domain {remote}: {link.dead}")
            return statuses
        results, ops, indexes = ops_from_groups(remote, groups)
        copied = [OK] * len(ops)
        await self._copy_with(remote, ops, range(len(ops)), copied)
        for index, status in zip(indexes, copied, strict=True):
            results[index] = status
        return results

    async def _copy_with(
        self, remote: int, ops: Sequence[CopyOp], indexes: Sequence[int], results: list[int]
    ) -> None:
        link = await self._links.connect(remote)
        stats = link.stats
        stats.copy_calls += 1
        stats.copy_segments += len(indexes)
        for index in indexes:
            stats.copy_bytes += ops[index].length
        shared = link.shared
        if shared is not None:
            copy_shared(shared, self.domid, ops, indexes, results)
            if link.dead is not None:
                raise PeerGone(f"domain {remote}: {link.dead}")
            return
        wire, sent = wire_segments(ops, indexes, results)
        if not wire:
            return
        reply = await link.call(CopyRequest(0, wire), CopyReply)
        try:
            apply_copy_reply(reply, ops, sent, results)
        except (ValueError, TypeError) as exc:
            raise link.violation(f"malformed copy reply: {exc}") from None


def _inject(faults: GrantFaults, remote: int, statuses: list[int]) -> list[int]:
    """A copy was done; report the injected failures instead of its statuses (a failed
    element may have been copied, as after a real error the caller cannot know)."""
    injected = faults.fail("copy", remote, len(statuses))
    if injected is None:
        return statuses
    return [s if i == OK else i for s, i in zip(statuses, injected, strict=False)] + statuses[
        len(injected) :
    ]
