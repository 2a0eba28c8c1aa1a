"""Counts per MiB and per request of a workload, from two snapshots of the process that ran
it (pure). What the interop matrix records per cell (docs/metrics.md).

Counted on the guest's side, where the workload runs: its grant table (every data segment is
a grant issued, and ended when the request completes, unless persistent grants reuse it), the
grant operations it issues itself, its front rings' requests, and the events it exchanges.
EXACT counts are the same for the same workload on any host; TIMING counts depend on how
far the other end had got (event suppression by req_event/rsp_event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MIB = 1 << 20
EXACT = ("grant_ops", "segments", "ring_slots")
TIMING = ("notifications", "notifications_avoided")


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
