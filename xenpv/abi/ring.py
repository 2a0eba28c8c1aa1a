"""Shared producer/consumer rings with the exact semantics of Xen's io/ring.h.

A ring lives in a `SharedBuffer` (one or several 4 KiB frames mapped side by side, or one
larger negotiated granule). Layout, little-endian, as `struct <name>_sring`:

    0  req_prod   written by the front (RING_PUSH_REQUESTS)
    4  req_event  written by the back  (RING_FINAL_CHECK_FOR_REQUESTS)
    8  rsp_prod   written by the back  (RING_PUSH_RESPONSES)
   12  rsp_event  written by the front (RING_FINAL_CHECK_FOR_RESPONSES)
   16  pvt[4], __pad[44]  (zeroed by SHARED_RING_INIT)
   64  ring[nr_ents] entries of max(request size, response size) bytes

`nr_ents` is `__RD32((buffer bytes - 64) / entry size)`: as many entries as fit, rounded down
to a power of two. Indexes are free-running 32-bit counters (`RING_IDX`) that wrap; a slot is
`index & (nr_ents - 1)`. Each field has a single writer, so shipping the ranges reported to
`SharedBuffer.written` in order keeps a socket-copy replica coherent (docs/architecture.md,
"Shared pages: the coherence rule").

The front and back private states (`struct <name>_front_ring` / `_back_ring`) are the
attributes `req_prod_pvt` / `rsp_cons` and `rsp_prod_pvt` / `req_cons`. Each method's
docstring names the macro it implements; every notify decision and every shared byte is the
one the C macros produce (checked against the installed headers, step by step, by
tests/interop/test_headers_ring.py).

Typical use, a backend woken by an event:

    while True:
        for data in back.take_requests():   # or take_request() one at a time
            ...decode, start the I/O; later back.put_response(...)
        if not back.final_check_for_requests():
            break                     # idle: the front will notify on its next push
    if back.push_responses():
        notify the front

What we add to the macros (C leaves these to each driver):
- an entry is copied out of the shared page once, as bytes, before anyone decodes it
  (no double fetch, XSA-155);
- a producer index the peer could not legally have written breaks the ring (`RingError`, and
  `broken` holds the reason; every later call raises again): on the back side
  RING_REQUEST_PROD_OVERFLOW (Linux blkback's "bogus ring requests") or `req_prod` moving
  behind `req_cons`; on the front side more responses than requests outstanding (which
  implies RING_RESPONSE_PROD_OVERFLOW, Linux blkfront's "illegal number of responses");
- putting onto a full ring, or responding to a request not yet consumed, raises
  `RingUsageError` instead of silently overwriting a slot.

The hostile-peer seam (`set_tamper`): fault runs make one end of a ring misbehave on purpose,
to check the OTHER end's defences (docs/faults.md, "ring"). A `RingTamper` is called where a
driver publishes its producer index (`FrontRing.push_requests`, `BackRing.push_responses`) and
right after a backend copied requests out (`BackRing.take_request(s)`); it may rewrite slots
and indexes in the shared page as a hostile peer would. It is one per process (one domain
per process) and None outside a fault run: one `is None` check on each of those calls.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from xenpv.abi.buffer import SharedBuffer
from xenpv.abi.errors import RingError, RingUsageError
from xenpv.metrics.registry import REGISTRY

RING_IDX_MASK: Final = 0xFFFFFFFF
SRING_HEADER_SIZE: Final = 64  # offsetof(struct <name>_sring, ring)
OFF_REQ_PROD: Final = 0
OFF_REQ_EVENT: Final = 4
OFF_RSP_PROD: Final = 8
OFF_RSP_EVENT: Final = 12

_SRING_INIT = struct.Struct("<IIII48x")  # req_prod, req_event, rsp_prod, rsp_event, pvt+__pad
_INDEXES = struct.Struct("<IIII")

# The hot path reads and writes the four indexes through a uint32 view of the header, which
# is ~3x cheaper than struct calls; that view is in host byte order, the ABI's is little.
if sys.byteorder != "little":  # pragma: no cover - every Xen architecture is little-endian
    raise ImportError("xenpv.abi.ring needs a little-endian host")
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = range(4)  # uint32 positions in the header


def rd32(x: int) -> int:
    """`__RD32`: round a 32-bit unsigned value down to a power of two (0 stays 0)."""
    if not 0 <= x <= RING_IDX_MASK:
        raise ValueError(f"__RD32 takes a 32-bit unsigned value, not {x}")
    return 1 << (x.bit_length() - 1) if x else 0


@dataclass(frozen=True, slots=True)
class RingLayout:
    """The entry sizes of one ring type (`DEFINE_RING_TYPES(name, req_t, rsp_t)`)."""

    req_size: int  # sizeof(req_t)
    rsp_size: int  # sizeof(rsp_t)
    name: str = "ring"  # for messages

    @property
    def entry_size(self) -> int:
        """sizeof(union <name>_sring_entry)."""
        return max(self.req_size, self.rsp_size)

    def nr_ents(self, buffer_size: int) -> int:
        """`__CONST_RING_SIZE(name, buffer_size)`: entries in a ring of `buffer_size` bytes."""
        if buffer_size < SRING_HEADER_SIZE + self.entry_size:
            raise RingUsageError(
                f"{self.name} ring: {buffer_size} bytes cannot hold the 64-byte header "
                f"and one {self.entry_size}-byte entry"
            )
        return rd32((buffer_size - SRING_HEADER_SIZE) // self.entry_size)


def shared_ring_init(buffer: SharedBuffer) -> None:
    """`SHARED_RING_INIT`: indexes 0, req_event = rsp_event = 1, pvt and pad zeroed."""
    _SRING_INIT.pack_into(buffer.view, 0, 0, 1, 0, 1)
    buffer.written(0, SRING_HEADER_SIZE)


def shared_indexes(buffer: SharedBuffer) -> tuple[int, int, int, int]:
    """(req_prod, req_event, rsp_prod, rsp_event) as currently in the shared header."""
    values: tuple[int, int, int, int] = _INDEXES.unpack_from(buffer.view, 0)
    return values


class RingTamper(Protocol):
    """A hostile peer at one end of the rings of this process (see the module doc)."""

    def front_push(self, ring: FrontRing) -> bool | None:
        """Called before a front publishes `req_prod_pvt` (a hostile frontend): it may rewrite
        the requests about to be published. None: publish as usual; a bool: the tamper
        published itself (a bogus `req_prod`, `FrontRing.corrupt_prod`), and whether to
        notify."""
        ...

    def back_push(self, ring: BackRing) -> bool | None:
        """Called before a back publishes `rsp_prod_pvt` (a hostile backend). None: publish
        as usual; a bool: the tamper published (or held back) itself, and whether to notify."""
        ...

    def back_taken(self, ring: BackRing, first: int, count: int) -> None:
        """Called right after a back copied `count` requests from index `first` out of the
        shared page (a frontend rewriting them now is the double fetch of XSA-155)."""
        ...


def set_tamper(tamper: RingTamper | None) -> None:
    """Install (or with None remove) this process's hostile-peer seam on every ring."""
    _Ring.tamper = tamper


