"""Smoke test: `xenpv bench xenstore --quick --json` runs and reports every figure."""

from __future__ import annotations

from tests.integration.bench_run import run_quick_bench


def test_bench_xenstore_quick_reports_all_figures() -> None:
    data, table = run_quick_bench("xenstore")
    for op in ("read", "write", "transaction"):
        for clients in ("1", "32"):
            row = data["round_trips"][op][clients]
            assert row["xenstored_ops"] > 0 and row["null_ops"] > 0 and row["ratio"] > 0
    assert data["watch_fanout"]["watchers"] == 1000
    assert data["watch_fanout"]["median_ms"] > 0
    for level in ("store", "server"):
        scale = data["scale"][level]
        assert scale["read_us_big"] > 0 and scale["write_us_big"] > 0
    assert data["fsync_us"] > 0
    assert "ratio" in table  # the human table
