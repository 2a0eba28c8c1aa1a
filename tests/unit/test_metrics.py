"""The read side of the counters (docs/metrics.md): snapshot() and its Prometheus exposition,
scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from xenpv.metrics.counters import XenstoredStats
from xenpv.metrics.prometheus import families, parse_listen, serve
from xenpv.metrics.registry import Registry, snapshot


def filled_registry() -> Registry:
    registry = Registry()
    dom = registry.domain(1, "guest")
    dom.grants.grants_issued += 20
    peer = dom.peer(0)
    peer.copy_calls += 2
    peer.copy_segments += 16
    peer.copy_bytes += 1 << 20
    peer.events_sent += 3
    ring = registry.ring("blkif[native]", "front")
    ring.produced += 2
    ring.notify_avoided += 1
    xs = XenstoredStats.new()
    xs.ops[2] += 5
    registry.sections["xenstored"] = lambda: xs.as_dict({2: "read"})
    return registry


def test_a_snapshot_is_a_plain_nested_dict() -> None:
    snap = snapshot(filled_registry())
    assert json.loads(json.dumps(snap)) == snap
    assert snap["domains"]["1"]["peers"]["0"]["copy_segments"] == 16
    assert snap["domains"]["1"]["grants"]["grants_issued"] == 20
    assert snap["rings"]["blkif[native]"]["front"]["produced"] == 2
    assert snap["xenstored"]["ops"] == {"read": 5}


def test_the_metrics_port_serves_valid_exposition_text() -> None:
    from xenpv.metrics.counters import BlkbackStats, BlkfrontStats, NetbackStats, NetfrontStats

    registry = filled_registry()
    key = (1, 0, 7, 0)  # a queue of a device no other test uses (devid 7)
    drivers = {
        "blkback": BlkbackStats(rd_req=3),
        "blkfront": BlkfrontStats(reissued=2),
        "netback": NetbackStats(tx_malformed=5),
        "netfront": NetfrontStats(rx_bad_offset=4),
    }
    server = serve("127.0.0.1:0")
    try:
        from xenpv.metrics import registry as module

        # The server reads the process registry; point it at ours for the scrape.
        saved = module.REGISTRY.domains.copy()
        module.REGISTRY.domains[1] = registry.domains[1]
        for driver, record in drivers.items():
            getattr(module.REGISTRY, driver)[key] = record
        try:
            port = server.server_address[1]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        finally:
            module.REGISTRY.domains.clear()
            module.REGISTRY.domains.update(saved)
            for driver in drivers:
                del getattr(module.REGISTRY, driver)[key]
    finally:
        server.shutdown()
        server.server_close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = ("xenpv_grant_copy_segments_total", (("domain", "1"), ("peer", "0")))
    assert samples[key] == 16
    assert samples[("xenpv_grants_issued_total", (("domain", "1"),))] == 20
    back = (("devid", "7"), ("domain", "1"), ("frontend", "0"), ("queue", "0"))
    front = (("backend", "0"), ("devid", "7"), ("domain", "1"), ("queue", "0"))
    assert samples[("xenpv_blkback_rd_req_total", back)] == 3
    assert samples[("xenpv_blkfront_reissued_total", front)] == 2
    assert samples[("xenpv_netback_tx_malformed_total", back)] == 5
    assert samples[("xenpv_netfront_rx_bad_offset_total", front)] == 4


def test_families_name_counters_the_prometheus_way() -> None:
    names = {family.name for family in families(snapshot(filled_registry()))}
    assert "xenpv_grant_copy_segments" in names  # exposed with the _total suffix
    assert "xenpv_xenstore_ops" in names
    assert all(name.startswith("xenpv_") for name in names)


@pytest.mark.parametrize("bad", ["nope", "host:", "1.2.3.4:99999", ":x"])
def test_a_bad_metrics_address_is_one_line(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen(bad)


def test_workload_counts_are_per_mib_and_per_request() -> None:
    from xenpv.metrics.counts import workload_counts

    before = snapshot(filled_registry())
    registry = filled_registry()
    dom = registry.domains[1]
    dom.grants.grants_issued += 256  # 1 MiB in 4 KiB grants, each issued and ended
    dom.grants.grants_ended += 256
    dom.peer(0).events_sent += 24
    registry.rings["blkif[native]", "front"].produced += 24
    counts = workload_counts(before, snapshot(registry), 1, 1 << 20)
    assert counts["grant_ops_per_mib"] == 512
    assert counts["segments_per_mib"] == 256
    assert counts["ring_slots_per_mib"] == 24
    assert counts["notifications_per_mib"] == 24
    assert counts["notifications_per_request"] == 1
    assert "notifications" in counts["timing"] and "segments" in counts["exact"]


def test_the_report_charts_counts_per_mib() -> None:
    from xenpv.interop.matrix import enumerate_cells
    from xenpv.interop.report import render_html
    from xenpv.interop.verdict import judge

    records = []
    for cell in enumerate_cells():
        if cell.device == "vbd" and (cell.frontend_page, cell.backend_page) == (65536, 4096):
            grant_ops = 32.0 if cell.extension else 512.0
            backend = {"copy_segments_per_mib": 16.0 if cell.extension else 256.0}
            counts = {
                "grant_ops_per_mib": grant_ops,
                "notifications_per_mib": 3.0,
                "backend": backend,
            }
            result = {"key": cell.key, "ok": True, "detail": "", "mbps": 1.0, "counts": counts}
            records.append(judge(cell, result))
    assert records
    page = render_html({"cells": records})
    assert "grant ops / MiB (exact)" in page
    assert "notifications / MiB (timing-dependent)" in page
    assert ": 512.0 grant ops / MiB" in page and ": 32.0 grant ops / MiB" in page
    assert "backend copy segments / MiB<br>exact" in page
    assert "backend copy calls / MiB<br>timing" in page
    assert "<td class='num'>256.00</td>" in page and "<td class='num'>16.00</td>" in page


def test_top_rows_are_rates_between_snapshots() -> None:
    from xenpv.metrics.top import rows

    before = snapshot(filled_registry()) | {"at": 100.0}
    registry = filled_registry()
    peer = registry.domains[1].peer(0)
    peer.copy_segments += 32  # 16 + 32 over 2 s: 16 grant ops/s more than before
    peer.copy_bytes += 2_000_000
    peer.events_received += 4
    registry.rings["blkif[native]", "front"].produced += 20
    after = snapshot(registry) | {"at": 102.0}
    (row,) = rows({"g": before}, {"g": after}, now=102.5)
    assert (row.process, row.domain, row.peer, row.state) == ("g", "guest(1)", "0", "live")
    assert (row.grant_ops_per_s, row.mb_per_s, row.events_per_s, row.iops) == (16, 1, 2, 10)
    (stale,) = rows({}, {"g": after}, now=110.0)
    assert stale.state == "stale" and stale.grant_ops_per_s == 0  # no earlier sample: no rate


def test_driver_counters_in_the_snapshot_prometheus_and_top() -> None:
    from xenpv.metrics.counters import BlkfrontStats, NetbackStats, NetfrontStats
    from xenpv.metrics.top import rows

    registry = filled_registry()
    blk = registry.register_queue(registry.blkfront, (1, 0, 51712, 0), BlkfrontStats())
    net = registry.register_queue(registry.netfront, (1, 0, 0, 1), NetfrontStats())
    back = registry.register_queue(registry.netback, (0, 1, 0, 1), NetbackStats())
    before = snapshot(registry) | {"at": 100.0}
    blk.rd_req += 2
    blk.errors += 1
    net.tx_packets += 3
    net.tx_errors += 1
    net.rx_bad_id += 1
    net.rx_errors += 1
    back.rx_dropped_no_buffers += 4
    snap = snapshot(registry)
    assert snap["blkfront"] == [
        {"domain": 1, "backend": 0, "devid": 51712, "queue": 0} | asdict(blk)
    ]
    assert snap["netfront"][0]["rx_bad_id"] == 1 and snap["netback"][0]["frontend"] == 1
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families(snap)
        for sample in family.samples
    }
    labels = (("backend", "0"), ("devid", "51712"), ("domain", "1"), ("queue", "0"))
    assert samples["xenpv_blkfront_rd_req_total", labels] == 2
    labels = (("backend", "0"), ("devid", "0"), ("domain", "1"), ("queue", "1"))
    assert samples["xenpv_netfront_tx_packets_total", labels] == 3
    labels = (("devid", "0"), ("domain", "0"), ("frontend", "1"), ("queue", "1"))
    assert samples["xenpv_netback_rx_dropped_no_buffers_total", labels] == 4
    (row,) = rows({"g": before}, {"g": snap | {"at": 101.0}}, now=101.0)
    assert (row.domain, row.peer, row.errors, row.drops) == ("guest(1)", "0", 1 + 1, 1)


async def test_a_fresh_snapshot_is_written_on_request(tmp_path: Path) -> None:
    """The writer writes at once when asked (FRESH_SIGNAL), not only every interval: a
    reader gets counts up to the moment it asked, stamped after it."""
    from xenpv.metrics.files import fresh_snapshot, read_snapshot, write_periodically

    path = tmp_path / "metrics" / "backend.json"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_periodically, path, 3600.0)
            await trio.testing.wait_all_tasks_blocked()
            first = read_snapshot(path)
            assert first is not None
            fresh = await fresh_snapshot(path)
            assert fresh["at"] > first["at"] and fresh["pid"] == first["pid"]
            nursery.cancel_scope.cancel()
    assert not path.exists()  # gone with its writer


def test_backend_counts_are_the_peer_deltas_per_mib() -> None:
    from xenpv.metrics.counts import backend_counts

    registry = Registry()
    backend = registry.domain(0, "backend").peer(1)
    before = snapshot(registry)
    backend.copy_calls += 24
    backend.copy_segments += 256  # 1 MiB read in 4 KiB grants
    backend.copy_bytes += 1 << 20
    counts = backend_counts(before, snapshot(registry), 0, 1, 1 << 20)
    assert counts["totals"]["copy_segments"] == 256 and counts["copy_segments_per_mib"] == 256
    assert counts["copy_calls_per_mib"] == 24 and counts["map_segments_per_mib"] == 0
    assert counts["exact"] == ["copy_segments", "copy_bytes"]
    assert backend_counts(before, before, 0, 2, 1 << 20)["totals"]["copy_segments"] == 0
