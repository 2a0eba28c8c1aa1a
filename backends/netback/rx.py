"""The guest-receive half of a netback queue, sans-IO: frames in, rx responses out.

Modelled on Linux netback's rx.c (the "always fully coalesce" rx path, 4.11+):
- a frame needs `ceil(len / capacity)` rx requests, plus one per extra-info slot (GSO); it is
  only started when that many requests are posted (`xenvif_rx_ring_slots_available`);
- each data slot receives up to `capacity` = min(granule, 32767) bytes at offset 0 of the
  posted buffer (a response's status is an int16_t: with 64 KiB granules a slot carries at most
  32767 bytes, docs/granule-extension.md); every slot but
  the last has NETRXF_more_data; the first carries the checksum flags, and NETRXF_extra_info
  when extras follow; extras go in the slot(s) right after the first data slot
  ("Extras must go after the first data slot"); responses sit at the index of the request
  they consume, so an extra's response simply replaces its request;
- a data slot's status is its length; when its grant copy fails the status is overwritten with
  the (negative) GNTST code, as `xenvif_rx_copy_flush` does, and the frontend drops the packet;
- without `feature-sg` a frame must fit in one slot; frames that do not are dropped and
  counted (Linux caps the vif's MTU instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import RingError, RingUsageError
from xenpv.abi.netif import (
    RX_REQUEST,
    RX_RESPONSE,
    NetifGsoExtra,
    NETRXF_extra_info,
    NETRXF_more_data,
    encode_extra,
)
from xenpv.abi.ring import BackRing
from xenpv.errors import XenpvError
from xenpv.granule import NETIF_RX_STATUS_MAX
from xenpv.metrics.counters import NetbackStats

# Plain ints on the per-slot path: IntFlag `|` costs about a microsecond per operation.
_RXF_EXTRA_INFO: Final = int(NETRXF_extra_info)
_RXF_MORE_DATA: Final = int(NETRXF_more_data)
_GNTST_OKAY: Final = 0


class RxFatal(XenpvError):
    """The frontend broke the rx ring (an impossible req_prod)."""


@dataclass(slots=True)
class RxFrame:
    """A frame ready for the guest: bytes plus what goes in its first response / extras."""

    data: bytes | bytearray  # a bytearray is never written again once sent (switch.Frame)
    flags: int  # NETRXF_csum_blank / NETRXF_data_validated
    gso: NetifGsoExtra | None = None


@dataclass(slots=True)
class RxSegment:
    """Copy frame[`at`:`at`+`length`] to offset 0 of grant `gref`; answer slot `slot`."""

    gref: int
    at: int
    length: int
    slot: int  # index into RxPlacement.responses


@dataclass(slots=True)
class RxPlacement:
    """A frame whose rx requests are consumed; `responses` are put by `RxCore.complete`."""

    frame: RxFrame
    responses: list[bytes]
    segments: list[RxSegment]


class RxCore:
    """The rx ring of one queue. Single-threaded: the trio layer owns it."""

    def __init__(
        self,
        ring: BackRing,
        *,
        can_sg: bool,
        granule: int = XEN_PAGE_SIZE,
        counters: NetbackStats | None = None,
    ) -> None:
        """`counters`: the queue's record, shared with its TxCore (docs/metrics.md)."""
        self.ring = ring
        self.can_sg = can_sg
        self.granule = granule  # the negotiated grant size (4 KiB baseline)
        self.capacity = min(granule, NETIF_RX_STATUS_MAX)  # bytes per data slot
        self.counters = counters if counters is not None else NetbackStats()

    def slots_needed(self, frame: RxFrame) -> int:
        data = max(1, -(-len(frame.data) // self.capacity))
        return data + (1 if frame.gso is not None else 0)

    def fits_ever(self, frame: RxFrame) -> bool:
        """Can this frame be delivered at all (ring size, feature-sg)?"""
        needed = self.slots_needed(frame)
        data_slots = needed - (1 if frame.gso is not None else 0)
        return needed <= self.ring.nr_ents and (self.can_sg or data_slots == 1)

    def available(self) -> int:
        """Posted rx requests not consumed yet. Raises RxFatal on a broken ring."""
        try:
            return self.ring.unconsumed_requests()
        except RingError as exc:
            raise RxFatal(str(exc)) from None

    def place(self, frame: RxFrame) -> RxPlacement:
        """Consume the requests for `frame` (the caller checked `available()` first)."""
        ring = self.ring
        needed = self.slots_needed(frame)
        try:
            raws = ring.peek_requests(needed)  # one copy of the frame's requests
            ring.consume_requests(needed)
        except RingUsageError:
            raise RxFatal("rx requests vanished while placing a frame") from None
        except RingError as exc:
            raise RxFatal(str(exc)) from None
        unpack_request = RX_REQUEST.unpack
        pack_response = RX_RESPONSE.pack
        data = frame.data
        total = len(data)
        capacity = self.capacity
        gso = frame.gso
        responses: list[bytes] = []
        segments: list[RxSegment] = []
        at = 0
        for slot, raw in enumerate(raws):
            if slot == 1 and gso is not None:  # "Extras must go after the first data slot"
                responses.append(encode_extra(gso))
                continue
            request_id, gref = unpack_request(raw)  # struct netif_rx_request
            length = min(capacity, total - at)
            flags = 0
            if slot == 0:
                flags = frame.flags | (_RXF_EXTRA_INFO if gso is not None else 0)
            if at + length < total:
                flags |= _RXF_MORE_DATA
            segments.append(RxSegment(gref, at, length, slot))
            responses.append(pack_response(request_id, 0, flags, length))
            at += length
        return RxPlacement(frame, responses, segments)

    def complete(self, placement: RxPlacement, statuses: list[int]) -> None:
        """Put the frame's responses; `statuses` are the GNTST codes of its segments."""
        responses = placement.responses
        ok = True
        for segment, status in zip(placement.segments, statuses, strict=True):
            if status != _GNTST_OKAY:
                ok = False
                self.counters.rx_copy_errors += 1
                slot_id, offset, flags, _ = RX_RESPONSE.unpack(responses[segment.slot])
                responses[segment.slot] = RX_RESPONSE.pack(slot_id, offset, flags, status)
        self.ring.put_responses(responses)
        if ok:
            counters = self.counters
            counters.rx_packets += 1
            counters.rx_bytes += len(placement.frame.data)
            counters.rx_slots += len(responses)

    def push(self) -> bool:
        """Publish the responses put so far; True = notify the frontend."""
        return self.ring.push_responses()
