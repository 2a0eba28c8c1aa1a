"""One blkif ring (one queue) of a connected vbd: the trio task that serves it.

The loop is Linux's `xen_blkif_schedule` / `__do_block_io_op`: wait for an event, take every
request up to `req_prod` (each copied out of the ring once, then validated by `RequestCore`),
re-arm with RING_FINAL_CHECK_FOR_REQUESTS, and sleep only when that finds nothing. A READ or
WRITE that needs no wait (persistent grants all cached, a disk that completes it at once:
`ImmediateStorage`) is served inside the loop, its answer pushed with the others of the same
pass; other requests run concurrently, each in its own task (the ring size bounds how many),
and respond as they complete, so responses may come back out of order, as from Linux
blkback. A WRITE_BARRIER first drains the requests in flight and the next requests wait for
it (Linux `xen_blk_drain_io`).

Data moves in one of two ways, per segment:
- grant copy (the default): one `grant_copy` per request, covering all its segments, to or
  from a bounce buffer handed to the disk as one scatter/gather list;
- persistent grants (`PersistentGrants`): the disk reads into / writes from the mapped guest
  page directly.
A write is acknowledged only once the disk call returned (and for FLUSH / BARRIER once
fdatasync returned); a read once the data was copied into the guest's pages.

Frontend faults never escape: bad requests get error responses; a bogus producer index
(`RingError`) stops this ring and calls `on_broken`, which disconnects the device; a dying
frontend (PeerGone / EventChannelClosed) just ends the loop.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from backends.blkback.persistent import PersistentGrants
from backends.blkback.request import (
    Decoded,
    IoKind,
    IoRequest,
    NeedIndirect,
    Rejected,
    RequestCore,
)
from backends.storage import Storage, StorageError, StorageErrorKind
from xenpv.abi.blkif import (
    BLKIF_OP_READ,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
)
from xenpv.abi.errors import AbiError, RingError
from xenpv.abi.ring import BackRing
from xenpv.hv import (
    CopyDirection,
    CopyOp,
    Domain,
    EventChannel,
    EventChannelClosed,
    GrantError,
    GrantMapping,
    HvError,
    PeerGone,
)
from xenpv.metrics.counters import BlkbackStats

log = structlog.get_logger()

_OK = 0
_YIELD_EVERY = 32  # requests taken between checkpoints (Linux: cond_resched per request)


class QueueWorker:
    """Serves one ring until stopped, broken, or the frontend goes away."""

    def __init__(
        self,
        *,
        dom: Domain,
        remote: int,
        index: int,
        ring: BackRing,
        evtchn: EventChannel,
        core: RequestCore,
        storage: Storage,
        persistent: PersistentGrants | None,
        on_broken: Callable[[str], None],
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.dom = dom
        self.remote = remote
        self.index = index
        self.ring = ring
        self.evtchn = evtchn
        self.core = core
        self.storage = storage
        self.persistent = persistent
        self.on_broken = on_broken
        self.on_gone = on_gone  # the frontend's port closed or its link died
        # The disk's in-task calls, when it has them (`ImmediateStorage`).
        self._read_now: Callable[[int, list[memoryview]], bool] | None = getattr(
            storage, "readinto_now", None
        )
        self._write_now: Callable[[int, list[memoryview]], bool] | None = getattr(
            storage, "write_now", None
        )
        self.inflight = 0
        self.done = trio.Event()
        self.stats = {"requests": 0, "errors": 0}
        self.counters = BlkbackStats()  # the device swaps in its registered record
        self._idle = trio.lowlevel.ParkingLot()
        self._dispatch_scope = trio.CancelScope()
        self._requests_scope: trio.CancelScope | None = None
        self._log = log.bind(remote=remote, queue=index)

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as requests:
                self._requests_scope = requests.cancel_scope
                with self._dispatch_scope:
                    try:
                        await self._dispatch(requests)
                    except RingError as exc:
                        self._log.warning("bogus ring requests: halting ring", reason=str(exc))
                        self.on_broken(str(exc))
                    except HvError as exc:  # the frontend closed its port or died
                        self._log.info("frontend gone", reason=str(exc))
                        if self.on_gone is not None:
                            self.on_gone(str(exc))
                    except Exception as exc:  # a bug: this device goes, the backend stays
                        self._log.exception("ring loop failed")
                        self.on_broken(f"internal error: {exc!r}")
                # leaving the nursery waits for the requests in flight
        finally:
            self.done.set()

    def stop(self) -> None:
        """Stop taking requests; those in flight finish (see `abort`)."""
        self._dispatch_scope.cancel()

    def abort(self) -> None:
        """Cancel the requests in flight too (their frontend will not see responses)."""
        self._dispatch_scope.cancel()
        if self._requests_scope is not None:
            self._requests_scope.cancel()

    # -- the ring loop --------------------------------------------------------------------------

    async def _dispatch(self, requests: trio.Nursery) -> None:
        while True:
            await self._process(requests)
            await self.evtchn.wait()

    async def _process(self, requests: trio.Nursery) -> None:
        ring, core = self.ring, self.core
        taken = 0
        while True:
            while (data := ring.take_request()) is not None:
                decoded = core.decode(data)
                self.stats["requests"] += 1
                _count(self.counters, decoded)
                if isinstance(decoded, Rejected):
                    self._reject(decoded, push=False)
                elif isinstance(decoded, IoRequest) and decoded.kind is IoKind.BARRIER:
                    self._push()
                    await self._drain()
                    self._start(requests, decoded)
                    await self._drain()
                elif isinstance(decoded, NeedIndirect):
                    self._start_indirect(requests, decoded)
                elif not self._complete_now(decoded):
                    self._start(requests, decoded)
                taken += 1
                if taken % _YIELD_EVERY == 0:
                    self._push()
                    await trio.lowlevel.checkpoint()
            # Answers given in this pass go out together: one push, at most one notify.
            self._push()
            if not ring.final_check_for_requests():
                return

    def _complete_now(self, request: IoRequest) -> bool:
        """Serve a READ or WRITE inside the ring loop when nothing has to wait: every
        segment is a cached persistent grant and the disk completes the call at once (a
        page-cache hit, an inline write; `ImmediateStorage`). Starting a task per request
        costs more than such a request itself. The answer is put on the ring, unpushed
        (`_process` pushes once per pass). False: not served, nothing answered."""
        kind = request.kind
        persistent = self.persistent
        if persistent is None or (kind is not IoKind.READ and kind is not IoKind.WRITE):
            return False
        now = self._read_now if kind is IoKind.READ else self._write_now
        if now is None:
            return False
        try:
            views = persistent.views(request.segments)
            if views is None:
                return False
            buffers, mapped = views
            if not now(request.offset, buffers):
                return False
            if kind is IoKind.READ:
                _announce(mapped)
            status = int(BLKIF_RSP_OKAY)
        except StorageError as exc:
            status = self._storage_status(request, exc)
        except (PeerGone, EventChannelClosed) as exc:  # a mapping died with the frontend
            self._log.info("request abandoned", reason=str(exc))
            return True
        except GrantError as exc:  # e.g. a grant revoked under its mapping
            self._log.warning("request failed: grant access faulted", error=str(exc))
            status = int(BLKIF_RSP_ERROR)
        except Exception:  # as in `_serve`: never let one request take the backend down
            self._log.exception("request failed unexpectedly")
            status = int(BLKIF_RSP_ERROR)
        if status != BLKIF_RSP_OKAY:
            self.stats["errors"] += 1
        self._respond(request.id, request.operation, status, push=False)
        return True

    def _start_indirect(self, requests: trio.Nursery, work: NeedIndirect) -> None:
        """An INDIRECT request whose indirect pages are cached persistent grants is decoded
        here and, like any request, served in the loop when it can be; else in a task."""
        try:
            decoded = self._indirect_mapped(work)
        except (PeerGone, EventChannelClosed) as exc:  # a mapping died with the frontend
            self._log.info("request abandoned", reason=str(exc))
            return
        if decoded is None:
            self._start(requests, work)
        elif isinstance(decoded, Rejected):
            self._reject(decoded, push=False)
        elif not self._complete_now(decoded):
            self._start(requests, decoded)

    def _indirect_mapped(self, work: NeedIndirect) -> IoRequest | Rejected | None:
        """The plan of an INDIRECT request read through persistent mappings of its indirect
        pages (each copied out once, then decoded), or None if one is not cached."""
        persistent = self.persistent
        if persistent is None:
            return None
        request = work.request
        granule = self.core.limits.granule
        pages = []
        for gref in request.indirect_grefs:
            entry = persistent.lookup(gref)
            if entry is None:
                return None
            mapping, base = entry
            pages.append(bytes(mapping.view[base : base + granule]))
        decoded = self.core.finish_indirect(request, pages)
        if isinstance(decoded, NeedIndirect):  # cannot happen: indirect pages hold segments
            return Rejected(request.id, request.indirect_op, BLKIF_RSP_ERROR, "nested indirect")
        return decoded

    def _push(self) -> None:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY for the answers put so far."""
        try:
            if self.ring.push_responses():
                self.evtchn.notify()
        except (RingError, HvError) as exc:  # the ring broke or the frontend is gone
            self._log.debug("responses dropped", reason=str(exc))

    def _start(self, requests: trio.Nursery, work: IoRequest | NeedIndirect) -> None:
        self.inflight += 1
        requests.start_soon(self._serve, work)

    async def _drain(self) -> None:
        while self.inflight:
            await self._idle.park()

    # -- one request ----------------------------------------------------------------------------

    async def _serve(self, work: IoRequest | NeedIndirect) -> None:
        try:
            request: IoRequest | Rejected
            if isinstance(work, NeedIndirect):
                request = await self._indirect(work)
            else:
                request = work
            if isinstance(request, Rejected):
                self._reject(request)
                return
            status = await self._execute(request)
            if status != BLKIF_RSP_OKAY:
                self.stats["errors"] += 1
            self._respond(request.id, request.operation, status)
        except (PeerGone, EventChannelClosed) as exc:  # the frontend died: nobody to answer
            self._log.info("request abandoned", reason=str(exc))
        except Exception as exc:
            # Never let one request take the backend down; the frontend gets an error.
            if isinstance(exc, GrantError):  # e.g. a grant revoked under its mapping
                self._log.warning("request failed: grant access faulted", error=str(exc))
            else:
                self._log.exception("request failed unexpectedly")
            if isinstance(work, IoRequest):
                self._respond(work.id, work.operation, BLKIF_RSP_ERROR)
            else:
                request_ = work.request
                self._respond(request_.id, request_.indirect_op, BLKIF_RSP_ERROR)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.unpark_all()

    def _reject(self, rejected: Rejected, *, push: bool = True) -> None:
        self.stats["errors"] += 1
        self._log.debug("request rejected", id=rejected.id, reason=rejected.reason)
        self._respond(rejected.id, rejected.operation, rejected.status, push=push)

    def _respond(self, id: int, operation: int, status: int, *, push: bool = True) -> None:
        """make_response: put, push, notify if the frontend asked to be notified (the ring
        loop puts without pushing and pushes once per pass)."""
        if status != BLKIF_RSP_OKAY:
            self.counters.errors += 1
        try:
            self.ring.put_response(self.core.response(id, operation, status))
            if push and self.ring.push_responses():
                self.evtchn.notify()
        except (RingError, HvError) as exc:  # the ring broke or the frontend is gone
            self._log.debug("response dropped", id=id, reason=str(exc))
        except AbiError as exc:  # RingUsageError: a local bug, never worth a crash
            self._log.warning("response refused", id=id, reason=str(exc))

    async def _indirect(self, work: NeedIndirect) -> IoRequest | Rejected:
        request = work.request
        if self.persistent is not None:
            # Indirect pages are persistent grants too, as in Linux (xen_blkbk_parse_indirect
            # maps them through the same cache); those that cannot be mapped are copied.
            await self.persistent.map_missing(request.indirect_grefs)
            mapped = self._indirect_mapped(work)
            if mapped is not None:
                return mapped
        granule = self.core.limits.granule
        pages = [bytearray(granule) for _ in request.indirect_grefs]
        ops = [
            CopyOp(CopyDirection.FROM_REMOTE, self.remote, gref, 0, granule, memoryview(page))
            for gref, page in zip(request.indirect_grefs, pages, strict=True)
        ]
        statuses = await self.dom.grant_copy(ops)
        if any(s != _OK for s in statuses):
            return Rejected(
                request.id,
                request.indirect_op,
                BLKIF_RSP_ERROR,
                f"indirect pages {request.indirect_grefs}: grant statuses {statuses}",
            )
        decoded = self.core.finish_indirect(request, [bytes(p) for p in pages])
        if isinstance(decoded, NeedIndirect):  # cannot happen: indirect pages hold segments
            return Rejected(request.id, request.indirect_op, BLKIF_RSP_ERROR, "nested indirect")
        return decoded

    async def _execute(self, request: IoRequest) -> int:
        storage = self.storage
        try:
            kind = request.kind
            if kind is IoKind.READ:
                return await self._read(request)
            if kind is IoKind.DISCARD:
                if request.length:
                    await storage.discard(request.offset, request.length, secure=request.secure)
                return BLKIF_RSP_OKAY
            if request.segments:
                status = await self._write(request)
                if status != BLKIF_RSP_OKAY or kind is IoKind.WRITE:
                    return status
            await storage.flush()  # FLUSH_DISKCACHE / WRITE_BARRIER: durable before the answer
            return BLKIF_RSP_OKAY
        except StorageError as exc:
            return self._storage_status(request, exc)

    def _storage_status(self, request: IoRequest, exc: StorageError) -> int:
        self._log.info("storage error", id=request.id, error=str(exc))
        if exc.kind is StorageErrorKind.UNSUPPORTED:
            return BLKIF_RSP_EOPNOTSUPP
        return BLKIF_RSP_ERROR

    def _buffers(
        self, request: IoRequest, direction: CopyDirection
    ) -> tuple[list[memoryview], list[CopyOp], list[tuple[GrantMapping, int, int]]]:
        """The disk's scatter/gather list, the grant copies, and the mapped ranges touched."""
        persistent = self.persistent
        segments = request.segments
        if persistent is None or not len(persistent):
            bounce = memoryview(bytearray(request.length))
            ops = []
            at = 0
            for seg in segments:
                ops.append(
                    CopyOp(
                        direction,
                        self.remote,
                        seg.gref,
                        seg.offset,
                        seg.length,
                        bounce[at : at + seg.length],
                    )
                )
                at += seg.length
            return [bounce], ops, []
        ops = []

        def bounce_segment(gref: int, offset: int, length: int) -> memoryview:
            local = memoryview(bytearray(length))
            ops.append(CopyOp(direction, self.remote, gref, offset, length, local))
            return local

        found = persistent.views(segments, bounce_segment)
        assert found is not None  # with `missing`, every segment gets a buffer
        buffers, mapped = found
        return buffers, ops, mapped

    async def _read(self, request: IoRequest) -> int:
        if self.persistent is not None:
            await self.persistent.map_missing(seg.gref for seg in request.segments)
        buffers, ops, mapped = self._buffers(request, CopyDirection.TO_REMOTE)
        await self.storage.readinto(request.offset, buffers)
        _announce(mapped)
        if ops:
            statuses = await self.dom.grant_copy(ops)
            if any(s != _OK for s in statuses):
                self._log.debug("grant copy failed", id=request.id, statuses=statuses)
                return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    async def _write(self, request: IoRequest) -> int:
        if self.persistent is not None:
            await self.persistent.map_missing(seg.gref for seg in request.segments)
        buffers, ops, _mapped = self._buffers(request, CopyDirection.FROM_REMOTE)
        if ops:
            statuses = await self.dom.grant_copy(ops)
            if any(s != _OK for s in statuses):
                self._log.debug("grant copy failed", id=request.id, statuses=statuses)
                return BLKIF_RSP_ERROR
        await self.storage.write(request.offset, buffers)
        return BLKIF_RSP_OKAY


