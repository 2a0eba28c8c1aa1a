"""Prometheus exposition of `snapshot()`: a custom collector that reads the counters at
scrape time (no second set of books), and `serve()`, the HTTP endpoint of `--metrics`.

The endpoint is prometheus_client's own server, in a daemon thread of the process: it only
reads ints from the counter records, so it needs no lock with the trio thread doing the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from xenpv.metrics.registry import DRIVERS, snapshot

# snapshot field -> (metric name without _total, help)
PEER_COUNTERS: Mapping[str, tuple[str, str]] = {
    "map_calls": ("xenpv_grant_map_calls", "GNTTABOP_map_grant_ref batches issued to the peer"),
    "map_segments": ("xenpv_grant_map_segments", "grant references of the peer mapped"),
    "unmap_calls": ("xenpv_grant_unmap_calls", "GNTTABOP_unmap_grant_ref batches"),
    "unmap_segments": ("xenpv_grant_unmap_segments", "grant references of the peer unmapped"),
    "copy_calls": ("xenpv_grant_copy_calls", "GNTTABOP_copy batches with the peer"),
    "copy_segments": ("xenpv_grant_copy_segments", "GNTTABOP_copy segments with the peer"),
    "copy_bytes": ("xenpv_grant_copy_bytes", "bytes moved by GNTTABOP_copy with the peer"),
    "events_sent": ("xenpv_events_sent", "EVTCHNOP_send to the peer's ports"),
    "events_received": ("xenpv_events_received", "events from the peer on our ports"),
}
GRANT_TABLE_COUNTERS: Mapping[str, tuple[str, str]] = {
    "grants_issued": ("xenpv_grants_issued", "grant entries issued (grant_foreign_access)"),
    "grants_ended": ("xenpv_grants_ended", "grant entries ended (end_foreign_access)"),
    "end_refused": ("xenpv_grant_end_refused", "end_foreign_access refused: still mapped"),
}
RING_COUNTERS: Mapping[str, tuple[str, str]] = {
    "produced": ("xenpv_ring_produced", "requests (front) or responses (back) put on rings"),
    "pushes": ("xenpv_ring_pushes", "RING_PUSH_*_AND_CHECK_NOTIFY calls"),
    "notify_needed": ("xenpv_ring_notify_needed", "pushes that crossed the peer's event index"),
    "notify_avoided": ("xenpv_ring_notify_avoided", "pushes the event index suppressed"),
}


def families(snap: Mapping[str, Any]) -> list[Metric]:
    """The metric families of a snapshot (pure: a test can feed it a dict)."""
    result: list[Metric] = []
    peer = {
        key: CounterMetricFamily(name, text, labels=["domain", "peer"])
        for key, (name, text) in PEER_COUNTERS.items()
    }
    table = {
        key: CounterMetricFamily(name, text, labels=["domain"])
        for key, (name, text) in GRANT_TABLE_COUNTERS.items()
    }
    ring = {
        key: CounterMetricFamily(name, text, labels=["protocol", "end"])
        for key, (name, text) in RING_COUNTERS.items()
    }
    for domid, domain in snap.get("domains", {}).items():
        for key, family in table.items():
            family.add_metric([domid], domain["grants"][key])
        for peer_id, counts in domain["peers"].items():
            for key, family in peer.items():
                family.add_metric([domid, peer_id], counts[key])
    for protocol, ends in snap.get("rings", {}).items():
        for end, counts in ends.items():
            for key, family in ring.items():
                family.add_metric([protocol, end], counts[key])
    result.extend(table.values())
    result.extend(peer.values())
    result.extend(ring.values())
    for driver, labels in DRIVERS.items():
        queues = snap.get(driver)
        if queues:
            result.extend(_driver_families(driver, labels, queues))
    xenstore = snap.get("xenstored")
    if xenstore is not None:
        result.extend(_xenstore_families(xenstore))
    return result


def _driver_families(
    driver: str, labels: tuple[str, ...], queues: list[dict[str, int]]
) -> Iterator[Metric]:
    """xenpv_<driver>_<field>_total{domain,<peer>,devid,queue}, e.g. Linux blkback's
    statistics as xenpv_blkback_rd_req_total{domain,frontend,devid,queue}."""
    fields = [key for key in queues[0] if key not in labels]
    for key in fields:
        family = CounterMetricFamily(
            f"xenpv_{driver}_{key}", f"{driver} {key} per queue", labels=list(labels)
        )
        for queue in queues:
            family.add_metric([str(queue[label]) for label in labels], queue[key])
        yield family


def _xenstore_families(counts: Mapping[str, Any]) -> Iterator[Metric]:
    ops = CounterMetricFamily("xenpv_xenstore_ops", "xenstored requests by type", labels=["op"])
    for op, n in sorted(counts.get("ops", {}).items()):
        ops.add_metric([op], n)
    yield ops
    for key in ("watch_events_fired", "watch_events_dropped", "transactions_retried", "errors"):
        if key in counts:
            family = CounterMetricFamily(f"xenpv_xenstore_{key}", f"xenstored {key}")
            family.add_metric([], counts[key])
            yield family


class SnapshotCollector(Collector):
    """Reads the counters at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, Any]] = snapshot) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        for _attempt in range(3):
            try:
                snap = self._read()
                break
            except RuntimeError:  # a dict grew under us (a new peer): read again
                continue
        else:
            return
        yield from families(snap)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (port 0: any) -> (host, port); ValueError with a one-line reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(listen: str) -> WSGIServer:
    """Serve this process's counters on `listen` (HOST:PORT, port 0: any) in a daemon thread;
    `server.server_address` is the bound address, `server.shutdown()` stops it. OSError if
    the address is taken, ValueError if it is not HOST:PORT."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector())
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
