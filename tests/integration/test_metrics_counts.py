"""Exact operation counts (docs/metrics.md): a fixed workload counts the same every run, and
the counts are the arithmetic of the protocol.

A 64 KiB-page guest reads 1 MiB: with 64 KiB granules the backend's grant operations on the
guest's grants cover 16 data segments; with 4 KiB splitting (the frontend declines the
granule), 256.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import trio

from backends.blkback import serve
from frontends.blkfront import attach
from tests.integration.blk_env import DEVICE, make_vbd, pair
from tests.integration.conftest import Xenstored
from xenpv.metrics.counters import PeerStats, RingStats
from xenpv.metrics.registry import REGISTRY, snapshot
from xenpv.toolstack.topology import VbdFeatures

MIB = 1 << 20


def grant_ops(stats: PeerStats) -> dict[str, int]:
    """The exact counts: grant operations are decided by the request's layout alone."""
    return {
        "segments": stats.map_segments + stats.copy_segments,
        "copy_bytes": stats.copy_bytes,
        "map_calls": stats.map_calls,
        "copy_calls": stats.copy_calls,
    }


def _summed(
    records: Mapping[tuple[int, int, int, int], Any],
    device: tuple[int, int, int],
    fields: dict[str, str],
) -> dict[str, int]:
    """`fields` (name in the result -> counter) summed over the device's queue records."""
    queues = [stats for key, stats in records.items() if key[:3] == device]
    return {name: sum(getattr(q, field) for q in queues) for name, field in fields.items()}


def blkback(device: tuple[int, int, int]) -> dict[str, int]:
    """The backend device's statistics summed over its queues (Linux blkback's rd_req,
    rd_sect, ...)."""
    fields = {"rd_req": "rd_req", "rd_sect": "rd_sect", "blkback_segments": "segments"}
    return _summed(REGISTRY.blkback, device, fields | {"errors": "errors"})


def blkfront(device: tuple[int, int, int]) -> dict[str, int]:
    """The frontend device's counters summed over its queues (the same requests, seen from
    the guest)."""
    fields = {"front_rd_req": "rd_req", "front_rd_bytes": "rd_bytes"}
    fields |= {"front_segments": "segments", "front_errors": "errors"}
    return _summed(REGISTRY.blkfront, device, fields)


def blk_requests() -> int:
    """Requests put on blkif front rings (of any ABI: "blkif[native]", ...) so far."""
    fronts: list[RingStats] = [
        ring
        for (protocol, end), ring in REGISTRY.rings.items()
        if protocol.startswith("blkif") and end == "front"
    ]
    return sum(ring.produced for ring in fronts)


def minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in after}


async def read_counts(tmp: Path, xs_address: str, cap: int | None) -> tuple[dict[str, int], int]:
    """Counts of one 1 MiB read, and the requests the frontend put on its ring for it."""
    features = VbdFeatures(indirect_segments=0, persistent=False, max_granule_order=4)
    async with pair(tmp, xs_address, "shm", 65536, guest_memory=64 << 20) as p:
        await make_vbd(p.xs, size=4 * MIB, features=features)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, p.backend, p.xs, DEVICE)
            async with attach(p.guest, p.xs, DEVICE, granule_order=cap) as front:
                await front.wait_connected()
                await front.read(0, MIB)  # warm: the first request may differ (none does today)
                stats = p.backend.stats.peer(p.guest.domid)
                queues = (p.backend.domid, p.guest.domid, DEVICE.devid)
                fronts = (p.guest.domid, p.backend.domid, DEVICE.devid)
                before = grant_ops(stats) | blkback(queues) | blkfront(fronts)
                produced = blk_requests()
                await front.read(0, MIB)
                counts = minus(grant_ops(stats) | blkback(queues) | blkfront(fronts), before)
                requests = blk_requests() - produced
            nursery.cancel_scope.cancel()
    return counts, requests


@pytest.mark.parametrize(
    ("cap", "segments", "requests"),
    [(None, 16, 2), (0, 256, 24)],  # 11 segments a request without indirect descriptors
    ids=["64k-granule", "4k-split"],
)
async def test_a_1mib_read_counts_the_arithmetic_every_run(
    tmp_path: Path, xenstored: Xenstored, cap: int | None, segments: int, requests: int
) -> None:
    with trio.fail_after(60):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = await read_counts(tmp_path / "a", xenstored.unix, cap)
        second = await read_counts(tmp_path / "b", xenstored.unix, cap)
    assert first == second
    counts, produced = first
    assert counts["segments"] == segments
    assert counts["blkback_segments"] == segments
    assert (counts["rd_req"], counts["rd_sect"], counts["errors"]) == (requests, 2048, 0)
    assert counts["copy_bytes"] in (0, MIB)  # copied (all of it) or mapped
    # blkfront counts the same requests and segments on its side
    assert (counts["front_rd_req"], counts["front_segments"]) == (requests, segments)
    assert (counts["front_rd_bytes"], counts["front_errors"]) == (MIB, 0)
    assert produced == requests


def test_the_snapshot_is_plain_and_json_ready() -> None:
    import json

    snap = snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert set(snap) >= {"domains", "rings"}
    assert dataclasses.fields(PeerStats)  # every field is an int counter
