"""`xenpv faults run` of the hostile-peer ring faults and the xenstore watch-event faults
against a real cluster: both ends' defences hold (the checkers pass), and each fault bit
(a device whose ring a hostile peer broke went through Closing and came back Connected; an
out-of-range request failed that I/O only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 120.0  # each plan lasts 12 s; start-up and teardown a few more

HEAD = """
[run]
seed = 3
duration = 12.0
quiet = 5.0
topology = "demo"
"""

RING = (
    HEAD
    + """
[[workload]]
kind = "block"
targets = ["all"]
rate = 50.0
threads = 2
flush_every = 8
blocks = 16

[[fault]]
kind = "ring.prod-corrupt"
target = "device:guest4k:vbd:xvda"
at = 1.0
duration = 1.5
count = 1

[[fault]]
kind = "ring.bad-id"
target = "device:guest16k:vbd:xvda"
at = 1.0
duration = 1.5
count = 1

[[fault]]
kind = "ring.sector-out-of-range"
target = "device:guest64k:vbd:xvda"
at = 1.0
duration = 1.5
count = 1

[[fault]]
kind = "ring.double-fetch"
target = "any-vbd"
at = 3.0
duration = 3.0
probability = 0.2

[checks]
liveness = 5.0
"""
)

WATCH = (
    HEAD
    + """
[[workload]]
kind = "xenstore"
targets = ["all"]
rate = 40.0
blocks = 8

[[fault]]
kind = "xenstore.watch-delay"
target = "domain:guest4k"
at = 0.5
duration = 2.0
delay = 0.1

[[fault]]
kind = "xenstore.watch-duplicate"
target = "xenstored"
at = 3.0
duration = 1.5

[[fault]]
kind = "xenstore.watch-drop"
target = "domain:guest16k"
at = 3.0
duration = 1.5
probability = 0.5

[[fault]]
kind = "xenstore.watch-flood"
target = "domain:guest64k"
at = 5.0
duration = 2.0
rate = 2000.0

[checks]
liveness = 5.0
unaffected = ["guest4k"]
"""
)


def _run(tmp_path: Path, name: str, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    plan = tmp_path / f"{name}.toml"
    plan.write_text(text)
    state = Path(tempfile.mkdtemp(prefix=f"xf-{name}-", dir="/tmp"))  # short socket paths
    history = tmp_path / f"{name}.jsonl"
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "xenpv", "faults", "run", str(plan), "--json"),
                *("--state-dir", str(state), "--history", str(history)),
            ],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            check=False,
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    ops = [json.loads(line) for line in history.read_text().splitlines()]
    return verdict, ops


def _states(ops: list[dict[str, Any]], guest: str) -> list[int]:
    key = f"state:{guest}:vbd:xvda:frontend"
    return [int(op["value"]) for op in ops if op["f"] == "state" and op["key"] == key]


def test_hostile_ring_peers_are_contained(tmp_path: Path) -> None:
    verdict, ops = _run(tmp_path, "ring", RING)
    assert verdict["ok"] and not verdict["violations"] and verdict["faults_injected"] == 4
    for guest in ("guest4k", "guest16k"):  # a broken ring: closed, then reconnected
        states = _states(ops, guest)
        assert 5 in states or 6 in states, (guest, states)
        assert states[-1] == 4, (guest, states)
    failed = [op for op in ops if op["type"] == "fail" and op["f"] in ("write", "read")]
    assert {op["process"].split("/")[0] for op in failed} <= {"guest64k"}  # just that I/O


def test_watch_event_faults_and_a_flood_are_tolerated(tmp_path: Path) -> None:
    verdict, ops = _run(tmp_path, "watch", WATCH)
    assert verdict["ok"] and not verdict["violations"] and verdict["faults_injected"] == 4
    fired = [op for op in ops if op["f"] == "xs-watch" and op["type"] == "info"]
    flooded = [op for op in fired if op["key"].startswith("xs:guest64k:")]
    others = [op for op in fired if not op["key"].startswith("xs:guest64k:")]
    assert len(flooded) > len(others), (len(flooded), len(others))  # it flooded
