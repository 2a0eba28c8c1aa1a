"""The sans-IO netfront: what goes on the tx and rx rings, and what comes back.

`TxCore` turns a frame into tx slots the way Linux netfront's `xennet_start_xmit` does: the
frame is cut at every granule boundary (4 KiB baseline, never crossing one), the first slot's
`size` is the whole packet, NETTXF_more_data chains the fragments, a GSO frame gets an
extra-info slot right after the first request (NETTXF_extra_info), and a partial checksum is
NETTXF_csum_blank | NETTXF_data_validated. Every data slot has its own id (0..ring size - 1):
it names the granule of the per-queue tx arena that holds the fragment, so a free id is always
a free buffer. `collect()` matches responses to ids (skipping NETIF_RSP_NULL, the answers to
extra-info slots) and hands back the grant references to end.

`RxCore` keeps every rx ring slot posted with a buffer (`xennet_alloc_rx_buffers`): request
`i` uses buffer `i & (size - 1)`, and since netback answers rx requests in ring order, the
response at index `i` is about that same buffer (Linux reads it by index too). `take()`
reassembles NETRXF_more_data chains and their extra-info slots into `RxFrame`s. A packet that
breaks a rule (error status, a fragment outside its granule, a response id that is not its
slot's, a bad extra, more than `MAX_RX_SLOTS` fragments) is dropped whole and counted, as
`xennet_get_responses` does; its slots are still consumed and reposted. Unlike Linux, a chain
cut short by the end of the pushed responses is kept until the rest arrives (Linux drops it
with "Need more slots"): a backend may legally push mid-packet.

Ring-level violations (more responses than requests, an unknown tx id) raise `RingError` /
`NetfrontProtocolError`: the queue is unusable until the next connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from xenpv.abi.errors import NetifError, RingUsageError
from xenpv.abi.netif import (
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    RX_REQUEST,
    RX_RESPONSE,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_MAX_TX_SIZE,
    XEN_NETIF_NR_SLOTS_MIN,
    NetifGsoExtra,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    decode_extra,
    encode_extra,
)
from xenpv.abi.ring import FrontRing
from xenpv.errors import XenpvError
from xenpv.metrics.counters import NetfrontStats

# Plain ints on the hot paths: IntFlag arithmetic costs a few microseconds per operation.
_TXF_CSUM_BLANK: Final = int(NETTXF_csum_blank)
_TXF_DATA_VALIDATED: Final = int(NETTXF_data_validated)
_TXF_MORE_DATA: Final = int(NETTXF_more_data)
_TXF_EXTRA_INFO: Final = int(NETTXF_extra_info)
_RXF_DATA_VALIDATED: Final = int(NETRXF_data_validated)
_RXF_CSUM_BLANK: Final = int(NETRXF_csum_blank)
_RXF_MORE_DATA: Final = int(NETRXF_more_data)
_RXF_EXTRA_INFO: Final = int(NETRXF_extra_info)
_RSP_NULL: Final = int(NETIF_RSP_NULL)
_RSP_OKAY: Final = int(NETIF_RSP_OKAY)

# xennet_get_responses: XEN_NETIF_NR_SLOTS_MIN fragments, one more for a small first slot.
MAX_RX_SLOTS: Final = XEN_NETIF_NR_SLOTS_MIN + 1
# netback accepts up to XEN_NETIF_NR_SLOTS_MIN data slots per tx packet without complaint.
MAX_TX_SLOTS: Final = XEN_NETIF_NR_SLOTS_MIN


class NetfrontError(XenpvError):
    """A caller asked netfront for something impossible (frame too large, offload not offered)."""


class NetfrontProtocolError(XenpvError):
    """The backend broke the netif protocol on a ring: the queue stops until reconnection."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """One connection's parameters: what the backend offered and what this frontend chose."""

    mac: str
    queues: int
    split_event_channels: bool
    sg: bool
    gso_tcpv4: bool
    gso_tcpv6: bool
    ipv6_csum_offload: bool
    rx_copy: bool
    grant_size: int  # the negotiated grant granule in bytes
    granule_order: int
    backend_max_granule_order: int | None  # None: the backend has no granule extension
    granule_fallback: str | None  # why 4 KiB grants are forced from now on, if they are
    page_size: int
    backend_id: int
    generation: int  # connections so far, this one included

    def summary(self) -> dict[str, Any]:
        """The connection as plain values (int, bool, str or None), for logs and reports."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class RxFrame:
    """A received frame and its offload metadata (`csum_blank`: the checksum is partial and
    must be completed, `data_validated`: already verified; `gso`: a TCP segmentation request)."""

    frame: bytes
    gso: NetifGsoExtra | None = None
    csum_blank: bool = False
    data_validated: bool = False
    queue: int = 0


# Why an rx packet is dropped (the first rule it broke): which counter it goes to.
_BAD_EXTRA: Final = 1
_BAD_OFFSET: Final = 2
_BAD_ID: Final = 3
_BAD_STATUS: Final = 4
_TOO_MANY_SLOTS: Final = 5


def split(offset: int, length: int, granule: int) -> list[tuple[int, int, int]]:
    """Cut `length` bytes starting `offset` bytes into a buffer of granules into pieces that
    never cross a granule boundary: (granule index, offset inside it, size) each."""
    if length <= 0:
        raise NetfrontError(f"cannot split {length} bytes")
    if offset == 0:  # every frame netfront sends: whole granules, then the rest
        full, rest = divmod(length, granule)
        pieces = [(index, 0, granule) for index in range(full)]
        if rest:
            pieces.append((full, 0, rest))
        return pieces
    pieces = []
    position = offset
    end = offset + length
    while position < end:
        index, inside = divmod(position, granule)
        size = min(granule - inside, end - position)
        pieces.append((index, inside, size))
        position += size
    return pieces


def check_gso(gso: NetifGsoExtra | None, length: int) -> None:
    if gso is None:
        return
    if gso.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
        raise NetfrontError(f"GSO type {gso.gso_type} is not TCPv4/TCPv6")
    if not 0 < gso.size <= 0xFFFF:
        raise NetfrontError(f"GSO segment size {gso.size} not in 1..65535")


class TxCore:
    """Slots, ids and responses of one tx ring."""

    __slots__ = ("_free", "_grefs", "_heads", "counters", "granule", "nr_ids", "ring")

    def __init__(
        self,
        ring: FrontRing,
        granule: int,
        nr_ids: int | None = None,
        counters: NetfrontStats | None = None,
    ) -> None:
        """`nr_ids`: how many tx ids (arena granules) to use, at most the ring size (default);
        fewer bounds the tx arena when granules are large (docs/net.md, "Grant granules").
        `counters`: the queue's record, kept across connections (docs/metrics.md)."""
        if nr_ids is None:
            nr_ids = ring.nr_ents
        if not MAX_TX_SLOTS <= nr_ids <= ring.nr_ents:
            raise RingUsageError(f"{nr_ids} tx ids: need {MAX_TX_SLOTS}..{ring.nr_ents}")
        self.ring = ring
        self.granule = granule
        self.nr_ids = nr_ids
        self._free = list(range(nr_ids - 1, -1, -1))  # a stack: low ids first
        self._grefs: list[int | None] = [None] * ring.nr_ents
        self._heads = bytearray(ring.nr_ents)  # 1: the id of a packet's first slot
        self.counters = counters if counters is not None else NetfrontStats()

    def plan(self, length: int, gso: NetifGsoExtra | None) -> list[tuple[int, int, int]]:
        """The fragments (granule index, offset, size) of a `length`-byte frame, validated."""
        if not 0 < length <= XEN_NETIF_MAX_TX_SIZE:
            raise NetfrontError(
                f"a {length}-byte frame does not fit netif (1..{XEN_NETIF_MAX_TX_SIZE} bytes)"
            )
        check_gso(gso, length)
        pieces = split(0, length, self.granule)
        if len(pieces) > MAX_TX_SLOTS:  # cannot happen at offset 0; kept as a guard
            raise NetfrontError(f"{len(pieces)} tx slots for one frame (max {MAX_TX_SLOTS})")
        return pieces

    def room(self, data_slots: int, gso: bool) -> bool:
        """Whether a packet of `data_slots` fragments (+ a GSO extra) fits right now."""
        return len(self._free) >= data_slots and self.ring.free_requests() >= data_slots + gso

    def in_flight(self) -> int:
        """Data slots in flight."""
        return self.nr_ids - len(self._free)

    def packets_in_flight(self) -> int:
        return sum(self._heads)

    def alloc_ids(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RingUsageError(f"{count} tx ids wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def put_packet(
        self,
        ids: Sequence[int],
        grefs: Sequence[int],
        pieces: Sequence[tuple[int, int, int]],
        *,
        gso: NetifGsoExtra | None = None,
        csum_blank: bool = False,
        data_validated: bool = False,
    ) -> None:
        """Put one packet's slots (unpushed). `pieces[i]` (offset, size) lives in grant
        `grefs[i]` under id `ids[i]`."""
        if not (len(ids) == len(grefs) == len(pieces)) or not ids:
            raise RingUsageError("one id and one grant per fragment")
        if self.ring.free_requests() < len(ids) + (gso is not None):
            raise RingUsageError("tx ring has no room for this packet")
        total = sum(size for _i, _o, size in pieces)
        flags = 0
        if csum_blank:
            flags = _TXF_CSUM_BLANK | _TXF_DATA_VALIDATED
        elif data_validated:
            flags = _TXF_DATA_VALIDATED
        last = len(ids) - 1
        entries: list[bytes] = []
        put = entries.append
        pack = TX_REQUEST.pack
        grefs_by_id = self._grefs
        heads = self._heads
        for i, (slot_id, gref, (_index, offset, size)) in enumerate(
            zip(ids, grefs, pieces, strict=True)
        ):
            slot_flags = _TXF_MORE_DATA if i < last else 0
            if i == 0:
                slot_flags |= flags | (_TXF_EXTRA_INFO if gso is not None else 0)
                put(pack(gref, offset, slot_flags, slot_id, total))
                heads[slot_id] = 1
            else:
                put(pack(gref, offset, slot_flags, slot_id, size))
                heads[slot_id] = 0
            grefs_by_id[slot_id] = gref
            if i == 0 and gso is not None:
                put(encode_extra(NetifGsoExtra(gso.size, gso.gso_type, gso.features, 0)))
        self.ring.put_requests(entries)  # the whole packet in one ring write
        counters = self.counters
        counters.tx_packets += 1
        counters.tx_bytes += total
        counters.tx_slots += len(entries)

    def push(self) -> bool:
        """Publish the slots put so far; True = notify the backend."""
        return self.ring.push_requests()

    def collect(self) -> list[int]:
        """Consume the responses available; the grant references of finished slots.

        Raises `NetfrontProtocolError` for a response to an id that is not in flight (Linux:
        "Response has incorrect id"), `RingError` for an impossible rsp_prod.
        """
        done: list[int] = []
        freed: list[int] = []
        grefs = self._grefs
        unpack = TX_RESPONSE.unpack_from
        for data in self.ring.take_responses():
            slot_id, status = unpack(data)
            if status == _RSP_NULL:
                continue  # the answer to an extra-info slot
            gref = grefs[slot_id] if slot_id < len(grefs) else None
            if gref is None:
                raise NetfrontProtocolError(f"tx response for id {slot_id}, which is not in flight")
            grefs[slot_id] = None
            self._heads[slot_id] = 0
            freed.append(slot_id)
            if status != _RSP_OKAY:
                self.counters.tx_errors += 1
            done.append(gref)
        # Reversed onto the stack, so ids freed in order are handed out again in the same
        # order: a packet gets consecutive ids, i.e. one contiguous stretch of the tx arena.
        self._free.extend(reversed(freed))
        return done

    def abandon(self) -> list[int]:
        """Forget every slot in flight (the connection is gone); their grant references."""
        grefs = [g for g in self._grefs if g is not None]
        self.counters.tx_dropped += sum(self._heads)
        self._heads = bytearray(self.ring.nr_ents)
        self._grefs = [None] * self.ring.nr_ents
        self._free = list(range(self.nr_ids - 1, -1, -1))
        return grefs


class RxCore:
    """Buffers, reassembly and refill of one rx ring."""

    __slots__ = (
        "_buffers",
        "_ended",
        "_extra_slots",
        "_extras",
        "_failed",
        "_flags",
        "_fragments",
        "_grefs",
        "_gso",
        "_in_packet",
        "_slots",
        "counters",
        "granule",
        "queue",
        "ring",
    )

    def __init__(
        self,
        ring: FrontRing,
        buffers: Sequence[memoryview],
        grefs: Sequence[int],
        granule: int,
        queue: int = 0,
        counters: NetfrontStats | None = None,
    ) -> None:
        if len(buffers) != ring.nr_ents or len(grefs) != ring.nr_ents:
            raise RingUsageError(f"need {ring.nr_ents} rx buffers and grants")
        self.ring = ring
        self._buffers = list(buffers)
        self._grefs = list(grefs)
        self.granule = granule
        self.queue = queue
        self.counters = counters if counters is not None else NetfrontStats()
        self._reset_packet()

    def _reset_packet(self) -> None:
        self._in_packet = False
        self._ended = False
        self._extras = False
        # Views into the rx buffers while a packet completes within one take(); copied out
        # before take() returns, since the buffers are then posted again.
        self._fragments: list[bytes | memoryview] = []
        self._flags = 0
        self._gso: NetifGsoExtra | None = None
        self._failed = 0  # why the packet is dropped (_BAD_*), 0: it is not
        self._slots = 0
        self._extra_slots = 0

    def post(self) -> bool:
        """Fill every free ring slot with its buffer and push; True = notify the backend."""
        ring = self.ring
        mask = ring.nr_ents - 1
        free = ring.free_requests()
        if not free:
            return False
        pack = RX_REQUEST.pack
        grefs = self._grefs
        first = ring.req_prod_pvt
        ring.put_requests(
            [pack(slot_id, grefs[slot_id]) for slot_id in ((first + n) & mask for n in range(free))]
        )
        return ring.push_requests()

    def take(self, emit: Callable[[RxFrame], None]) -> int:
        """Consume the available responses, calling `emit` for each complete good frame.

        Returns the number of responses consumed (their slots are free to `post` again).
        """
        ring = self.ring
        mask = ring.nr_ents - 1
        index = ring.rsp_cons
        responses = ring.take_responses()
        for data in responses:
            self._one(index & mask, data, emit)
            index += 1
        if self._fragments:  # a chain continues in a later push: keep copies, not views
            self._fragments = [bytes(f) for f in self._fragments]
        return len(responses)

    def _fail(self, reason: int) -> None:
        if not self._failed:
            self._failed = reason

    def _one(self, slot: int, data: bytes, emit: Callable[[RxFrame], None]) -> None:
        if self._extras:
            self._extra_slots += 1
            try:
                extra = decode_extra(data)
            except NetifError:
                self._fail(_BAD_EXTRA)
                self._extras = False  # cannot trust its MORE flag: the chain decides
                if self._ended:
                    self._finish(emit)
                return
            if isinstance(extra, NetifGsoExtra):
                self._gso = NetifGsoExtra(extra.size, extra.gso_type, extra.features)
            self._extras = bool(extra.flags & XEN_NETIF_EXTRA_FLAG_MORE)
            if self._ended and not self._extras:
                self._finish(emit)
            return
        first = not self._in_packet
        slot_id, offset, flags, status = RX_RESPONSE.unpack_from(data)
        if status > 0 and offset + status > self.granule:
            self._fail(_BAD_OFFSET)  # the fragment crosses its granule
        self._in_packet = True
        self._slots += 1
        if first:
            self._flags = flags
            if flags & _RXF_EXTRA_INFO:
                self._extras = True
        if slot_id != slot:
            self._fail(_BAD_ID)
        elif status < 0:
            self._fail(_BAD_STATUS)
        elif self._slots > MAX_RX_SLOTS:
            self._fail(_TOO_MANY_SLOTS)
        elif not self._failed and status:
            self._fragments.append(self._buffers[slot][offset : offset + status])
        if flags & _RXF_MORE_DATA:
            return
        self._ended = True
        if not self._extras:  # the extras of a one-slot packet follow its only response
            self._finish(emit)

    def _finish(self, emit: Callable[[RxFrame], None]) -> None:
        counters = self.counters
        failed = self._failed
        if failed:
            counters.rx_errors += 1
            if failed == _BAD_EXTRA:
                counters.rx_bad_extra += 1
            elif failed == _BAD_OFFSET:
                counters.rx_bad_offset += 1
            elif failed == _BAD_ID:
                counters.rx_bad_id += 1
            elif failed == _BAD_STATUS:
                counters.rx_bad_status += 1
            else:
                counters.rx_too_many_slots += 1
        else:
            fragments = self._fragments
            frame = bytes(fragments[0]) if len(fragments) == 1 else b"".join(fragments)
            if not frame:
                counters.rx_errors += 1
                counters.rx_empty += 1
            else:
                counters.rx_packets += 1
                counters.rx_bytes += len(frame)
                counters.rx_slots += self._slots + self._extra_slots
                flags = self._flags
                emit(
                    RxFrame(
                        frame,
                        self._gso,
                        bool(flags & _RXF_CSUM_BLANK),
                        bool(flags & _RXF_DATA_VALIDATED),
                        self.queue,
                    )
                )
        self._reset_packet()

    def pending_partial(self) -> bool:
        """A packet's chain has started but not ended (more responses must follow)."""
        return self._in_packet or self._extras
