"""Smoke test of `xenpv bench link --quick --json`: shape of the result, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_link_quick_json() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "xenpv", "bench", "link", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["baseline_rtt_us"] > 0
    for transport in ("socket", "shm"):
        figures = result[transport]
        assert figures["notify_rtt_us"] > 0
        assert set(figures["copy_MBps"]) == {"4096", "65536", "1048576"}
        assert all(rate > 0 for rate in figures["copy_MBps"].values())
    assert "xenpv bench link" in run.stderr
