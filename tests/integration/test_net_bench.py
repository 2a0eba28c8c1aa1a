"""`xenpv bench net --quick` runs end to end and ends with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_net_quick_json() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xenpv",
            "--log-level",
            "warning",
            "bench",
            "net",
            "--quick",
            "--json",
            "--transport",
            "shm",
        ],
        capture_output=True,
        timeout=300,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    data = json.loads(result.stdout.decode().strip().splitlines()[-1])
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
