"""The guest-transmit half of a netback queue, sans-IO: tx requests in, packets and responses out.

`TxCore.take()` consumes tx requests from a `BackRing` exactly as Linux netback's
`xenvif_tx_build_gops` + `xenvif_count_requests` + `xenvif_get_extras` do, including which
faults are the frontend's *fatal* ones (the whole vif is disabled, `xenvif_fatal_tx_err`) and
which only drop one packet with NETIF_RSP_ERROR for each of its slots (`xenvif_tx_err`):

fatal (`TxFatal`):
- a `req_prod` more than a ring ahead ("Impossible number of requests"), or behind;
- an extra-info slot missing ("Missing extra info") or of type NONE / unknown
  ("Invalid extra type"); a GSO extra of size 0 or a type other than TCPv4/TCPv6
  (`xenvif_set_skb_gso`);
- a more_data chain that runs past `req_prod` ("Asked for %d slots but exceeds this limit");
- a packet using more than `fatal_skb_slots` (module parameter, default 20) slots *after the
  first one* ("Malicious frontend using %d slots"): a packet of 22 or more slots;
- any slot whose `offset + size` crosses its 4 KiB frame ("Cross page boundary"; the first
  slot is checked with its own size, i.e. the packet size minus the later fragments).
dropped, every slot answered NETIF_RSP_ERROR (extras NETIF_RSP_NULL):
- more than XEN_NETBK_LEGACY_SLOTS_MAX (18) slots after the first: 20 or 21 slots in all
  ("Too many slots (%d) exceeding limit (%d), dropping packet");
- a later slot larger than what the first slot's size leaves ("Invalid tx request, slot size
  %u > remaining size %u": a frame ≥ 64 KiB overflowed the 16-bit size);
- a first slot shorter than an Ethernet header ("Bad packet size": netback checks the first
  slot's own size, so the headers never start in a later fragment).
Multicast-control extras (MCAST_ADD / MCAST_DEL) are answered at once on their own request:
OKAY, or ERROR when the vif already has XEN_NETBK_MCAST_MAX (64) addresses.

Accepted packets come back as `TxPacket`s with the grant-copy segments to perform; after the
copies the caller calls `complete()`, which answers every slot OKAY (or ERROR when a copy
failed: the packet is dropped, as netback does for a failed grant operation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.errors import NetifError, RingError
from xenpv.abi.netif import (
    ETH_ALEN,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    TX_REQUEST,
    TX_RESPONSE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
    XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
    XEN_NETIF_NR_SLOTS_MIN,
    NetifExtraType,
    NetifGsoExtra,
    NetifTxRequest,
    NETTXF_extra_info,
    NETTXF_more_data,
    decode_extra,
)
from xenpv.abi.ring import SRING_HEADER_SIZE, BackRing
from xenpv.errors import XenpvError
from xenpv.metrics.counters import NetbackStats

XEN_NETBK_LEGACY_SLOTS_MAX: Final = XEN_NETIF_NR_SLOTS_MIN
FATAL_SKB_SLOTS_DEFAULT: Final = 20  # netback's fatal_skb_slots module parameter
XEN_NETBK_MCAST_MAX: Final = 64
ETH_HLEN: Final = 14
_XEN_NETIF_EXTRA_TYPE_MAX: Final = int(NetifExtraType.XEN_NETIF_EXTRA_TYPE_MAX)
# Plain ints on the per-slot path: IntFlag `&` costs about a microsecond per operation.
_MORE_DATA: Final = int(NETTXF_more_data)
_EXTRA_INFO: Final = int(NETTXF_extra_info)
_RSP_NULL: Final = int(NETIF_RSP_NULL)


class TxFatal(XenpvError):
    """The frontend broke the tx protocol in a way Linux treats as fatal for the whole vif."""


@dataclass(slots=True)
class TxSegment:
    """One grant-copy segment: `length` bytes at `offset` of grant `gref` → frame[`at`:]."""

    gref: int
    offset: int
    length: int
    at: int


@dataclass(slots=True)
class TxPacket:
    """A validated guest packet, waiting for its grant copies."""

    requests: list[NetifTxRequest]  # data slots in order (ids for the responses)
    extra_count: int  # extra-info slots after the first request
    size: int  # the whole frame
    flags: int  # the first slot's NETTXF_* flags
    gso: NetifGsoExtra | None
    segments: list[TxSegment]


class TxCore:
    """The tx ring of one queue. Single-threaded: the trio layer owns it."""

    def __init__(
        self,
        ring: BackRing,
        *,
        granule: int = XEN_PAGE_SIZE,
        fatal_skb_slots: int = FATAL_SKB_SLOTS_DEFAULT,
        mcast: set[bytes] | None = None,
        counters: NetbackStats | None = None,
    ) -> None:
        """`counters`: the queue's record, shared with its RxCore and kept across
        connections (docs/metrics.md)."""
        self.ring = ring
        self.granule = granule  # the negotiated grant size (4 KiB baseline)
        self.fatal_skb_slots = fatal_skb_slots
        self.mcast: set[bytes] = mcast if mcast is not None else set()  # shared per vif
        self.counters = counters if counters is not None else NetbackStats()
        self.warnings: list[str] = []  # the last few, newest last
        self._slots: list[bytes] = []  # requests copied out by take(), being parsed
        self._read = 0  # of those, slots parsed
        self._consumed = 0  # of those, slots req_cons has passed

    # --- consuming requests ----------------------------------------------------------------

    def take(self, budget: int = 64) -> list[TxPacket]:
        """Consume up to `budget` packets; error / multicast responses are put at once.

        Raises TxFatal (the ring is then unusable for this connection).
        """
        packets: list[TxPacket] = []
        ring = self.ring
        try:
            work = ring.unconsumed_requests()
        except RingError as exc:
            raise TxFatal(f"Impossible number of requests: {exc}") from None
        if not work:
            return packets
        # Every request pushed so far, copied out of the ring once (no double fetch) in one
        # go; req_cons follows the parse. Requests pushed meanwhile wait for the next call.
        self._slots = ring.peek_requests(work)
        self._read = self._consumed = 0
        try:
            while len(packets) < budget and self._read < work:
                packet = self._take_one(work - self._read)
                if packet is not None:
                    packets.append(packet)
        finally:
            self._consume()
            self._slots = []
        return packets

    def _consume(self) -> None:
        """Advance req_cons over the slots parsed so far (before answering any of them)."""
        if self._read > self._consumed:
            self.ring.consume_requests(self._read - self._consumed)
            self._consumed = self._read

    def _next(self) -> bytes:
        data = self._slots[self._read]
        self._read += 1
        return data

    def _next_request(self) -> NetifTxRequest:
        """The next slot as a tx request (a ring slot always holds the 12 bytes)."""
        data = self._slots[self._read]
        self._read += 1
        return NetifTxRequest(*TX_REQUEST.unpack(data))

    def _take_one(self, work: int) -> TxPacket | None:
        next_request = self._next_request
        first = next_request()
        work -= 1
        extras: dict[int, bytes] = {}
        extra_count = 0
        if first.flags & _EXTRA_INFO:
            while True:  # xenvif_get_extras
                if work <= 0:
                    raise TxFatal("Missing extra info")
                raw = self._next()[:8]
                work -= 1
                extra_count += 1
                kind = raw[0]
                if kind == 0 or kind >= _XEN_NETIF_EXTRA_TYPE_MAX:
                    raise TxFatal(f"Invalid extra type: {kind}")
                extras[kind] = raw
                if not raw[1] & XEN_NETIF_EXTRA_FLAG_MORE:
                    break

        add = extras.get(XEN_NETIF_EXTRA_TYPE_MCAST_ADD)
        if add is not None:
            addr = bytes(add[2 : 2 + ETH_ALEN])
            full = addr not in self.mcast and len(self.mcast) >= XEN_NETBK_MCAST_MAX
            if full:
                self.warn("Too many multicast addresses")
            else:
                self.mcast.add(addr)
            self._respond(first, extra_count, NETIF_RSP_ERROR if full else NETIF_RSP_OKAY)
            return None
        delete = extras.get(XEN_NETIF_EXTRA_TYPE_MCAST_DEL)
        if delete is not None:
            self.mcast.discard(bytes(delete[2 : 2 + ETH_ALEN]))
            self._respond(first, extra_count, NETIF_RSP_OKAY)
            return None

        requests = [first]
        remaining = first.size
        if first.flags & _MORE_DATA:  # xenvif_count_requests
            drop: str | None = None
            slots = 0
            while True:
                if slots >= work:
                    raise TxFatal(f"Asked for {work} slots but exceeds this limit")
                if slots >= self.fatal_skb_slots:
                    raise TxFatal(
                        f"Malicious frontend using {slots} slots, threshold {self.fatal_skb_slots}"
                    )
                if drop is None and slots >= XEN_NETBK_LEGACY_SLOTS_MAX:
                    drop = (
                        f"Too many slots ({slots}) exceeding limit "
                        f"({XEN_NETBK_LEGACY_SLOTS_MAX}), dropping packet"
                    )
                    self.counters.tx_too_many_slots += 1
                txp = next_request()
                if drop is None and txp.size > remaining:
                    drop = f"Invalid tx request, slot size {txp.size} > remaining size {remaining}"
                    self.counters.tx_malformed += 1
                remaining = (remaining - txp.size) & 0xFFFF
                slots += 1
                if txp.offset + txp.size > self.granule:
                    raise TxFatal(
                        f"Cross page boundary, txp->offset: {txp.offset}, size: {txp.size}"
                    )
                requests.append(txp)
                if not txp.flags & _MORE_DATA:
                    break
            if drop is not None:
                self._error(requests, extra_count, drop)
                return None

        if remaining < ETH_HLEN:
            self.counters.tx_malformed += 1
            self._error(requests, extra_count, f"Bad packet size: {remaining}")
            return None
        if first.offset + remaining > self.granule:
            raise TxFatal(f"Cross page boundary, txreq.offset: {first.offset}, size: {remaining}")
        gso: NetifGsoExtra | None = None
        raw_gso = extras.get(XEN_NETIF_EXTRA_TYPE_GSO)
        if raw_gso is not None:  # xenvif_set_skb_gso: a bad GSO descriptor is fatal
            try:
                decoded = decode_extra(raw_gso)
            except NetifError as exc:
                raise TxFatal(f"Bad GSO extra: {exc}") from None
            assert isinstance(decoded, NetifGsoExtra)
            gso = decoded

        segments = [TxSegment(first.gref, first.offset, remaining, 0)]
        at = remaining
        for txp in requests[1:]:
            segments.append(TxSegment(txp.gref, txp.offset, txp.size, at))
            at += txp.size
        return TxPacket(requests, extra_count, at, first.flags, gso, segments)

    # --- responses -------------------------------------------------------------------------

    def complete(self, packet: TxPacket, ok: bool) -> None:
        """The packet's copies are done: answer each slot OKAY, or ERROR if a copy failed."""
        counters = self.counters
        if ok:
            counters.tx_packets += 1
            counters.tx_bytes += packet.size
            counters.tx_slots += len(packet.requests) + packet.extra_count
            status = NETIF_RSP_OKAY
        else:
            counters.tx_copy_errors += 1
            counters.tx_errors += 1
            status = NETIF_RSP_ERROR
        requests = packet.requests
        self._respond(requests[0], packet.extra_count, status, requests[1:])

    def push(self) -> bool:
        """Publish the responses put so far; True = notify the frontend."""
        return self.ring.push_responses()

    def _error(self, requests: list[NetifTxRequest], extra_count: int, why: str) -> None:
        """xenvif_tx_err: every slot of the packet answered ERROR."""
        self.counters.tx_errors += 1
        self.warn(why)
        self._respond(requests[0], extra_count, NETIF_RSP_ERROR, requests[1:])

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        del self.warnings[:-16]

    def _respond(
        self,
        request: NetifTxRequest,
        extra_count: int,
        status: int,
        later: Sequence[NetifTxRequest] = (),
    ) -> None:
        """make_tx_response: the request's response, then NETIF_RSP_NULL per extra slot, then
        one response per later fragment of the packet (`later`), put in one ring call.

        Linux writes only the status of a NULL response, so the id bytes keep whatever the
        slot held; we put back the same bytes.
        """
        self._consume()
        ring = self.ring
        pack = TX_RESPONSE.pack
        entries = [pack(request.id, status)]
        if extra_count:
            view = ring.buffer.view
            mask = ring.nr_ents - 1
            first = ring.rsp_prod_pvt + 1  # the extra slots follow the request's
            for index in range(first, first + extra_count):
                slot = SRING_HEADER_SIZE + (index & mask) * ring.entry_size
                old_id = int.from_bytes(view[slot : slot + 2], "little")
                entries.append(pack(old_id, _RSP_NULL))
        entries.extend(pack(r.id, status) for r in later)
        ring.put_responses(entries)