class _Ring:
    """State and checks common to both ends.

    A ring keeps the `buffer.view` it was built with: a transport that remaps the shared
    memory builds new ring objects (with attach=True).
    """

    __slots__ = (
        "_idx",
        "_mask",
        "_req_size",
        "_rsp_size",
        "_view",
        "_written",
        "broken",
        "buffer",
        "entry_size",
        "layout",
        "nr_ents",
        "stats",
    )
    tamper: ClassVar[RingTamper | None] = None  # the hostile-peer seam, see set_tamper

    _END = ""  # "front" or "back": which record of the registry this end counts in

    def __init__(self, buffer: SharedBuffer, layout: RingLayout) -> None:
        view = buffer.view
        if len(view) > RING_IDX_MASK:
            raise RingUsageError(f"{layout.name} ring: a {len(view)}-byte buffer is too large")
        self.buffer = buffer
        self.layout = layout
        self._view = view
        self._idx = view[:16].cast("I")  # req_prod, req_event, rsp_prod, rsp_event
        self._written = buffer.written
        self._req_size = layout.req_size
        self._rsp_size = layout.rsp_size
        self.entry_size = layout.entry_size
        self.nr_ents = layout.nr_ents(len(view))  # RING_SIZE
        self._mask = self.nr_ents - 1
        self.broken: str | None = None  # why the peer broke the ring, once it has
        self.stats = REGISTRY.ring(layout.name, self._END)  # shared per protocol and end

    def _break(self, reason: str) -> RingError:
        self.broken = reason
        return RingError(reason)

    def _copy_out(self, first: int, count: int, size: int) -> list[bytes]:
        """Copies of `count` entries (their first `size` bytes) from index `first` on."""
        view, mask, entry_size = self._view, self._mask, self.entry_size
        if not count:
            return []
        # One copy of each contiguous stretch of slots (two if it wraps), then the entries
        # are sliced out of that private copy: the shared page is read once, in bulk.
        start = first & mask
        head = min(count, self.nr_ents - start)
        offset = SRING_HEADER_SIZE + start * entry_size
        blob = bytes(view[offset : offset + head * entry_size])
        if head < count:
            blob += bytes(view[SRING_HEADER_SIZE : SRING_HEADER_SIZE + (count - head) * entry_size])
        return [blob[at : at + size] for at in range(0, count * entry_size, entry_size)]

    def _put_run(self, first: int, entries: Sequence[bytes], limit: int, what: str) -> None:
        """Write `entries` (each at most `limit` bytes) into consecutive slots from index
        `first`. Each stretch of bytes written without a gap is reported to `written` once
        (a memory barrier on the shared-memory transport, ~1 µs), and only bytes actually
        written are reported: a shorter entry (an 8-byte extra in a 12-byte tx slot, a 4-byte
        tx response) ends its stretch. When every entry fills its slot, each contiguous run
        is also stored with one slice assignment."""
        view, mask, entry_size, written = self._view, self._mask, self.entry_size, self._written
        count = len(entries)
        if limit == entry_size and count:
            blob = b"".join(entries)
            if len(blob) == count * entry_size:  # every entry fills its slot
                # Fast path: one slice store (and one `written`) per contiguous run.
                start = first & mask
                head = min(count, self.nr_ents - start) * entry_size
                offset = SRING_HEADER_SIZE + start * entry_size
                whole = memoryview(blob)
                view[offset : offset + head] = whole[:head]
                written(offset, head)
                if head < len(blob):  # wrapped round to slot 0
                    rest = len(blob) - head
                    view[SRING_HEADER_SIZE : SRING_HEADER_SIZE + rest] = whole[head:]
                    written(SRING_HEADER_SIZE, rest)
                return
        for data in entries:  # all or none: check every size before writing any
            if len(data) > limit:
                raise RingUsageError(f"{len(data)}-byte {what} does not fit a {limit}-byte slot")
        run_start = run_end = -1  # the stretch written since the last `written` call
        for index, data in enumerate(entries, first):
            offset = SRING_HEADER_SIZE + (index & mask) * entry_size
            size = len(data)
            view[offset : offset + size] = data
            if offset == run_end:  # the previous entry filled its slot: no gap
                run_end += size
                continue
            if run_start >= 0:
                written(run_start, run_end - run_start)
            run_start, run_end = offset, offset + size
        if run_start >= 0:
            written(run_start, run_end - run_start)

    def slot(self, index: int) -> memoryview:
        """The shared bytes of slot `index` (for a hostile peer; drivers copy entries out)."""
        offset = SRING_HEADER_SIZE + (index & self._mask) * self.entry_size
        return self._view[offset : offset + self.entry_size]

    def publish(self, offset: int, length: int) -> None:
        """Report bytes a hostile peer rewrote in the shared page (`SharedBuffer.written`)."""
        self._written(offset, length)

    def _push(self, prod: int, event: int, new: int) -> bool:
        """RING_PUSH_*_AND_CHECK_NOTIFY on the header's `prod` / `event` uint32 fields."""
        idx = self._idx
        old = idx[prod]
        idx[prod] = new
        self._written(4 * prod, 4)
        stats = self.stats
        stats.pushes += 1
        stats.produced += (new - old) & RING_IDX_MASK
        if (new - idx[event]) & RING_IDX_MASK < (new - old) & RING_IDX_MASK:
            stats.notify_needed += 1
            return True
        if new != old:
            stats.notify_avoided += 1
        return False


