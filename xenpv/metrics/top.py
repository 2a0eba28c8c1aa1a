"""`xenpv top`'s core (pure): rates between two sets of snapshots, as rows.

A row is one domain's traffic with one peer, from the snapshots its process wrote
(xenpv.metrics.files): grant operations per second (references mapped, unmapped or copied:
the hypercall-equivalents' segments), MB/s moved by grant copy, events per second (sent and
received), and the process's ring requests per second (IOPS: requests put on its front rings;
rings are counted per process and protocol, so the figure is the process's, on each of its
rows). Errors and drops are totals since the process started: the grant ends refused while
mapped, and the driver queues' error responses and dropped frames (docs/metrics.md), summed
over the queues this domain serves for, or uses from, the peer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from xenpv.metrics.registry import DRIVERS

STALE_AFTER = 3.0  # seconds without a new snapshot: the process is stopped or stuck
# Per driver: its fields that count error responses, and those that count dropped frames.
ERROR_FIELDS: Mapping[str, tuple[str, ...]] = {
    "blkback": ("errors",),
    "blkfront": ("errors",),
    "netback": ("tx_errors",),
    "netfront": ("tx_errors",),
}
DROP_FIELDS: Mapping[str, tuple[str, ...]] = {
    "netback": (
        "tx_dropped_offload",
        "rx_dropped_no_buffers",
        "rx_dropped_too_big",
        "rx_dropped_offload",
    ),
    "netfront": ("tx_dropped", "rx_errors"),
}


@dataclass(frozen=True, slots=True)
class Row:
    process: str
    domain: str
    peer: str
    state: str  # "live", or "stale" (no snapshot for STALE_AFTER seconds)
    iops: float
    mb_per_s: float
    events_per_s: float
    grant_ops_per_s: float
    errors: int  # grant ends refused while mapped, and the drivers' error responses
    drops: int = 0  # frames the network drivers dropped

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _grant_ops(peer: Mapping[str, int]) -> int:
    return peer["map_segments"] + peer["unmap_segments"] + peer["copy_segments"]


def _events(peer: Mapping[str, int]) -> int:
    return peer["events_sent"] + peer["events_received"]


def _ring_requests(snap: Mapping[str, Any]) -> int:
    return sum(ends.get("front", {}).get("produced", 0) for ends in snap.get("rings", {}).values())


def _driver_totals(
    snap: Mapping[str, Any], fields: Mapping[str, tuple[str, ...]]
) -> dict[tuple[str, str], int]:
    """(domain, peer) -> the sum of `fields` over every driver queue between them."""
    totals: dict[tuple[str, str], int] = {}
    for driver, names in fields.items():
        _domain, peer_label, _devid, _queue = DRIVERS[driver]
        for queue in snap.get(driver, ()):
            key = (str(queue["domain"]), str(queue[peer_label]))
            totals[key] = totals.get(key, 0) + sum(int(queue.get(n, 0)) for n in names)
    return totals


def rows(
    before: Mapping[str, Mapping[str, Any]],
    after: Mapping[str, Mapping[str, Any]],
    now: float,
) -> list[Row]:
    """Rates from `before` to `after` (each: process name -> snapshot with `at`), at wall
    time `now`. A process without an earlier snapshot (or restarted: counters went down)
    shows zero rates until the next one."""
    result: list[Row] = []
    for process, snap in sorted(after.items()):
        old = before.get(process)
        elapsed = 0.0 if old is None else float(snap["at"]) - float(old["at"])
        state = "live" if now - float(snap["at"]) <= STALE_AFTER else "stale"

        def rate(new: int, was: int | None, elapsed: float = elapsed) -> float:
            if was is None or elapsed <= 0 or new < was:
                return 0.0
            return (new - was) / elapsed

        old_domains = old.get("domains", {}) if old is not None else {}
        iops = rate(_ring_requests(snap), None if old is None else _ring_requests(old))
        driver_errors = _driver_totals(snap, ERROR_FIELDS)
        drops = _driver_totals(snap, DROP_FIELDS)
        for domid, domain in sorted(snap.get("domains", {}).items(), key=lambda kv: int(kv[0])):
            old_peers = old_domains.get(domid, {}).get("peers", {})
            errors = int(domain["grants"]["end_refused"])
            for peer_id, peer in sorted(domain["peers"].items(), key=lambda kv: int(kv[0])):
                was = old_peers.get(peer_id)
                copied = None if was is None else was["copy_bytes"]
                result.append(
                    Row(
                        process=process,
                        domain=f"{domain['name']}({domid})",
                        peer=peer_id,
                        state=state,
                        iops=iops,
                        mb_per_s=rate(peer["copy_bytes"], copied) / 1e6,
                        events_per_s=rate(_events(peer), None if was is None else _events(was)),
                        grant_ops_per_s=rate(
                            _grant_ops(peer), None if was is None else _grant_ops(was)
                        ),
                        errors=errors + driver_errors.get((domid, peer_id), 0),
                        drops=drops.get((domid, peer_id), 0),
                    )
                )
    return result
