"""The blkfront engine, sans-IO: I/Os in, ring requests out, responses in, completions out.

It owns everything Linux's `struct blkfront_info` / `blkfront_ring_info` hold between two
interrupts: the queue of I/Os not yet on a ring, a per-ring `shadow[]` table (request id =
shadow index, as in Linux), the grants of each request and the persistent-grant pool. It never
waits: the trio layer (device.py) calls `dispatch()` after `submit()`, `poll(q)` when queue `q`'s
event channel fires, and turns the completed I/Os it gets back into woken tasks.

Connections. `connect()` starts a connection on freshly initialised rings with what was
negotiated; `disconnect()` ends it (backend gone, closed, or broken): every I/O that has not
completed goes back to the pending queue, in submission order, with its per-connection state
dropped, and is re-split to the next connection's limits when it is re-issued (Linux
`blkif_recover`). Because an I/O completes only from a response of the connection it was
issued on, and its state is reset when that connection ends, nothing completes twice; because
an I/O leaves the engine only through a response, no acknowledged write is ever dropped.

Responses (Linux `blkif_interrupt`): an id outside the shadow table or naming a free slot is a
protocol error (`BlkfrontProtocolError`); the ring is unusable from then on. BLKIF_RSP_EOPNOTSUPP
to a flush or discard turns that feature off for the rest of the connection, as Linux does.

Grants. Without persistent grants, each I/O's data lives in guest pages allocated for it (its
"bio", data at `start` bytes into the first page) and each used grant frame is granted for the
request and revoked at completion. With persistent grants (negotiated), data is copied into
frames of a pool that stay granted for the whole connection, and out of them for reads (Linux
`blkif_setup_rw_req_grant` / `blkif_completion` with `info->bounce`). A grant the backend
still maps when it should not is kept aside (never reused, its page never freed) and retried.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from frontends.blkfront.errors import BlkfrontProtocolError
from frontends.blkfront.split import Chunk, Limits, Part, chunks, plan
from xenpv.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    SECTOR_SIZE,
    BlkifDiscardRequest,
    BlkifIndirectRequest,
    BlkifProtocol,
    BlkifRequest,
    BlkifSegment,
    encode_indirect_pages,
    indirect_pages,
)
from xenpv.abi.errors import AbiError
from xenpv.abi.ring import FrontRing
from xenpv.hv.errors import GrantError
from xenpv.hv.gntst import GNTST
from xenpv.hv.memory import OutOfMemory, Page
from xenpv.metrics.counters import BlkfrontStats

log = structlog.get_logger()

FLUSH_OPS = (int(BLKIF_OP_FLUSH_DISKCACHE), int(BLKIF_OP_WRITE_BARRIER))
_NO_DATA = Part(0, 0, 0, False)  # the one part of a flush or discard
# What every list of an `_Issued` starts as: empty, and immutable, so that a path that forgot
# to make its own list fails loudly instead of sharing one.
_NONE: Any = ()
_MIN_RUN = 4  # consecutive new I/Os sent to one ring, at least (see `dispatch`)
_RUN_CHUNKS = 4 * BLKIF_MAX_SEGMENTS_PER_REQUEST  # ... unless they carry more data
_SHAPES = 256  # I/O shapes (start in page, length, limits) whose split is cached
_DESCRIPTORS: dict[
    int, struct.Struct
] = {}  # n -> struct of n indirect segment descriptors, each as one uint64


class Memory(Protocol):
    """What the engine needs of the guest's memory (`xenpv.hv.DomainMemory`)."""

    page_size: int
    view: memoryview

    def alloc_pages(self, n: int) -> list[Page]: ...

    def free_pages(self, pages: Sequence[Page]) -> None: ...

    def written(self, offset: int, length: int, exclude: object = None) -> None: ...


