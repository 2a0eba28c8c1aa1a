"""`ring.*` faults: a hostile peer at one end of a block ring, on the ring's `RingTamper` seam.

The point is the OTHER end's defences (docs/faults.md, "ring"; docs/blk.md, "A hostile
peer"). The runner sends each kind to the end that misbehaves:

- a hostile **frontend** (the guest's agent, on `FrontRing.push_requests`):
  `prod-corrupt` publishes a `req_prod` `offset` past the requests it wrote (blkback must
  halt that ring, "bogus ring requests", and close the device; the guest reconnects);
  `segment-out-of-range` rewrites the first segment of a read/write about to be published
  to `first_sect > last_sect`, `sector-out-of-range` its start sector past any disk
  (blkback answers BLKIF_RSP_ERROR for that request only);
- a hostile **backend** (the backend's agent, on `BackRing.push_responses`):
  `cons-corrupt` publishes an `rsp_prod` `offset` past the responses it wrote (more
  responses than requests: the frontend must break the ring, not complete anything);
  `bad-id` answers with an id no request carried; `duplicate-id` answers one request twice
  in one push (the second response's id replaced, so another request is never answered;
  a push with one response is held once to get two); `stale-id` answers with the id of a
  request it answered earlier and that no request on the ring carries now (the oldest it
  remembers: blkfront reuses the newest free ids first). blkfront must treat each as a
  broken ring (Linux "response has incorrect id" / "references no pending request") and
  reconnect, re-issuing what was not answered: nothing completed twice, nothing acknowledged
  that the backend did not answer;
- `double-fetch` (XSA-155), modelled at the backend's read (`BackRing.take_request(s)`):
  right after blkback copied requests out of the shared page, their slots are rewritten
  (operation read/write swapped, sector moved, id changed) as a racing frontend would. A
  backend that copied each request once (RING_COPY_REQUEST) acts on the first values; one
  that read a field again would act on the rewritten ones (and the block checker sees it).

Only blkif rings of the fault's device are touched: the seam compares the device the running
task belongs to (`current_device`) with the target, as the event and grant seams do. Each
fault fires per its `count` / `probability` (`Hits`).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xenpv.abi.ring import SRING_HEADER_SIZE, BackRing, FrontRing, shared_indexes
from xenpv.faults.control import Hits, param
from xenpv.faults.schedule import ScheduledFault, stream

FRONT_KINDS = frozenset(
    {"ring.prod-corrupt", "ring.segment-out-of-range", "ring.sector-out-of-range"}
)
BACK_KINDS = frozenset(
    {"ring.cons-corrupt", "ring.bad-id", "ring.duplicate-id", "ring.stale-id", "ring.double-fetch"}
)
KINDS = FRONT_KINDS | BACK_KINDS

OP_READ, OP_WRITE = 0, 1
BAD_ID = 0xFFFF_FFFF_FFFF_FF00  # an id no blkfront hands out (ids are ring slots)
OUT_OF_RANGE_SECTOR = 1 << 60  # past the end of any disk
ANSWERED_KEPT = 64  # answered ids a stale-id fault remembers
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class _Blkif:
    """Offsets in a blkif request slot (the x86_32 ABI has no hole before `id`)."""

    id: int
    sector: int
    segment: int  # the first segment: gref u32, first_sect u8, last_sect u8

    @classmethod
    def of(cls, ring: FrontRing | BackRing) -> _Blkif | None:
        name = ring.layout.name
        if not name.startswith("blkif"):
            return None
        return cls(4, 12, 20) if "x86_32" in name else cls(8, 16, 24)


@dataclass
class _Active:
    hits: Hits
    device: str | None
    held: bool = False  # duplicate-id: a lone response held back once
    # prod/cons-corrupt: rings whose index was corrupted; every later push re-publishes the
    # bogus index (a hostile peer keeps it there), so the other end cannot miss it in a race
    # (the ring objects themselves, until the fault stops: an id() could be reused by the
    # ring of the next connection, which must be left alone once count is reached)
    corrupted: list[FrontRing | BackRing] = field(default_factory=list)

    def is_corrupted(self, ring: FrontRing | BackRing) -> bool:
        return any(r is ring for r in self.corrupted)


@dataclass
class HostileRings:
    """The `RingTamper` of one domain process: the active `ring.*` faults of its devices."""

    seed: int
    current_device: Callable[[], str | None] = lambda: None  # the device whose task runs
    active: dict[str, _Active] = field(default_factory=dict)
    answered: deque[int] = field(default_factory=lambda: deque(maxlen=ANSWERED_KEPT))

    def start(self, fault: ScheduledFault, device: str | None) -> None:
        if fault.kind in KINDS and fault.id not in self.active:
            self.active[fault.id] = _Active(
                Hits(fault, stream(self.seed, f"inject/{fault.id}")), device
            )

    def stop(self, fault_id: str) -> None:
        self.active.pop(fault_id, None)

    def _mine(self, kinds: frozenset[str]) -> list[_Active]:
        device = self.current_device()
        return [
            a
            for a in self.active.values()
            if a.hits.fault.kind in kinds and (a.device is None or a.device == device)
        ]

    # -- a hostile frontend -------------------------------------------------------------------

    def front_push(self, ring: FrontRing) -> bool | None:
        offsets = _Blkif.of(ring)
        if offsets is None:
            return None
        for act in self._mine(FRONT_KINDS):
            kind = act.hits.fault.kind
            if kind == "ring.prod-corrupt":
                if act.is_corrupted(ring) or act.hits.fires():
                    if not act.is_corrupted(ring):
                        act.corrupted.append(ring)
                    ring.corrupt_prod(int(param(act.hits.fault, "offset", 1000)))
                    return True  # notify: the backend must see the bogus index
                continue
            first, last = ring.published_requests(), ring.req_prod_pvt
            index = first
            while index != last:
                slot = ring.slot(index)
                if slot[0] in (OP_READ, OP_WRITE) and slot[1] >= 1 and act.hits.fires():
                    _rewrite_request(ring, index, offsets, kind)
                    break
                index = (index + 1) & 0xFFFFFFFF
        return None

    # -- a hostile backend --------------------------------------------------------------------

    def back_push(self, ring: BackRing) -> bool | None:
        if _Blkif.of(ring) is None:
            return None
        acts = self._mine(BACK_KINDS - {"ring.double-fetch"})
        if not acts:
            return None
        first, last = ring.published_responses(), ring.rsp_prod_pvt
        new = (last - first) & 0xFFFFFFFF
        verdict: bool | None = None
        for act in acts:
            kind = act.hits.fault.kind
            if kind == "ring.cons-corrupt":
                if act.is_corrupted(ring) or (new and act.hits.fires()):
                    if not act.is_corrupted(ring):
                        act.corrupted.append(ring)
                    ring.corrupt_rsp_prod(int(param(act.hits.fault, "offset", 1000)))
                    verdict = True
            elif kind == "ring.bad-id":
                if new and act.hits.fires():
                    _set_response_id(ring, first, BAD_ID)
            elif kind == "ring.duplicate-id":
                if new == 1 and not act.held and _may_fire(act):
                    act.held = True
                    return False  # hold the lone response: the next push has two
                if new >= 2 and act.hits.fires():
                    _set_response_id(ring, (first + 1) & 0xFFFFFFFF, _response_id(ring, first))
                act.held = False
            elif kind == "ring.stale-id":
                stale = self._stale_id(ring, first, last)
                if new and stale is not None and act.hits.fires():
                    _set_response_id(ring, first, stale)
        if any(a.hits.fault.kind == "ring.stale-id" for a in acts):
            index = first
            while index != last:
                self.answered.append(_response_id(ring, index))
                index = (index + 1) & 0xFFFFFFFF
        return verdict

    def _stale_id(self, ring: BackRing, first: int, last: int) -> int | None:
        """The oldest answered id that no request on the ring (published, not yet answered)
        and no response of this push carries."""
        offsets = _Blkif.of(ring)
        assert offsets is not None
        busy: set[int] = set()
        req_prod = shared_indexes(ring.buffer)[0]
        index = last
        while index != req_prod and len(busy) <= ring.nr_ents:
            busy.add(_U64.unpack_from(ring.slot(index), offsets.id)[0])
            index = (index + 1) & 0xFFFFFFFF
        index = first
        while index != last:
            busy.add(_response_id(ring, index))
            index = (index + 1) & 0xFFFFFFFF
        return next((i for i in self.answered if i not in busy), None)

    def back_taken(self, ring: BackRing, first: int, count: int) -> None:
        offsets = _Blkif.of(ring)
        if offsets is None:
            return
        for act in self._mine(frozenset({"ring.double-fetch"})):
            for index in range(first, first + count):
                index &= 0xFFFFFFFF
                if ring.slot(index)[0] in (OP_READ, OP_WRITE) and act.hits.fires():
                    _rewrite_request(ring, index, offsets, "ring.double-fetch")


def _may_fire(act: _Active) -> bool:
    f = act.hits.fault
    return f.count is None or act.hits.hits < f.count


def _rewrite_request(ring: FrontRing | BackRing, index: int, at: _Blkif, kind: str) -> None:
    """Rewrite the request in slot `index` in place, as a hostile frontend would."""
    slot = ring.slot(index)
    if kind == "ring.segment-out-of-range":
        slot[at.segment + 4] = 1  # first_sect
        slot[at.segment + 5] = 0  # last_sect < first_sect
    elif kind == "ring.sector-out-of-range":
        _U64.pack_into(slot, at.sector, OUT_OF_RANGE_SECTOR)
    elif kind == "ring.double-fetch":
        # After the backend's copy: a backend that reads the slot again acts on another
        # operation, another sector and another id. Not published: the rewrite happens in
        # the backend's view of the page, where a second fetch would read it.
        slot[0] = OP_WRITE if slot[0] == OP_READ else OP_READ
        sector = _U64.unpack_from(slot, at.sector)[0]
        _U64.pack_into(slot, at.sector, (sector + 8) & 0xFFFF_FFFF_FFFF_FFFF)
        _U64.pack_into(slot, at.id, BAD_ID)
        return
    ring.publish(*_slot_span(ring, index))


def _slot_span(ring: FrontRing | BackRing, index: int) -> tuple[int, int]:
    return SRING_HEADER_SIZE + (index & (ring.nr_ents - 1)) * ring.entry_size, ring.entry_size


def _response_id(ring: BackRing, index: int) -> int:
    value: int = _U64.unpack_from(ring.slot(index), 0)[0]
    return value


def _set_response_id(ring: BackRing, index: int, value: int) -> None:
    _U64.pack_into(ring.slot(index), 0, value)
    ring.publish(_slot_span(ring, index)[0], 8)
