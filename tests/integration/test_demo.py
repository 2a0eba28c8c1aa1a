"""`xenpv demo --json` as a user runs it: every check passes with 4K, 16K and 64K guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.integration.hv_pair import REPO


def test_demo_passes_every_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xenpv", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert sorted(g["page_size"] for g in summary["guests"]) == [4096, 16384, 65536]
    checks = {c["name"]: c for c in summary["checks"]}
    assert all(c["ok"] is True for c in checks.values()), checks
    guests = [g["name"] for g in summary["guests"]]
    for guest in guests:
        assert checks[f"block-{guest}-51712"]["bulk_bytes"] > 0
        for peer in guests:
            if peer != guest:
                assert checks[f"net-{guest}-to-{peer}"]["frames"] > 0
    assert len(summary["devices"]) == 6
    assert all(d["connected"] for d in summary["devices"])
    assert summary["throughput"]["block_write_mib_s"] > 0
    assert summary["elapsed_s"] > 0
    assert "demo passed: 13 checks (the 9 above; page-sizes, devices-declared" in result.stderr
    tables = result.stderr.split("throughput:")[0]
    assert "…" not in tables  # nothing truncated, and nothing wider than 80 columns
    assert max(len(line) for line in tables.splitlines()) <= 80
