"""The process-wide registry of counter records, and `snapshot()`: the one read side.

Owners register a record once, at construction (a dict lookup then, never per operation).
A domain registers a fresh `DomainStats` (a domain process hosts one domain; a test hosting
several sees the newest per domid). Rings share one record per (protocol, end), so counts
survive a ring being rebuilt on reconnection and stay monotonic, as Prometheus counters must.
Driver queues have one record each, keyed by (domain, peer domain, devid, queue): blkback's
is shared by every connection of the key; the frontends' and netback's records belong to the
device object (`register_queue`), which keeps them across its reconnections, so a device's
own totals and the exposed counters are the same books.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

from xenpv.metrics.counters import (
    BlkbackStats,
    BlkfrontStats,
    DriverStats,
    GrantTableStats,
    NetbackStats,
    NetfrontStats,
    PeerStats,
    RingStats,
    as_dict,
)

QueueKey = tuple[int, int, int, int]  # (domain, peer domain, devid, queue)
# Each driver's section of the snapshot, and the labels of its key.
DRIVERS: dict[str, tuple[str, str, str, str]] = {
    "blkback": ("domain", "frontend", "devid", "queue"),
    "blkfront": ("domain", "backend", "devid", "queue"),
    "netback": ("domain", "frontend", "devid", "queue"),
    "netfront": ("domain", "backend", "devid", "queue"),
}
S = TypeVar("S", BlkfrontStats, NetfrontStats, NetbackStats)


@dataclass(slots=True)
class DomainStats:
    """One domain's hypervisor counters: its grant table, and per peer its grant and event
    operations."""

    domid: int
    name: str
    grants: GrantTableStats = field(default_factory=GrantTableStats)
    peers: dict[int, PeerStats] = field(default_factory=dict)

    def peer(self, peer: int) -> PeerStats:
        """The record for `peer` (created on first link to it)."""
        stats = self.peers.get(peer)
        if stats is None:
            stats = self.peers[peer] = PeerStats()
        return stats


@dataclass(slots=True)
class Registry:
    domains: dict[int, DomainStats] = field(default_factory=dict)
    rings: dict[tuple[str, str], RingStats] = field(default_factory=dict)
    # (backend domid, frontend domid, devid, queue) -> that blkback queue's record
    blkback: dict[QueueKey, BlkbackStats] = field(default_factory=dict)
    blkfront: dict[QueueKey, BlkfrontStats] = field(default_factory=dict)
    netback: dict[QueueKey, NetbackStats] = field(default_factory=dict)
    netfront: dict[QueueKey, NetfrontStats] = field(default_factory=dict)
    # Other sections (xenstored's operations, ...) register a function returning a plain dict.
    sections: dict[str, Any] = field(default_factory=dict)

    def domain(self, domid: int, name: str) -> DomainStats:
        stats = self.domains[domid] = DomainStats(domid, name)
        return stats

    def blkback_queue(self, domid: int, frontend: int, devid: int, queue: int) -> BlkbackStats:
        """The record of one blkback queue: shared by its reconnections (monotonic)."""
        key = (domid, frontend, devid, queue)
        stats = self.blkback.get(key)
        if stats is None:
            stats = self.blkback[key] = BlkbackStats()
        return stats

    def register_queue(self, section: dict[QueueKey, S], key: QueueKey, record: S) -> S:
        """Expose a device's `record` for one of its queues (`section`: `self.blkfront`,
        `self.netfront` or `self.netback`); a newer device with the same key replaces it."""
        section[key] = record
        return record

    def ring(self, protocol: str, end: str) -> RingStats:
        key = (protocol, end)
        stats = self.rings.get(key)
        if stats is None:
            stats = self.rings[key] = RingStats()
        return stats


REGISTRY = Registry()


def snapshot(registry: Registry = REGISTRY) -> dict[str, Any]:
    """Every counter of this process as a nested plain dict (JSON- and msgpack-ready).

    {"domains": {"<domid>": {"name", "grants": {...}, "peers": {"<peer>": {...}}}},
     "rings": {"<protocol>": {"front": {...}, "back": {...}}},
     "<driver>": [{"domain", "<peer>", "devid", "queue", <counters>...}, ...],
     "<section>": {...}}
    Keys are strings so that the dict survives a JSON round trip unchanged.
    """
    domains: dict[str, Any] = {}
    for domid, stats in sorted(registry.domains.items()):
        domains[str(domid)] = {
            "name": stats.name,
            "grants": as_dict(stats.grants),
            "peers": {str(p): as_dict(s) for p, s in sorted(stats.peers.items())},
        }
    rings: dict[str, dict[str, dict[str, int]]] = {}
    for (protocol, end), ring in sorted(registry.rings.items()):
        rings.setdefault(protocol, {})[end] = as_dict(ring)
    result: dict[str, Any] = {"domains": domains, "rings": rings}
    for driver, labels in DRIVERS.items():
        queues: dict[QueueKey, DriverStats] = getattr(registry, driver)
        if queues:
            result[driver] = [
                dict(zip(labels, key, strict=True)) | as_dict(stats)
                for key, stats in sorted(queues.items())
            ]
    for name, read in sorted(registry.sections.items()):
        result[name] = read()
    return result
