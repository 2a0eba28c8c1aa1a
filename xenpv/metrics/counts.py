"""Counts per MiB and per request of a workload, from two snapshots of the process that ran
it (pure). What the interop matrix records per cell (docs/metrics.md).

Counted on the guest's side, where the workload runs: its grant table (every data segment is
a grant issued, and ended when the request completes, unless persistent grants reuse it), the
grant operations it issues itself, its front rings' requests, and the events it exchanges.
EXACT counts are the same for the same workload on any host; TIMING counts depend on how
far the other end had got (event suppression by req_event/rsp_event).

`backend_counts` gives the backend's side of the same workload, from two snapshots of the
backend domain's process taken around it: the grant operations it issued towards the guest
(blkback and netback copy, or map persistent grants), where 4 KiB splitting and a larger
granule differ most.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIB = 1 << 20
EXACT = ("grant_ops", "segments", "ring_slots")
TIMING = ("notifications", "notifications_avoided")
# The backend's PeerStats fields towards the guest that `backend_counts` reports. Copy
# segments and bytes follow from the request layout alone; batches (netback copies what one
# pass took off the ring) and persistent-grant maps (once per ring that first sees a grant,
# and which ring takes an I/O depends on timing) need not: exact only for a vbd without
# persistent grants (docs/metrics.md).
BACKEND_EXACT = ("copy_segments", "copy_bytes")
BACKEND_TIMING = ("copy_calls", "map_calls", "map_segments", "unmap_calls", "unmap_segments")
BACKEND = BACKEND_EXACT + BACKEND_TIMING


def totals(snap: Mapping[str, Any], domid: int) -> dict[str, int]:
    """The raw totals of domain `domid` (and its process's front rings) in a snapshot."""
    domain = snap["domains"].get(str(domid))
    issued = ended = mapped = events = 0
    if domain is not None:
        issued = domain["grants"]["grants_issued"]
        ended = domain["grants"]["grants_ended"]
        for peer in domain["peers"].values():
            mapped += peer["map_segments"] + peer["unmap_segments"] + peer["copy_segments"]
            events += peer["events_sent"] + peer["events_received"]
    fronts = [ends["front"] for ends in snap["rings"].values() if "front" in ends]
    return {
        "grant_ops": issued + ended + mapped,
        "segments": issued,
        "ring_slots": sum(f["produced"] for f in fronts),
        "notifications": events,
        "notifications_avoided": sum(f["notify_avoided"] for f in fronts),
    }


def workload_counts(
    before: Mapping[str, Any], after: Mapping[str, Any], domid: int, moved_bytes: int
) -> dict[str, Any]:
    """The counts of what ran between two snapshots: totals, per MiB of `moved_bytes`, per
    request (ring slot), and which are exact and which depend on timing."""
    start, end = totals(before, domid), totals(after, domid)
    delta = {key: end[key] - start[key] for key in end}
    mib = moved_bytes / MIB
    requests = delta["ring_slots"]
    result: dict[str, Any] = {"totals": delta, "bytes": moved_bytes}
    for key in ("grant_ops", "segments", "ring_slots", "notifications"):
        result[f"{key}_per_mib"] = round(delta[key] / mib, 2) if mib > 0 else None
        if key != "ring_slots":
            result[f"{key}_per_request"] = round(delta[key] / requests, 3) if requests else None
    result["exact"] = list(EXACT)
    result["timing"] = list(TIMING)
    return result


def backend_counts(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    backend: int,
    guest: int,
    moved_bytes: int,
) -> dict[str, Any]:
    """What domain `backend` issued towards domain `guest` between two snapshots of its
    process: the totals of its PeerStats fields (BACKEND) and each per MiB of `moved_bytes`."""

    def peer(snap: Mapping[str, Any]) -> Mapping[str, int]:
        domain = snap.get("domains", {}).get(str(backend))
        return {} if domain is None else domain["peers"].get(str(guest), {})

    start, end = peer(before), peer(after)
    delta = {key: int(end.get(key, 0)) - int(start.get(key, 0)) for key in BACKEND}
    mib = moved_bytes / MIB
    result: dict[str, Any] = {"totals": delta, "bytes": moved_bytes, "domain": backend}
    for key, value in delta.items():
        result[f"{key}_per_mib"] = round(value / mib, 2) if mib > 0 else None
    result["exact"] = list(BACKEND_EXACT)
    result["timing"] = list(BACKEND_TIMING)
    return result