class Grants(Protocol):
    """What the engine needs of the guest's grant table (`xenpv.hv.GrantTable`)."""

    def grant_access(
        self, remote: int, frame: int, *, readonly: bool = False, order: int = 0
    ) -> int: ...

    def end_access(self, gref: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Negotiated:
    """One connection's parameters, as the frontend read them from both ends' keys."""

    protocol: BlkifProtocol
    queues: int
    ring_page_order: int
    sectors: int  # capacity in 512-byte units (the `sectors` key)
    sector_size: int = SECTOR_SIZE
    physical_sector_size: int = SECTOR_SIZE
    read_only: bool = False
    persistent: bool = False
    indirect_segments: int = 0  # 0: no indirect requests
    flush_op: int | None = None  # FLUSH_DISKCACHE, WRITE_BARRIER, or None (flush is a no-op)
    discard: bool = False
    discard_granularity: int = 0
    discard_alignment: int = 0
    discard_secure: bool = False
    grant_size: int = 4096  # the negotiated grant granule in bytes (docs/granule-extension.md)
    handle: int = 0
    granule_order: int = 0  # log2(grant_size / 4096): grant-granule-order

    @property
    def limits(self) -> Limits:
        segments = self.indirect_segments if self.indirect_segments > 11 else 11
        return Limits(segments, self.sector_size, self.grant_size)

    @property
    def capacity(self) -> int:
        """The disk size in bytes."""
        return self.sectors * SECTOR_SIZE

    def summary(self) -> dict[str, Any]:
        """The connection as plain values (int, bool, str or None), for logs and reports."""
        return {
            "sectors": self.sectors,
            "sector_size": self.sector_size,
            "physical_sector_size": self.physical_sector_size,
            "ring_page_order": self.ring_page_order,
            "queues": self.queues,
            "indirect_segments": self.indirect_segments,
            "persistent": self.persistent,
            "flush": self.flush_op is not None,
            "flush_op": self.flush_op,
            "discard": self.discard,
            "discard_granularity": self.discard_granularity,
            "discard_alignment": self.discard_alignment,
            "discard_secure": self.discard_secure,
            "grant_size": self.grant_size,
            "granule_order": self.granule_order,
            "read_only": self.read_only,
            "protocol": self.protocol.name,
        }

    # `dict(info)` is `summary()`, for the reports that take a frontend's info as a dict.
    def keys(self) -> list[str]:
        return list(self.summary())

    def __getitem__(self, name: str) -> Any:
        return self.summary()[name]


@dataclass(slots=True, eq=False)
class BlkIo:
    """One user I/O: read/write of `length` bytes at `sector`, a flush, or a discard."""

    operation: int  # BLKIF_OP_READ / WRITE / FLUSH_DISKCACHE (any flush) / DISCARD
    sector: int
    length: int  # bytes (0 for a flush)
    start: int = 0  # where the data begins in its first guest page
    # the payload of a write; where a read's data goes (a bytearray or writable memoryview)
    data: bytes | bytearray | memoryview = b""
    seq: int = 0
    status: int | None = None  # set once, at completion
    reason: str = ""
    waiter: Any = None  # the trio layer's wake-up handle
    # per connection: reset by Engine.disconnect()
    parts: list[Part] | None = None  # shared with I/Os of the same shape; sectors relative
    pieces: Sequence[Chunk] = ()  # shared too (`_plan`)
    next_part: int = 0
    outstanding: int = 0
    queue: int = -1
    failure: int = BLKIF_RSP_OKAY
    pages: Sequence[Page] = ()  # the "bio" pages (non-persistent), allocated at dispatch

    @property
    def done(self) -> bool:
        return self.status is not None

    def reset(self) -> None:
        self.parts = None
        self.next_part = 0
        self.outstanding = 0
        self.queue = -1
        self.failure = BLKIF_RSP_OKAY


class _Issued:
    """What one ring request holds until its response: Linux's `struct blk_shadow`.
    (A plain class: one is made per request, and a dataclass's default factories cost.)"""

    __slots__ = ("frames", "grefs", "io", "operation", "part", "pool", "pooled", "scratch")

    def __init__(self, io: BlkIo, part: Part, operation: int, pool: list[tuple[int, int]]) -> None:
        self.io = io
        self.part = part
        self.operation = operation
        self.pool = pool  # the issuing ring's persistent pool (`_Queue.pool`)
        # Set by `_build` where a request has them (most have only `pooled` and `frames`).
        self.grefs: list[int] = _NONE  # ended at completion
        self.pooled: list[tuple[int, int]] = _NONE  # persistent (frame, gref)
        self.frames: list[int] = _NONE  # frame of each chunk, in order
        self.scratch: list[int] = _NONE  # non-persistent indirect frames


class _Queue:
    __slots__ = ("counters", "free", "index", "out", "pool", "ring", "shadow")

    def __init__(self, index: int, ring: FrontRing, counters: BlkfrontStats) -> None:
        self.index = index
        self.ring = ring
        self.counters = counters  # this queue's record, kept by the engine across connections
        self.shadow: list[_Issued | None] = [None] * ring.nr_ents
        # Free request ids: one per ring slot, so "no free id" is RING_FULL.
        self.free = list(range(ring.nr_ents - 1, -1, -1))
        self.out: list[bytes] = []  # requests built by this dispatch, put on the ring at its end
        # This ring's free persistent grants (frame, gref), popped from the end. Per ring,
        # as Linux's `rinfo->grants`: blkback caches persistent grants per ring (1056 each,
        # within a per-domain budget), so a pool shared by all rings would make every ring
        # map every grant and overflow the budget (the rest falling back to grant copy).
        self.pool: list[tuple[int, int]] = []


class Engine:
    """The state of one blkfront device across connections (see the module docstring)."""

    def __init__(
        self,
        memory: Memory,
        grants: Grants,
        backend_domid: int,
        *,
        grant_size: int = 4096,
        queue_depth: int = 32,
        planted_lost_reissue: bool = False,
        counters: Callable[[int], BlkfrontStats] = lambda _queue: BlkfrontStats(),
    ) -> None:
        """`counters(q)`: the record for queue `q`, asked once per queue index for the
        engine's life (docs/metrics.md)."""
        self.memory = memory
        self.grants = grants
        self.backend = backend_domid
        self.grant_size = grant_size
        self.page_size = memory.page_size
        self.pending: collections.deque[BlkIo] = collections.deque()
        self.active: dict[int, BlkIo] = {}  # seq -> issued (fully or partly), not completed
        self.negotiated: Negotiated | None = None
        self.queues: list[_Queue] = []
        self._rr = 0
        self._run_ios = self._run_chunks = 0
        # Half the device's depth: the I/Os in flight sit on two rings at least, so the
        # backend drains one while this end refills the other (see `dispatch`).
        self._run_length = max(_MIN_RUN, queue_depth // 2)
        self._seq = 0
        self._pool_all: list[tuple[int, int]] = []
        self._pool_pages: list[Page] = []
        self._scratch: list[int] = []  # free frames for non-persistent indirect pages
        self._scratch_pages: list[Page] = []
        self._stuck: list[tuple[int, Sequence[Page]]] = []  # grants the backend would not release
        self._stuck_grefs: list[int] = []
        self._finished: list[BlkIo] = []  # completed inside dispatch(), not by a response
        # (start, length) -> the split under this connection's limits (see `_plan`)
        self._shapes: dict[tuple[int, int], tuple[list[Chunk], list[Part]]] = {}
        self._limits = Limits(11)
        self.flush_op: int | None = None
        self.discard = False
        # Test-only planted bug (docs/faults.md, "Simulation"): `disconnect` acknowledges the
        # newest unfinished write instead of re-issuing it, so the checkers must find it.
        self._planted_lost_reissue = planted_lost_reissue
        self._new_counters = counters
        self.counters: list[BlkfrontStats] = []  # by queue index

    @property
    def requests_issued(self) -> int:
        """Ring requests put on the rings so far (every connection)."""
        return sum(c.rd_req + c.wr_req + c.f_req + c.ds_req for c in self.counters)

    @property
    def reissued(self) -> int:
        """I/Os that a connection ended before they completed (issued again)."""
        return sum(c.reissued for c in self.counters)

    # -- the user side ----------------------------------------------------------------------

    def submit(self, io: BlkIo) -> None:
        self._seq += 1
        io.seq = self._seq
        self.pending.append(io)

    @property
    def connected(self) -> bool:
        return self.negotiated is not None

    def unfinished(self) -> int:
        return len(self.pending) + sum(1 for io in self.active.values() if io not in self.pending)

    # -- connections ---------------------------------------------------------------------

    def connect(self, negotiated: Negotiated, rings: Sequence[FrontRing]) -> None:
        if self.negotiated is not None:
            self.disconnect()
        if len(rings) != negotiated.queues:
            raise ValueError(f"{negotiated.queues} queues but {len(rings)} rings")
        self.negotiated = negotiated
        if negotiated.grant_size != self.grant_size:
            self._regranulate(negotiated.grant_size)
        self._limits = negotiated.limits
        self._shapes.clear()
        while len(self.counters) < len(rings):
            self.counters.append(self._new_counters(len(self.counters)))
        self.queues = [_Queue(i, ring, self.counters[i]) for i, ring in enumerate(rings)]
        self.flush_op = negotiated.flush_op
        self.discard = negotiated.discard
        self._rr = 0

    def disconnect(self) -> None:
        """End the connection: unfinished I/Os go back to the pending queue, in order."""
        for queue in self.queues:
            for issued in queue.shadow:
                if issued is not None:
                    self._release(issued)
        self.queues = []
        self.negotiated = None
        back = sorted(
            {io.seq: io for io in (*self.active.values(), *self.pending)}.values(),
            key=lambda io: io.seq,
        )
        for io in self.active.values():  # issued: each has its queue
            self.counters[io.queue].reissued += 1
        writes = [
            io
            for io in back
            if self._planted_lost_reissue
            and io.seq in self.active
            and io.operation == BLKIF_OP_WRITE
        ]
        self.active.clear()
        for io in back:
            self._drop_bio(io)
            io.reset()
        if writes:
            forgotten = writes[-1]
            back.remove(forgotten)
            forgotten.status, forgotten.reason = int(BLKIF_RSP_OKAY), ""
            self._finished.append(forgotten)
        self.pending = collections.deque(back)
        self._drop_pool()
        self._retry_stuck()

    def fail_pending(self, status: int, reason: str) -> list[BlkIo]:
        """Fail every I/O not on a ring (e.g. the device is detached)."""
        failed = []
        for io in self.pending:
            if io.seq in self.active:
                continue
            self._drop_bio(io)
            io.status, io.reason = status, reason
            failed.append(io)
        self.pending = collections.deque(io for io in self.pending if io.seq in self.active)
        return failed

    # -- issuing -------------------------------------------------------------------------

    def dispatch(self) -> list[int]:
        """Put pending I/Os on the rings while there is room; the queues to notify."""
        neg = self.negotiated
        if neg is None or not self.pending:
            return []
        touched: set[int] = set()
        nqueues = len(self.queues)
        try:
            self._dispatch(neg, touched, nqueues)
        finally:
            # Built requests go on their rings even if a later one failed: their ids and
            # grants are taken. One `put_requests` per ring: one store of the run.
            for index in touched:
                queue = self.queues[index]
                queue.ring.put_requests(queue.out)
                queue.out.clear()
        notify = []
        for index in sorted(touched):
            if self.queues[index].ring.push_requests():
                notify.append(index)
        return notify

    def _dispatch(self, neg: Negotiated, touched: set[int], nqueues: int) -> None:
        # Round-robin over the rings by runs of up to `_run_length` I/Os (half the queue
        # depth) and _RUN_CHUNKS chunks, not one I/O each: a run costs one push, at most one
        # notification and one backend wake-up, while runs still overlap on two rings or
        # more (one ring for everything serialises the two ends: the backend answers a
        # whole batch before the frontend can refill it). 4k random reads at depth 32
        # (IOPS, shm): runs of 4 → 55-58k, 8 → 56-62k, 16 → 64-69k, 32 (one ring) → 37-43k.
        # Large I/Os still go one per ring, so that no ring's persistent grants (blkback
        # caches 1056 per ring) see them all.
        while self.pending:
            io = self.pending[0]
            if io.parts is None:
                early = self._settle_early(io) if io.operation > BLKIF_OP_WRITE else None
                if early is not None:
                    self.pending.popleft()
                    io.status, io.reason = early
                    self._finished.append(io)
                    continue
                self._plan(io, neg)
                assert io.parts is not None
                if self._run_ios >= self._run_length or self._run_chunks >= _RUN_CHUNKS:
                    self._rr += 1
                    self._run_ios = self._run_chunks = 0
                self._run_ios += 1
                self._run_chunks += len(io.pieces)
                queue = self.queues[self._rr % nqueues]
                for _ in range(nqueues):
                    if queue.free:
                        break
                    queue = self.queues[(queue.index + 1) % nqueues]
                io.queue = queue.index
            queue = self.queues[io.queue]
            parts = io.parts
            assert parts is not None
            starved: Exception | None = None
            while io.next_part < len(parts) and queue.free:
                try:
                    self._issue(queue, io, parts[io.next_part], neg)
                except (OutOfMemory, GrantError) as exc:
                    if isinstance(exc, GrantError) and exc.status != GNTST.GNTST_no_space:
                        raise
                    starved = exc
                    break
                touched.add(queue.index)
                io.next_part += 1
            if starved is not None and not io.outstanding and len(self.active) == 1:
                # Nothing in flight will ever free memory or grants: fail this I/O.
                self.pending.popleft()
                del self.active[io.seq]
                self._drop_bio(io)
                io.status, io.reason = -1, f"out of guest memory or grants: {starved}"
                self._finished.append(io)
                continue
            if io.next_part < len(parts):
                break  # ring full or resources short: keep order, wait for responses
            self.pending.popleft()

    def take_finished(self) -> list[BlkIo]:
        """I/Os that dispatch() settled without the backend (see `_settle_early`)."""
        out, self._finished = self._finished, []
        return out

    def _settle_early(self, io: BlkIo) -> tuple[int, str] | None:
        """A flush without flush support completes at once (Linux: no REQ_PREFLUSH queue
        flag, the block layer completes it); a discard without support fails."""
        if io.operation in FLUSH_OPS and self.flush_op is None:
            return int(BLKIF_RSP_OKAY), ""
        if io.operation == BLKIF_OP_DISCARD and not self.discard:
            return int(BLKIF_RSP_EOPNOTSUPP), "the backend does not support discard"
        return None

    def _plan(self, io: BlkIo, neg: Negotiated) -> None:
        if io.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            # The split depends only on where the data starts in its page, its length and
            # the limits (sectors just shift), and a workload repeats a few shapes: cache
            # it (256 chunks per 1 MiB of 4 KiB grants). The chunk list is shared, never
            # mutated.
            key = (io.start, io.length)
            shape = self._shapes.get(key)
            if shape is None:
                pieces = chunks(io.start, io.length, self.grant_size)
                if len(self._shapes) >= _SHAPES:
                    self._shapes.clear()
                shape = self._shapes[key] = (pieces, plan(pieces, 0, self._limits))
            # Shared and never mutated; a part's `sector` is relative to `io.sector`.
            io.pieces, io.parts = shape
        else:
            io.pieces = []
            io.parts = [_NO_DATA]
        self.active[io.seq] = io

    def _issue(self, queue: _Queue, io: BlkIo, part: Part, neg: Negotiated) -> None:
        op = io.operation
        if op in FLUSH_OPS:
            op = self.flush_op if self.flush_op is not None else op
        issued = _Issued(io, part, op, queue.pool)
        # Persistent grants: the data segments the pool has granted already, and those it
        # must grant for this request (`_build` grows it by the difference).
        pooled = part.count if neg.persistent and op <= BLKIF_OP_WRITE else 0
        misses = pooled - len(queue.pool) if pooled > len(queue.pool) else 0
        request_id = queue.free.pop()
        try:
            request = self._build(issued, neg, request_id)
            data = request if isinstance(request, bytes) else neg.protocol.encode_request(request)
        except BaseException:
            queue.free.append(request_id)
            self._release(issued)
            raise
        queue.shadow[request_id] = issued
        queue.out.append(data)
        io.outstanding += 1
        counters = queue.counters
        if op == BLKIF_OP_READ:
            counters.rd_req += 1
            counters.rd_bytes += part.length
        elif op == BLKIF_OP_WRITE:
            counters.wr_req += 1
            counters.wr_bytes += part.length
        elif op == BLKIF_OP_DISCARD:
            counters.ds_req += 1
        else:
            counters.f_req += 1
        counters.segments += part.count
        counters.persistent_hits += pooled - misses
        counters.persistent_misses += misses
        if part.indirect:
            counters.indirect_req += 1
            counters.indirect_pages += indirect_pages(part.count, self.grant_size)

    def _build(
        self, issued: _Issued, neg: Negotiated, id: int
    ) -> BlkifRequest | BlkifIndirectRequest | BlkifDiscardRequest | bytes:
        """Grant (or fill pool frames for) the part's data: the ring request with `id`,
        as an object to encode, or already encoded (the persistent direct path)."""
        io, part = issued.io, issued.part
        if io.operation == BLKIF_OP_DISCARD:
            return BlkifDiscardRequest(id, io.sector, io.length // SECTOR_SIZE, 0, neg.handle)
        if io.operation in FLUSH_OPS:
            return BlkifRequest(issued.operation, id, 0, (), neg.handle)
        write = io.operation == BLKIF_OP_WRITE
        gsize = self.grant_size
        if neg.persistent and part.count == 1 and not part.indirect:
            # One chunk (every I/O of a granule or less): the same as below, minus the lists.
            pool = issued.pool
            if not pool:
                self._grow_pool(pool)
            entry = pool.pop()
            issued.pooled = [entry]
            issued.frames = [entry[0]]
            if write:
                self._copy_in(issued)
            piece = io.pieces[part.first]
            first = piece.offset % gsize >> 9
            segment = (entry[1], first, first + (piece.length >> 9) - 1)
            return neg.protocol.encode_rw(
                io.operation, id, io.sector + part.sector, neg.handle, (segment,)
            )
        pieces = io.pieces[part.first : part.first + part.count]
        segments = []
        if neg.persistent:
            # The hot path of every large I/O (256 chunks per 1 MiB): list operations, not a
            # Python step per chunk where it can be helped.
            pool = issued.pool
            n = len(pieces)
            if len(pool) < n:
                self._grow_pool(pool, n - len(pool))
            taken = pool[-n:]
            del pool[-n:]
            taken.reverse()  # the order n pops would give
            issued.pooled = taken
            issued.frames = [frame for frame, _ in taken]
            if write:
                self._copy_in(issued)
            if part.indirect:
                return self._indirect_request(issued, neg, taken, id)
            raw = []
            for piece, (_, gref) in zip(pieces, taken, strict=True):
                first = piece.offset % gsize // SECTOR_SIZE
                raw.append((gref, first, first + piece.length // SECTOR_SIZE - 1))
            sector = io.sector + part.sector
            return neg.protocol.encode_rw(io.operation, id, sector, neg.handle, raw)
        else:
            if not io.pages:
                self._fill_bio(io)
            issued.grefs, issued.frames = [], []
            psize = self.page_size
            order = neg.granule_order
            for piece in pieces:
                page = io.pages[piece.offset // psize]
                # the granule holding the chunk: granules are aligned inside the guest page
                frame = page.frame + (piece.offset % psize) // gsize * (gsize >> 12)
                gref = self.grants.grant_access(self.backend, frame, order=order)
                issued.grefs.append(gref)
                issued.frames.append(frame)
                first, last = piece.sectors(gsize)
                segments.append(BlkifSegment(gref, first, last))
        if not part.indirect:
            sector = io.sector + part.sector
            return BlkifRequest(io.operation, id, sector, tuple(segments), neg.handle)
        # Non-persistent (the persistent path returned above): scratch granules, granted
        # for this request only.
        grefs = []
        issued.scratch = []
        for content in encode_indirect_pages(segments, gsize)[
            : indirect_pages(len(segments), gsize)
        ]:
            frame = self._scratch_get()
            issued.scratch.append(frame)
            gref = self.grants.grant_access(self.backend, frame, order=neg.granule_order)
            issued.grefs.append(gref)
            at = frame * 4096
            self.memory.view[at : at + gsize] = content
            self.memory.written(at, gsize)
            grefs.append(gref)
        return BlkifIndirectRequest(
            io.operation, id, io.sector + part.sector, len(segments), tuple(grefs), neg.handle
        )

    def _indirect_request(
        self, issued: _Issued, neg: Negotiated, taken: list[tuple[int, int]], id: int
    ) -> BlkifIndirectRequest:
        """An INDIRECT request over persistent grants, its descriptor pages written straight
        from the grefs: every chunk but the first and last of an I/O is a whole granule
        (`split.chunks`), so only those two need their sectors worked out."""
        io, part = issued.io, issued.part
        gsize = self.grant_size
        whole = (gsize // SECTOR_SIZE - 1) << 40  # first_sect 0, last_sect at the granule end
        descriptors = [gref | whole for _, gref in taken]  # blkif_request_segment as uint64
        for index in (0, len(taken) - 1):
            piece = io.pieces[part.first + index]
            first = piece.offset % gsize // SECTOR_SIZE
            last = first + piece.length // SECTOR_SIZE - 1
            descriptors[index] = taken[index][1] | first << 32 | last << 40
        per_page = gsize // 8
        view, written = self.memory.view, self.memory.written
        grefs = []
        for at_descriptor in range(0, len(descriptors), per_page):
            chunk = descriptors[at_descriptor : at_descriptor + per_page]
            packer = _DESCRIPTORS.get(len(chunk))
            if packer is None:
                packer = _DESCRIPTORS[len(chunk)] = struct.Struct(f"<{len(chunk)}Q")
            frame, gref = self._pool_get(issued.pool)
            issued.pooled.append((frame, gref))
            at = frame * 4096
            packer.pack_into(view, at, *chunk)
            used = packer.size
            view[at + used : at + gsize] = bytes(gsize - used)
            written(at, gsize)
            grefs.append(gref)
        return BlkifIndirectRequest(
            io.operation, id, io.sector + part.sector, len(descriptors), tuple(grefs), neg.handle
        )

    def _fill_bio(self, io: BlkIo) -> None:
        """Allocate the I/O's guest pages; a write's data is copied in once per connection."""
        psize = self.page_size
        io.pages = self.memory.alloc_pages(-(-(io.start + io.length) // psize))
        if io.operation == BLKIF_OP_WRITE:
            data = memoryview(io.data)
            done = 0
            position = io.start
            for page in io.pages[: len(io.pages)]:
                inside = position % psize
                take = min(psize - inside, io.length - done)
                if take <= 0:
                    break
                at = page.frame * 4096 + inside
                self.memory.view[at : at + take] = data[done : done + take]
                self.memory.written(at, take)
                done += take
                position += take

    # -- responses -----------------------------------------------------------------------

    def poll(self, index: int) -> list[BlkIo]:
        """Take every response on queue `index` (re-arming rsp_event); the completed I/Os."""
        neg = self.negotiated
        if neg is None or index >= len(self.queues):
            return []
        queue = self.queues[index]
        ring = queue.ring
        completed: list[BlkIo] = []
        fields = neg.protocol.response_fields
        complete = self._complete
        try:
            while True:
                for raw in ring.take_responses():  # every available one, copied in one go
                    request_id, operation, status = fields(raw)
                    io = complete(queue, request_id, status, operation)
                    if io is not None:
                        completed.append(io)
                if not ring.final_check_for_responses():
                    break
        except AbiError as exc:
            raise BlkfrontProtocolError(f"queue {index}: {exc}") from None
        return completed

    def _complete(
        self, queue: _Queue, request_id: int, status: int, operation: int
    ) -> BlkIo | None:
        if not 0 <= request_id < len(queue.shadow):
            queue.ring.broken = f"response has incorrect id ({request_id})"
            raise BlkfrontProtocolError(f"queue {queue.index}: {queue.ring.broken}")
        issued = queue.shadow[request_id]
        if issued is None:
            queue.ring.broken = f"response {request_id} references no pending request"
            raise BlkfrontProtocolError(f"queue {queue.index}: {queue.ring.broken}")
        if operation != issued.operation and operation != BLKIF_OP_INDIRECT:
            # Linux: "response has incorrect operation" (a stale or forged id that names a
            # request in flight). INDIRECT is accepted for the inner operation, as some
            # backends echo the outer one.
            queue.ring.broken = (
                f"response {request_id} has incorrect operation "
                f"({operation} instead of {issued.operation})"
            )
            raise BlkfrontProtocolError(f"queue {queue.index}: {queue.ring.broken}")
        queue.shadow[request_id] = None
        queue.free.append(request_id)
        io = issued.io
        if status == BLKIF_RSP_OKAY and io.operation == BLKIF_OP_READ and issued.pooled:
            self._copy_out(issued)
        self._release(issued)
        if status != BLKIF_RSP_OKAY:
            queue.counters.errors += 1
            if status == BLKIF_RSP_EOPNOTSUPP and issued.operation in FLUSH_OPS:
                log.warning("backend refused flush: flush disabled", op=issued.operation)
                self.flush_op = None
            elif status == BLKIF_RSP_EOPNOTSUPP and issued.operation == BLKIF_OP_DISCARD:
                log.warning("backend refused discard: discard disabled")
                self.discard = False
            if io.failure == BLKIF_RSP_OKAY:
                io.failure = status
        io.outstanding -= 1
        if io.outstanding or io.parts is None or io.next_part < len(io.parts):
            return None
        if io.failure == BLKIF_RSP_OKAY and io.operation == BLKIF_OP_READ and io.pages:
            self._copy_bio_out(io)
        self._drop_bio(io)
        del self.active[io.seq]
        io.status = io.failure
        if io.status != BLKIF_RSP_OKAY:
            io.reason = "the backend failed the request"
        return io

    def _pool_runs(self, issued: _Issued) -> list[tuple[int, int, int]]:
        """(memory offset, data offset, length) of a persistent request's chunks, with
        chunks that sit back to back in guest memory merged: the pool hands out frames in
        the order it granted them (see `_release`), so a large I/O mostly gets consecutive
        frames and moves in a few slice copies instead of one per 4 KiB.

        Chunks are cut at granule boundaries (`split.chunks`): every chunk but the last
        ends a granule and every chunk but the first starts one, so two neighbours are
        back to back exactly when their granules are consecutive frames."""
        io, part = issued.io, issued.part
        gsize = self.grant_size
        frames = issued.frames
        pieces = io.pieces
        first_piece = part.first
        n = len(frames)
        if n == 1:  # a small I/O
            piece = pieces[first_piece]
            return [
                (frames[0] * 4096 + piece.offset % gsize, piece.offset - io.start, piece.length)
            ]
        step = gsize >> 12
        cuts = [i for i in range(1, n) if frames[i] != frames[i - 1] + step]
        cuts.append(n)
        runs: list[tuple[int, int, int]] = []
        begin = 0
        for end in cuts:
            head, tail = pieces[first_piece + begin], pieces[first_piece + end - 1]
            runs.append(
                (
                    frames[begin] * 4096 + head.offset % gsize,
                    head.offset - io.start,
                    tail.offset + tail.length - head.offset,
                )
            )
            begin = end
        return runs

    def _copy_in(self, issued: _Issued) -> None:
        view, written = self.memory.view, self.memory.written
        data = memoryview(issued.io.data)
        for at, offset, length in self._pool_runs(issued):
            view[at : at + length] = data[offset : offset + length]
            written(at, length)

    def _copy_out(self, issued: _Issued) -> None:
        data = issued.io.data
        assert not isinstance(data, bytes)
        view = self.memory.view
        for at, offset, length in self._pool_runs(issued):
            data[offset : offset + length] = view[at : at + length]

    def _copy_bio_out(self, io: BlkIo) -> None:
        assert not isinstance(io.data, bytes)
        psize = self.page_size
        view = self.memory.view
        done = 0
        position = io.start
        for page in io.pages:
            inside = position % psize
            take = min(psize - inside, io.length - done)
            if take <= 0:
                break
            at = page.frame * 4096 + inside
            io.data[done : done + take] = view[at : at + take]
            done += take
            position += take

    # -- resources -----------------------------------------------------------------------

    def _release(self, issued: _Issued) -> None:
        stuck = []
        for gref in issued.grefs:
            try:
                self.grants.end_access(gref)
            except GrantError:
                stuck.append(gref)
        if stuck:
            # Linux (XSA-396): a backend that keeps a grant mapped after answering is
            # misbehaving; the page must not be reused while it can still write it.
            log.warning("backend still maps grants", grefs=stuck)
            pages = issued.io.pages
            issued.io.pages = []
            self._stuck.append((len(stuck), pages))
            self._stuck_grefs.extend(stuck)
        self._scratch.extend(issued.scratch)
        # Reversed: the next request popping from this pool gets the same frames in the
        # same order, so consecutive frames stay consecutive (merged copies here, merged
        # iovecs in blkback, whose mappings follow the order it first saw the grants in).
        issued.pool.extend(reversed(issued.pooled))
        issued.grefs = issued.scratch = issued.pooled = _NONE

    def release_stuck(self) -> int:
        """Retry ending the grants a backend still mapped (it may have unmapped since: at a
        toolstack unplug the backend unmaps only after we are Closed); how many are left."""
        self._retry_stuck()
        return len(self._stuck_grefs)

    def _retry_stuck(self) -> None:
        if not self._stuck_grefs:
            return
        left = []
        for gref in self._stuck_grefs:
            try:
                self.grants.end_access(gref)
            except GrantError:
                left.append(gref)
        self._stuck_grefs = left
        if not left:
            for _, pages in self._stuck:
                self.memory.free_pages(pages)
            self._stuck = []

    def _drop_bio(self, io: BlkIo) -> None:
        if io.pages:
            self.memory.free_pages(io.pages)
            io.pages = []

    def _pool_get(self, pool: list[tuple[int, int]]) -> tuple[int, int]:
        if not pool:
            self._grow_pool(pool)
        return pool.pop()

    def _grow_pool(self, pool: list[tuple[int, int]], granules: int = 1) -> None:
        """Grant every granule of enough more guest pages for `granules` more entries in
        the persistent pool. They go on top of it lowest frame first, so that one request
        taking them gets consecutive frames (allocated one after the other) in order."""
        per_page = self.page_size // self.grant_size
        pages = self.memory.alloc_pages(-(-granules // per_page))
        self._pool_pages.extend(pages)
        fresh = []
        step = self.grant_size >> 12
        order = step.bit_length() - 1
        try:
            for page in pages:
                for frame in range(page.frame, page.frame + page.nframes, step):
                    gref = self.grants.grant_access(self.backend, frame, order=order)
                    fresh.append((frame, gref))
        finally:
            pool.extend(reversed(fresh))
            self._pool_all.extend(fresh)

    def _scratch_get(self) -> int:
        """The first frame of a free granule for a non-persistent indirect page."""
        if not self._scratch:
            (page,) = self.memory.alloc_pages(1)
            self._scratch_pages.append(page)
            step = self.grant_size >> 12
            self._scratch.extend(range(page.frame + page.nframes - step, page.frame - 1, -step))
        return self._scratch.pop()

    def _regranulate(self, grant_size: int) -> None:
        """A connection with another grant granule: chunks are cut anew at the
        next dispatch (every I/O was reset at disconnect); indirect scratch granules are
        re-cut from fresh pages. Old scratch pages are freed unless a grant on one is
        stuck (then they are left alone, as the stuck bios are)."""
        self.grant_size = grant_size
        if self._scratch_pages and not self._stuck_grefs:
            self.memory.free_pages(self._scratch_pages)
        self._scratch, self._scratch_pages = [], []

    def _drop_pool(self) -> None:
        """End the persistent grants (the backend unmapped them on disconnect, or died)."""
        stuck = []
        for _, gref in self._pool_all:
            try:
                self.grants.end_access(gref)
            except GrantError:
                stuck.append(gref)
        if stuck:
            log.warning("backend still maps persistent grants", count=len(stuck))
            self._stuck_grefs.extend(stuck)
            self._stuck.append((len(stuck), self._pool_pages))
        elif self._pool_pages:
            self.memory.free_pages(self._pool_pages)
        for queue in self.queues:
            queue.pool = []
        self._pool_all, self._pool_pages = [], []

    def persistent_grants(self) -> int:
        return len(self._pool_all)
