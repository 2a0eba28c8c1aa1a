"""Counter records, one per object that does the work. Plain ints incremented in place.

No locks: a domain process is one trio thread; the metrics HTTP thread only reads ints (a
torn read is impossible for a Python int attribute). No per-op allocation, no lookups by
string: the owner holds its record and does `record.field += n`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True, weakref_slot=True)
class PeerStats:
    """The hypercall-equivalents one domain issued towards one peer (mapper side), and the
    events exchanged with it. Kept per peer domain across links to it."""

    map_calls: int = 0  # GNTTABOP_map_grant_ref batches
    map_segments: int = 0  # grant references mapped
    unmap_calls: int = 0  # GNTTABOP_unmap_grant_ref batches
    unmap_segments: int = 0
    copy_calls: int = 0  # GNTTABOP_copy batches
    copy_segments: int = 0
    copy_bytes: int = 0
    events_sent: int = 0  # EVTCHNOP_send to the peer
    events_received: int = 0  # events from the peer (a port bound to it raised)


@dataclass(slots=True, weakref_slot=True)
class GrantTableStats:
    """The granter side of one domain's grant table (gnttab_grant_foreign_access and
    gnttab_end_foreign_access)."""

    grants_issued: int = 0
    grants_ended: int = 0
    end_refused: int = 0  # end_access while the peer still maps it (GNTST_eagain)


@dataclass(slots=True, weakref_slot=True)
class RingStats:
    """One shared ring end (RING_PUSH_*_AND_CHECK_NOTIFY): entries produced, and whether the
    peer's event index asked for a notification."""

    produced: int = 0  # requests (front end) or responses (back end) put on the ring
    pushes: int = 0
    notify_needed: int = 0  # the push crossed the peer's event index: notify
    notify_avoided: int = 0  # it did not: the peer is still consuming


def as_dict(
    record: PeerStats | GrantTableStats | RingStats | BlkbackStats | DriverStats,
) -> dict[str, int]:
    return asdict(record)


XS_TYPES = 23  # xsd_sockmsg_type values 0..22; anything else counts as "other"


@dataclass(slots=True)
class XenstoredStats:
    """xenstored's work: requests by xsd_sockmsg_type (a list indexed by type: no lookup by
    name), watch events queued and dropped, error replies, transactions told to retry."""

    ops: list[int]
    other_ops: int = 0
    watch_events_fired: int = 0
    watch_events_dropped: int = 0
    errors: int = 0
    transactions_retried: int = 0  # XS_TRANSACTION_END answered EAGAIN

    @classmethod
    def new(cls) -> XenstoredStats:
        return cls([0] * XS_TYPES)

    def as_dict(self, names: dict[int, str]) -> dict[str, object]:
        """Plain dict; `names` maps type numbers to names (types never seen are left out)."""
        ops = {names.get(t, str(t)): n for t, n in enumerate(self.ops) if n}
        if self.other_ops:
            ops["other"] = self.other_ops
        return {
            "ops": ops,
            "watch_events_fired": self.watch_events_fired,
            "watch_events_dropped": self.watch_events_dropped,
            "errors": self.errors,
            "transactions_retried": self.transactions_retried,
        }


@dataclass(slots=True)
class BlkbackStats:
    """One blkback queue's requests, as Linux blkback's /sys/.../statistics (oo_req is not
    counted: a request never waits for a free slot here)."""

    rd_req: int = 0
    wr_req: int = 0
    f_req: int = 0  # FLUSH_DISKCACHE and WRITE_BARRIER
    ds_req: int = 0
    rd_sect: int = 0  # 512-byte sectors read
    wr_sect: int = 0
    segments: int = 0  # data segments (granted references) of READ/WRITE requests
    indirect_req: int = 0
    indirect_pages: int = 0
    errors: int = 0  # requests answered with an error status (rejected or failed)


@dataclass(slots=True)
class BlkfrontStats:
    """One blkfront queue's ring requests and responses (the guest's view of blkback's
    statistics, plus what only the frontend sees: persistent-grant reuse, re-issued I/Os)."""

    rd_req: int = 0  # READ requests put on the ring (direct and indirect)
    wr_req: int = 0
    f_req: int = 0  # FLUSH_DISKCACHE and WRITE_BARRIER
    ds_req: int = 0
    rd_bytes: int = 0  # bytes the READ requests ask for
    wr_bytes: int = 0
    segments: int = 0  # data segments (granted references) of READ/WRITE requests
    indirect_req: int = 0
    indirect_pages: int = 0
    persistent_hits: int = 0  # data segments on a pool grant granted before the request
    persistent_misses: int = 0  # data segments for which the pool had to grant anew
    reissued: int = 0  # I/Os a connection ended before they completed (issued again)
    errors: int = 0  # responses with a status other than BLKIF_RSP_OKAY


@dataclass(slots=True)
class NetfrontStats:
    """One netfront queue (Linux netfront_stats, and the drops by reason that
    xennet_get_responses only logs)."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_slots: int = 0  # data and extra-info slots of the packets put on the tx ring
    tx_errors: int = 0  # tx responses with a status other than NETIF_RSP_OKAY
    tx_dropped: int = 0  # packets lost at a reconnect or on a broken queue
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_slots: int = 0  # rx responses (data and extra-info) of the packets delivered
    rx_errors: int = 0  # rx packets dropped, the sum of the reasons below
    rx_bad_status: int = 0  # a response with a negative status
    rx_bad_id: int = 0  # a response id that is not its slot's
    rx_bad_offset: int = 0  # a fragment crossing its granule
    rx_too_many_slots: int = 0  # more than MAX_RX_SLOTS fragments
    rx_bad_extra: int = 0  # an extra-info slot that does not decode
    rx_empty: int = 0  # a packet of 0 bytes


@dataclass(slots=True)
class NetbackStats:
    """One netback queue, tx = from the guest, rx = to it (the ring names; Linux's vif
    net_device counts the other way round)."""

    tx_packets: int = 0  # packets copied from the guest and handed on
    tx_bytes: int = 0
    tx_slots: int = 0  # their data and extra-info slots
    tx_errors: int = 0  # packets answered NETIF_RSP_ERROR
    tx_malformed: int = 0  # of those: a bad size or slot chain (xenvif_tx_err)
    tx_too_many_slots: int = 0  # of those: more than XEN_NETBK_LEGACY_SLOTS_MAX slots
    tx_copy_errors: int = 0  # of those: a grant copy failed
    tx_dropped_offload: int = 0  # answered OKAY but dropped: checksum setup impossible
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_slots: int = 0  # responses (data and extra-info) of the packets delivered
    rx_dropped_no_buffers: int = 0  # the queue's backlog was full: no rx slots posted
    rx_dropped_too_big: int = 0  # needs more slots than the frontend can ever give
    rx_dropped_offload: int = 0  # offload state this frontend cannot take
    rx_copy_errors: int = 0  # slots whose grant copy failed


DriverStats = BlkbackStats | BlkfrontStats | NetfrontStats | NetbackStats
