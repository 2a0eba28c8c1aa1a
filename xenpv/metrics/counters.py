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


def as_dict(record: PeerStats | GrantTableStats | RingStats | BlkbackStats) -> dict[str, int]:
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