def _count(counters: BlkbackStats, decoded: Decoded) -> None:
    """Count a decoded request in blkback's statistics (docs/metrics.md)."""
    if type(decoded) is IoRequest:
        kind = decoded.kind
        if kind is IoKind.READ:
            counters.rd_req += 1
            counters.rd_sect += decoded.length >> 9
            counters.segments += len(decoded.segments)
        elif kind is IoKind.WRITE:
            counters.wr_req += 1
            counters.wr_sect += decoded.length >> 9
            counters.segments += len(decoded.segments)
        elif kind is IoKind.DISCARD:
            counters.ds_req += 1
        else:  # FLUSH, BARRIER (with data: its sectors are written too)
            counters.f_req += 1
            counters.wr_sect += decoded.length >> 9
            counters.segments += len(decoded.segments)
    elif type(decoded) is NeedIndirect:
        request = decoded.request
        counters.indirect_req += 1
        counters.indirect_pages += len(request.indirect_grefs)
        counters.segments += request.nr_segments
        if request.indirect_op == BLKIF_OP_READ:
            counters.rd_req += 1
        else:
            counters.wr_req += 1


def _announce(mapped: list[tuple[GrantMapping, int, int]]) -> None:
    """`written()` for the mapped ranges a read filled, adjacent ranges of one mapping merged
    (a mapping splits each call over all its grants, so one call per run, not per page)."""
    run: tuple[GrantMapping, int, int] | None = None
    for mapping, start, length in mapped:
        if run is not None and run[0] is mapping and run[1] + run[2] == start:
            run = (mapping, run[1], run[2] + length)
            continue
        if run is not None:
            run[0].written(run[1], run[2])
        run = (mapping, start, length)
    if run is not None:
        run[0].written(run[1], run[2])