class FrontRing(_Ring):
    """The front end: puts requests, takes responses.

    `FrontRing(buffer, layout)` is `XEN_FRONT_RING_INIT` (initialises the shared header too).
    `attach=True` is `FRONT_RING_ATTACH(index)` and leaves the shared header alone; without an
    index it attaches at the shared `req_prod`, which is only consistent on a quiescent ring
    (req_prod == rsp_prod), so anything else is a `RingError`.
    """

    __slots__ = ("_rsp_prod_seen", "req_prod_pvt", "rsp_cons")
    _END = "front"

    def __init__(
        self,
        buffer: SharedBuffer,
        layout: RingLayout,
        *,
        attach: bool = False,
        index: int | None = None,
    ) -> None:
        super().__init__(buffer, layout)
        if not attach:
            if index is not None:
                raise RingUsageError("index= only makes sense with attach=True")
            shared_ring_init(buffer)
            index = 0
        elif index is None:
            req_prod, _, rsp_prod, _ = shared_indexes(buffer)
            if req_prod != rsp_prod:
                raise self._break(
                    f"cannot attach a front to a busy ring (req_prod {req_prod}, "
                    f"rsp_prod {rsp_prod})"
                )
            index = req_prod
        index &= RING_IDX_MASK
        self.req_prod_pvt = index
        self.rsp_cons = index
        self._rsp_prod_seen = index  # a validated rsp_prod: responses below it are takeable

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & RING_IDX_MASK)

    def full(self) -> bool:
        """RING_FULL."""
        return (self.req_prod_pvt - self.rsp_cons) & RING_IDX_MASK >= self.nr_ents

    def put_request(self, data: bytes | bytearray | memoryview) -> None:
        """Write one request (at most `layout.req_size` bytes) at `req_prod_pvt`, unpushed."""
        if self.broken is not None:
            raise RingError(self.broken)
        index = self.req_prod_pvt
        if (index - self.rsp_cons) & RING_IDX_MASK >= self.nr_ents:
            raise RingUsageError(f"{self.layout.name} ring full ({self.nr_ents} requests)")
        size = len(data)
        if size > self._req_size:
            raise RingUsageError(
                f"{size}-byte request does not fit a {self.layout.req_size}-byte slot"
            )
        offset = SRING_HEADER_SIZE + (index & self._mask) * self.entry_size
        self._view[offset : offset + size] = data
        self._written(offset, size)
        self.req_prod_pvt = (index + 1) & RING_IDX_MASK

    def put_requests(self, entries: Sequence[bytes]) -> None:
        """`put_request` for several requests in order (unpushed); all or none are put."""
        if self.broken is not None:
            raise RingError(self.broken)
        index = self.req_prod_pvt
        count = len(entries)
        if (index - self.rsp_cons) & RING_IDX_MASK > self.nr_ents - count:
            raise RingUsageError(
                f"{self.layout.name} ring: no room for {count} requests ({self.nr_ents} slots)"
            )
        self._put_run(index, entries, self._req_size, "request")
        self.req_prod_pvt = (index + count) & RING_IDX_MASK

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish req_prod; True = notify the back."""
        if self.broken is not None:
            raise RingError(self.broken)
        if self.tamper is not None:
            verdict = self.tamper.front_push(self)
            if verdict is not None:
                return verdict
        return self._push(_REQ_PROD, _REQ_EVENT, self.req_prod_pvt)

    def published_requests(self) -> int:
        """The shared `req_prod` (what the back sees; a hostile frontend compares it)."""
        return int(self._idx[_REQ_PROD])

    def corrupt_prod(self, offset: int) -> None:
        """A hostile frontend: publish a `req_prod` `offset` past `req_prod_pvt` (then notify)."""
        self._idx[_REQ_PROD] = (self.req_prod_pvt + offset) & RING_IDX_MASK
        self._written(OFF_REQ_PROD, 4)

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES (the count), validating the back's rsp_prod."""
        if self.broken is not None:
            raise RingError(self.broken)
        rsp_prod = self._idx[_RSP_PROD]
        cons = self.rsp_cons
        available = (rsp_prod - cons) & RING_IDX_MASK
        outstanding = (self.req_prod_pvt - cons) & RING_IDX_MASK
        if available > outstanding:
            raise self._break(
                f"{self.layout.name} ring: illegal number of responses: rsp_prod {rsp_prod} is "
                f"{available} ahead of rsp_cons {cons}, only {outstanding} requests outstanding"
            )
        self._rsp_prod_seen = rsp_prod
        return available

    def take_response(self) -> bytes | None:
        """Copy out the response at `rsp_cons` and advance, or None if there is none."""
        cons = self.rsp_cons
        if (
            cons == self._rsp_prod_seen or self.broken is not None
        ) and not self.unconsumed_responses():
            return None
        offset = SRING_HEADER_SIZE + (cons & self._mask) * self.entry_size
        data = bytes(self._view[offset : offset + self._rsp_size])
        self.rsp_cons = (cons + 1) & RING_IDX_MASK
        return data

    def take_responses(self, limit: int | None = None) -> list[bytes]:
        """Copy out every available response (at most `limit`), in order, and advance."""
        count = self.unconsumed_responses()
        if limit is not None:
            count = min(count, limit)
        taken = self._copy_out(self.rsp_cons, count, self._rsp_size)
        self.rsp_cons = (self.rsp_cons + count) & RING_IDX_MASK
        return taken

    def final_check_for_responses(self, ahead: int = 1) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: re-arm rsp_event, re-check; True = more work.

        `ahead` > 1 asks to be notified only once that many more responses are pushed
        (rsp_event = rsp_cons + ahead, as virtio's delayed callbacks do); it must not exceed
        the requests outstanding, or no notification comes."""
        if self.unconsumed_responses():
            return True
        self._idx[_RSP_EVENT] = (self.rsp_cons + ahead) & RING_IDX_MASK
        self._written(OFF_RSP_EVENT, 4)
        return self.unconsumed_responses() > 0


class BackRing(_Ring):
    """The back end: takes requests, puts responses.

    `BackRing(buffer, layout)` is `BACK_RING_INIT` (index 0, shared header untouched).
    `attach=True` is `BACK_RING_ATTACH(index)`; without an index it does what Linux blkback
    does when a backend (re)connects to a live ring: attach at the shared `rsp_prod`, so the
    requests between `rsp_prod` and `req_prod` are consumed again, and refuse (`RingError`)
    a ring whose `req_prod` is more than a ring ahead.
    """

    __slots__ = ("_req_prod_seen", "req_cons", "rsp_prod_pvt")
    _END = "back"

    def __init__(
        self,
        buffer: SharedBuffer,
        layout: RingLayout,
        *,
        attach: bool = False,
        index: int | None = None,
    ) -> None:
        super().__init__(buffer, layout)
        if not attach:
            if index is not None:
                raise RingUsageError("index= only makes sense with attach=True")
            index = 0
        elif index is None:
            index = shared_indexes(buffer)[2]
        index &= RING_IDX_MASK
        self.rsp_prod_pvt = index
        self.req_cons = index
        self._req_prod_seen = index  # a validated req_prod: requests below it are takeable
        if attach:
            self.unconsumed_requests()  # validate what we attached to

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS (the count), validating the front's req_prod."""
        if self.broken is not None:
            raise RingError(self.broken)
        req_prod = self._idx[_REQ_PROD]
        answered = self.rsp_prod_pvt
        ahead = (req_prod - answered) & RING_IDX_MASK
        consumed = (self.req_cons - answered) & RING_IDX_MASK
        if ahead > self.nr_ents:  # RING_REQUEST_PROD_OVERFLOW
            raise self._break(
                f"{self.layout.name} ring: bogus ring requests: req_prod {req_prod} is {ahead} "
                f"ahead of rsp_prod_pvt {answered} on a {self.nr_ents}-entry ring"
            )
        if ahead < consumed:
            raise self._break(
                f"{self.layout.name} ring: req_prod {req_prod} moved behind req_cons "
                f"{self.req_cons}"
            )
        self._req_prod_seen = req_prod
        # XEN_RING_NR_UNCONSUMED_REQUESTS: min(req, rsp); after the checks above req <= rsp.
        return min(ahead - consumed, self.nr_ents - consumed)

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW: would consuming at `cons` overrun unanswered requests?"""
        return (cons - self.rsp_prod_pvt) & RING_IDX_MASK >= self.nr_ents

    def take_request(self) -> bytes | None:
        """Copy out the request at `req_cons` and advance, or None if there is none."""
        cons = self.req_cons
        if (
            cons == self._req_prod_seen or self.broken is not None
        ) and not self.unconsumed_requests():
            return None
        offset = SRING_HEADER_SIZE + (cons & self._mask) * self.entry_size
        data = bytes(self._view[offset : offset + self._req_size])
        self.req_cons = (cons + 1) & RING_IDX_MASK
        if self.tamper is not None:
            self.tamper.back_taken(self, cons, 1)
        return data

    def take_requests(self, limit: int | None = None) -> list[bytes]:
        """Copy out every available request (at most `limit`), in order, and advance."""
        count = self.unconsumed_requests()
        if limit is not None:
            count = min(count, limit)
        first = self.req_cons
        taken = self._copy_out(first, count, self._req_size)
        self.req_cons = (first + count) & RING_IDX_MASK
        if self.tamper is not None and count:
            self.tamper.back_taken(self, first, count)
        return taken

    def peek_requests(self, count: int) -> list[bytes]:
        """Copies of the next `count` unconsumed requests, without consuming them (a parser
        that takes a whole batch in one copy, then `consume_requests` as it goes)."""
        if count > self.unconsumed_requests():
            raise RingUsageError(f"{self.layout.name} ring: fewer than {count} requests to peek")
        return self._copy_out(self.req_cons, count, self._req_size)

    def consume_requests(self, count: int) -> None:
        """Advance `req_cons` over `count` requests already read (with `peek_requests`)."""
        if self.broken is not None:
            raise RingError(self.broken)
        if not 0 <= count <= (self._req_prod_seen - self.req_cons) & RING_IDX_MASK:
            raise RingUsageError(f"{self.layout.name} ring: cannot consume {count} requests")
        self.req_cons = (self.req_cons + count) & RING_IDX_MASK

    def put_response(self, data: bytes | bytearray | memoryview) -> None:
        """Write one response (at most `layout.rsp_size` bytes) at `rsp_prod_pvt`, unpushed.

        Responses overwrite the slots of consumed requests, so there must be a consumed,
        unanswered request.
        """
        if self.broken is not None:
            raise RingError(self.broken)
        index = self.rsp_prod_pvt
        if index == self.req_cons:
            raise RingUsageError(f"{self.layout.name} ring: no consumed request to answer")
        size = len(data)
        if size > self._rsp_size:
            raise RingUsageError(
                f"{size}-byte response does not fit a {self.layout.rsp_size}-byte slot"
            )
        offset = SRING_HEADER_SIZE + (index & self._mask) * self.entry_size
        self._view[offset : offset + size] = data
        self._written(offset, size)
        self.rsp_prod_pvt = (index + 1) & RING_IDX_MASK

    def put_responses(self, entries: Sequence[bytes]) -> None:
        """`put_response` for several responses in order (unpushed); all or none are put.

        There must be as many consumed, unanswered requests."""
        if self.broken is not None:
            raise RingError(self.broken)
        index = self.rsp_prod_pvt
        count = len(entries)
        if (self.req_cons - index) & RING_IDX_MASK < count:
            raise RingUsageError(
                f"{self.layout.name} ring: {count} responses for "
                f"{(self.req_cons - index) & RING_IDX_MASK} consumed requests"
            )
        self._put_run(index, entries, self._rsp_size, "response")
        self.rsp_prod_pvt = (index + count) & RING_IDX_MASK

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish rsp_prod; True = notify the front."""
        if self.broken is not None:
            raise RingError(self.broken)
        if self.tamper is not None:
            verdict = self.tamper.back_push(self)
            if verdict is not None:
                return verdict
        return self._push(_RSP_PROD, _RSP_EVENT, self.rsp_prod_pvt)

    def published_responses(self) -> int:
        """The shared `rsp_prod` (what the front sees; a hostile backend compares it)."""
        return int(self._idx[_RSP_PROD])

    def corrupt_rsp_prod(self, offset: int) -> None:
        """A hostile backend: publish an `rsp_prod` `offset` past its private one, i.e.
        responses for requests it never consumed (its consumer index run past the front's
        producer index)."""
        self._idx[_RSP_PROD] = (self.rsp_prod_pvt + offset) & RING_IDX_MASK
        self._written(OFF_RSP_PROD, 4)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, re-check; True = more work."""
        if self.unconsumed_requests():
            return True
        self.set_request_event(1)
        return self.unconsumed_requests() > 0

    def set_request_event(self, ahead: int) -> None:
        """Ask to be notified once the front has produced `ahead` requests past `req_cons`
        (netback waiting for enough rx buffers: `req_event = req_cons + needed`)."""
        self._idx[_REQ_EVENT] = (self.req_cons + ahead) & RING_IDX_MASK
        self._written(OFF_REQ_EVENT, 4)
