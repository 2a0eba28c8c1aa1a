"""Judging a cell, sans-IO: what a worker saw → the cell's JSON record, and the speed-ups.

A cell passes only if its workload passed (data verified) AND both ends state the same granule
order in xenstore (the frontend's `grant-granule-order`, the backend's echo of it; absent = 0)
AND that order is the one the spec requires for the cell (`Cell.expected_order`) AND the
features the cell is meant to cover were negotiated as configured. Every failed condition is
named in `detail`; nothing is counted as passed that was not observed.
"""

from __future__ import annotations

import math
from typing import Any

from xenpv import granule
from xenpv.interop.matrix import Cell, VbdProfile, VifProfile, speedup_pairs


def _int(value: Any, default: int) -> int:
    """A key as a worker reported it: int, None (absent → default) or junk (→ -1)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    return -1


def problems(cell: Cell, result: dict[str, Any]) -> list[str]:
    """Everything wrong with a worker's result for `cell` (empty: the cell passes)."""
    out: list[str] = []
    if not result.get("ok"):
        out.append(str(result.get("detail") or "failed"))
    seen = result.get("negotiated")
    if not isinstance(seen, dict):
        if result.get("ok"):
            out.append("no negotiated values reported")
        return out
    fe: dict[str, Any] = seen.get("frontend") or {}
    be: dict[str, Any] = seen.get("backend") or {}
    fe_order = _int(fe.get("granule_order"), 0)
    be_order = _int(be.get("granule_order"), 0)
    be_max = _int(be.get("max_granule_order"), 0)
    want = cell.expected_order
    if be_max != cell.backend_max_order:
        out.append(
            f"backend advertises max-grant-granule-order {be_max}, "
            f"configured {cell.backend_max_order}"
        )
    if fe_order != be_order:
        out.append(
            f"ends disagree: frontend grant-granule-order {fe_order}, backend echoes {be_order}"
        )
    if fe_order != want:
        out.append(f"granule order {fe_order} negotiated, {want} expected")
    grant_size = fe.get("info_grant_size")
    if isinstance(grant_size, int) and grant_size != granule.granule_size(want):
        out.append(
            f"frontend driver grants {grant_size} bytes, {granule.granule_size(want)} expected"
        )
    profile = cell.profile
    if isinstance(profile, VbdProfile):
        ring = granule.blk_ring_geometry(profile.ring_page_order, want).ring_page_order
        checks = [
            ("ring-page-order", _int(fe.get("ring_page_order"), 0), ring),
            ("multi-queue-num-queues", _int(fe.get("queues"), 1), profile.queues),
            ("backend feature-max-indirect-segments", _int(be.get("indirect_segments"), 0),
             profile.indirect_segments),
            ("persistent (both ends)",
             int(_int(fe.get("persistent"), 0) == 1 and _int(be.get("persistent"), 0) == 1),
             int(profile.persistent)),
        ]  # fmt: skip
    else:
        assert isinstance(profile, VifProfile)
        checks = [("multi-queue-num-queues", _int(fe.get("queues"), 1), profile.queues)]
        if profile.sg_gso:
            for name in ("sg", "gso_tcpv4"):
                both = int(_int(fe.get(name), 0) == 1 and _int(be.get(name), 0) == 1)
                checks.append((f"feature-{name.replace('_', '-')} (both ends)", both, 1))
    for name, got, expected in checks:
        if got != expected:
            out.append(f"{name} {got}, {expected} expected")
    return out


def judge(cell: Cell, result: dict[str, Any] | None) -> dict[str, Any]:
    """The cell's JSON record (the `cells` entries of `xenpv interop --json`)."""
    record: dict[str, Any] = {
        "key": cell.key,
        "frontend_page": cell.frontend_page,
        "backend_page": cell.backend_page,
        "extension": "on" if cell.extension else "off",
        "device": cell.device,
        "features": cell.features(),
        "expected_granule": granule.granule_size(cell.expected_order),
    }
    if result is None:
        record |= {"ok": False, "detail": "no result (the guest's worker did not report it)"}
        record |= {"granule": None, "mbps": None, "unit": _unit(cell), "negotiated": None}
        return record
    found = problems(cell, result)
    seen = result.get("negotiated")
    fe_order = None
    if isinstance(seen, dict):
        fe_order = _int((seen.get("frontend") or {}).get("granule_order"), 0)
    record |= {
        "ok": not found,
        "detail": "; ".join(found) if found else str(result.get("detail", "")),
        "granule": granule.granule_size(fe_order)
        if fe_order is not None and fe_order >= 0
        else None,
        "mbps": result.get("mbps") if not found else None,
        "measured_mbps": result.get("mbps"),
        "unit": result.get("unit") or _unit(cell),
        "negotiated": seen,
        "bytes": result.get("bytes"),
        "seconds": result.get("seconds"),
        # grant ops, segments, ring slots, notifications per MiB and per request
        # (xenpv.metrics.counts; docs/metrics.md)
        "counts": result.get("counts"),
    }
    return record


def _unit(cell: Cell) -> str:
    return "MB/s" if cell.device == "vbd" else "Mbit/s"


def speedups(cells: list[Cell], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """64 KiB guest with 64 KiB granules over the same guest with 4 KiB splitting.

    Per pair (same backend page size and profile) the ratio of throughputs; per device and per
    device-profile the geometric mean over backends. A pair with a failed cell has no ratio.
    Returns {"vbd": .., "vif": .., "detail": {"vbd-lean": .., "vbd-full-b4k": .., ...}}."""
    ratios: dict[str, list[float]] = {}
    detail: dict[str, float | None] = {}
    for off, on in speedup_pairs(cells):
        a, b = records.get(off.key, {}), records.get(on.key, {})
        ratio = None
        if a.get("ok") and b.get("ok") and a.get("mbps") and b.get("mbps"):
            ratio = float(b["mbps"]) / float(a["mbps"])
        name = f"{off.device}-{off.profile.name}"
        detail[f"{name}-b{off.backend_page >> 10}k"] = None if ratio is None else round(ratio, 3)
        if ratio is not None:
            ratios.setdefault(name, []).append(ratio)
            ratios.setdefault(off.device, []).append(ratio)
    out: dict[str, Any] = {}
    for device in ("vbd", "vif"):
        out[device] = _geomean(ratios.get(device))
    for off, _on in speedup_pairs(cells):
        name = f"{off.device}-{off.profile.name}"
        detail.setdefault(name, _geomean(ratios.get(name)))
    out["detail"] = dict(sorted(detail.items()))
    return out


def _geomean(values: list[float] | None) -> float | None:
    if not values:
        return None
    return round(math.exp(sum(math.log(v) for v in values) / len(values)), 3)
