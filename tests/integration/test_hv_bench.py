"""Smoke test of `xenpv bench link --quick --json`: shape of the result, not its speed."""

from __future__ import annotations

from tests.integration.bench_run import run_quick_bench


def test_bench_link_quick_json() -> None:
    result, table = run_quick_bench("link")
    assert result["baseline_rtt_us"] > 0
    for transport in ("socket", "shm"):
        figures = result[transport]
        assert figures["notify_rtt_us"] > 0
        assert set(figures["copy_MBps"]) == {"4096", "65536", "1048576"}
        assert all(rate > 0 for rate in figures["copy_MBps"].values())
    assert "xenpv bench link" in table
