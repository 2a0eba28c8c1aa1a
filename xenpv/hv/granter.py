"""The granter side of grants: serving a peer's map, unmap, copy and replica writes against
this domain's grant table and memory.

Each handler runs in the link's receiving task, in link order, and answers on the link; the
peer's pins are kept in its `PeerGrants`. A pin sets the entry's GTF_reading/GTF_writing as
Xen does (grant.py); on the socket transport, a pinned granule's frames are watched so that
this domain's writes to them reach the peer's replica (memory.py, the coherence rule).
"""

from __future__ import annotations

from typing import Any

from xenpv.hv.gntst import BAD_COPY, OK
from xenpv.hv.grant import GrantTable
from xenpv.hv.link import Link
from xenpv.hv.memory import DomainMemory
from xenpv.hv.messages import (
    CopyReply,
    CopyRequest,
    MapReply,
    MapRequest,
    ProtocolViolation,
    UnmapReply,
    UnmapRequest,
)
from xenpv.hv.peergrants import PeerGrants


class Granter:
    """Serves peers' grant operations on one domain's grant table and memory."""

    __slots__ = ("grants", "memory")

    def __init__(self, grants: GrantTable, memory: DomainMemory) -> None:
        self.grants = grants
        self.memory = memory

    def on_map(self, link: Link, held: PeerGrants, request: MapRequest) -> None:
        # Each reference gets its own status, as in a GNTTABOP_map_grant_ref batch; the
        # mapping is all or nothing, so on any failure the successful pins are undone.
        readonly = bool(request.readonly)
        grefs = [int(gref) for gref in request.grefs]
        statuses: list[int] = []
        details: list[Any] = []
        pinned: list[int] = []
        for gref in grefs:
            status, frame, nframes = self.grants.pin(gref, link.peer, readonly)
            statuses.append(status)
            if status != OK:
                continue
            pinned.append(gref)
            if link.shared is not None:
                details.append([frame, nframes])
            else:
                details.append(bytes(self.memory.frame_view(frame, nframes)))
        if len(pinned) != len(grefs):
            for gref in pinned:
                self.grants.unpin(gref, readonly)
            link.reply(MapReply(request.req, statuses, None))
            return
        for gref in pinned:
            pins = held.pins.setdefault(gref, [0, 0])
            if pins == [0, 0] and link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.watch(entry.frame, 1 << entry.order, link, gref)
            pins[0 if readonly else 1] += 1
        link.reply(MapReply(request.req, statuses, details))

    def on_unmap(self, link: Link, held: PeerGrants, request: UnmapRequest) -> None:
        readonly = bool(request.readonly)
        for gref in request.grefs:
            self._unpin(link, held, int(gref), readonly)
        if request.req:
            link.reply(UnmapReply(request.req))

    def _unpin(self, link: Link, held: PeerGrants, gref: int, readonly: bool) -> None:
        pins = held.pins.get(gref)
        index = 0 if readonly else 1
        if pins is None or pins[index] == 0:
            return  # unknown or duplicate unmap: ignore, as Xen ignores a stale handle
        pins[index] -= 1
        self.grants.unpin(gref, readonly)
        if pins == [0, 0]:
            del held.pins[gref]
            if link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.unwatch(entry.frame, 1 << entry.order, link, gref)

    def on_copy(self, link: Link, request: CopyRequest) -> None:
        statuses: list[int] = []
        datas: list[bytes | None] = []
        memory = self.memory
        check = self.grants.check
        peer = link.peer
        for to_granter, gref, offset, length, data in request.segments:
            status, frame, nframes = check(int(gref), peer, bool(to_granter))
            if status == OK and (
                offset < 0
                or length < 0
                or offset + length > nframes << 12
                or (to_granter and (not isinstance(data, bytes) or len(data) != length))
            ):
                status = BAD_COPY
            statuses.append(status)
            if status != OK:
                datas.append(None)
                continue
            start = (frame << 12) + offset
            if to_granter:
                memory.view[start : start + length] = data  # type: ignore[assignment]  # bytes: checked
                memory.written(start, length, exclude=link)
                datas.append(None)
            else:
                datas.append(bytes(memory.view[start : start + length]))
        link.reply(CopyReply(request.req, statuses, datas))

    def on_mapper_write(
        self, link: Link, held: PeerGrants, gref: int, offset: int, data: bytes
    ) -> bool:
        """A replica write from the peer to our grant `gref` (an UPDATE entry): the peer must
        hold a writable pin on it, and the bytes must lie inside the granule. False if our
        memory already held those bytes."""
        pins = held.pins.get(gref)
        if pins is None or pins[1] == 0:
            raise ProtocolViolation(f"update of grant {gref} not mapped writable")
        entry = self.grants.entry(gref)
        if offset < 0 or offset + len(data) > (1 << entry.order) << 12:
            raise ProtocolViolation(f"update outside grant {gref}")
        start = (entry.frame << 12) + offset
        memory = self.memory
        if memory.view[start : start + len(data)] == data:
            return False  # a rewrite of what we hold: nothing new for anyone
        memory.view[start : start + len(data)] = data
        memory.written(start, len(data), exclude=link)
        return True

    def forget_pins(self, link: Link, held: PeerGrants, gref: int) -> bool:
        """`gref` was revoked by force: the peer's pins on it are gone (the table's were
        cleared by `GrantTable.revoke`). True if the peer held any."""
        if held.pins.pop(gref, None) is None:
            return False
        if link.shared is None:
            entry = self.grants.entry(gref)
            self.memory.unwatch(entry.frame, 1 << entry.order, link, gref)
        return True

    def drop_pins(self, link: Link, held: PeerGrants) -> None:
        """The peer is gone: every pin it held on our grants goes, so end_access succeeds."""
        for gref, (reads, writes) in list(held.pins.items()):
            for _ in range(reads):
                self.grants.unpin(gref, True)
            for _ in range(writes):
                self.grants.unpin(gref, False)
            if link.shared is None:
                entry = self.grants.entry(gref)
                self.memory.unwatch(entry.frame, 1 << entry.order, link, gref)
        held.pins.clear()
