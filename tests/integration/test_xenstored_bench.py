"""Smoke test: `xenpv bench xenstore --quick --json` runs and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_xenstore_quick_reports_all_figures() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xenpv", "bench", "xenstore", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
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
    assert "ratio" in result.stderr  # the human table
