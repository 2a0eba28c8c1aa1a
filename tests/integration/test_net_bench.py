"""`xenpv bench net --quick` runs end to end and ends with its JSON line."""

from __future__ import annotations

from tests.integration.bench_run import run_quick_bench


def test_bench_net_quick_json() -> None:
    data, _table = run_quick_bench("net", "--transport", "shm")
    g2g = data["guest_to_guest_mbps"]
    assert set(g2g) == {"64", "1500", "9000", "64k_gso"}
    assert all(value > 0 for value in g2g.values())
    for key in ("tap_iperf3_mbps", "veth_iperf3_mbps"):
        assert key in data
    tap = data["tap_iperf3"]["shm"]
    # either measured, or unavailable with the reason and the package to install
    assert tap["status"] == "ok" or (tap["status"] == "unavailable" and tap["install"])
    if tap["status"] == "ok":
        assert data["tap_iperf3_mbps"] > 0 and data["veth_iperf3_mbps"] > 0
    # operation counts per MiB for every frame size (docs/metrics.md)
    for r in data["guest_to_guest"]["shm"].values():
        assert {"grant_ops_per_mib", "ring_slots_per_mib", "notifications_per_mib"} <= set(
            r["counts"]
        )
        assert r["counts"]["ring_slots_per_mib"] > 0
    rtt = data["rtt_us"]
    assert 0 < rtt["guest_to_guest"]["median"] <= rtt["guest_to_guest"]["p99"]
    for path in ("tap", "veth"):
        # measured (median ≤ p99), or unavailable with the reason, as the iperf3 rows
        assert rtt[path]["status"] in ("ok", "unavailable")
        if rtt[path]["status"] == "ok":
            assert 0 < rtt[path]["median"] <= rtt[path]["p99"]
        udp = data["udp_64_iperf3"][path]
        assert udp["status"] == "ok" or (udp["status"] == "unavailable" and udp["install"])
