"""`xenpv faults run` end to end: a short mixed plan against a real cluster (every process a
real subprocess), its verdict and JSON line, the history checked again offline, nothing left
behind; a deliberately broken disk makes the run fail with the block checker's violation; two
runs of one seed print one schedule hash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.faults_cli import run_faults, run_verdict

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 90.0  # the plan lasts 10 s; start-up and teardown a few more

MIXED = """
name = "mixed"
description = "one short window of several families under every workload"

[run]
seed = 7
duration = 10.0
quiet = 4.0
topology = "demo"

[[workload]]
kind = "block"
targets = ["all"]
rate = 40.0
threads = 1
flush_every = 8
blocks = 16

[[workload]]
kind = "net"
targets = ["all"]
rate = 40.0
size = 256

[[workload]]
kind = "xenstore"
targets = ["all"]
rate = 20.0
blocks = 8

[[fault]]
kind = "link.delay"
target = "link:backend-guest64k"
at = 0.5
duration = 1.0
delay = 0.002

[[fault]]
kind = "storage.latency"
target = "device:guest4k:vbd:xvda"
at = 1.0
duration = 1.5
delay = 0.002

[[fault]]
kind = "event.delay"
target = "device:guest16k:vbd:xvda"
at = 2.0
duration = 1.0
delay = 0.002

[[fault]]
kind = "xenstore.commit-eagain"
target = "domain:guest4k"
at = 3.0
duration = 1.0
one_in = 2

[[fault]]
kind = "process.stop"
target = "domain:guest16k"
at = 4.5
duration = 1.0

[checks]
liveness = 4.0
"""


def _run(
    tmp_path: Path, name: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], Path, Path, bool]:
    """(result, state dir (removed), history, whether the cluster's state file was left)."""
    plan = tmp_path / "mixed.toml"
    plan.write_text(MIXED)
    # Short: the state directory holds Unix sockets (pytest's tmp paths can be too long).
    state = Path(tempfile.mkdtemp(prefix=f"xf-{name}-", dir="/tmp"))
    history = tmp_path / f"{name}.jsonl"
    result = run_faults(str(plan), state, history, RUN_TIMEOUT, env)
    left = (state / "cluster.json").exists()
    shutil.rmtree(state, ignore_errors=True)  # the run stopped everything it started
    return result, state, history, left


def _processes_using(path: Path) -> list[int]:
    """Pids whose command line names `path` (the run's cluster processes do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found


def _fault_lines(history: Path) -> tuple[list[str], list[str]]:
    starts, stops = [], []
    for line in history.read_text().splitlines():
        op = json.loads(line)
        if op["f"] == "fault-start":
            starts.append(op["value"]["kind"])
        elif op["f"] == "fault-stop":
            stops.append(op["value"]["kind"])
    return starts, stops


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path, bool]:
    return _run(tmp_path_factory.mktemp("faults-run"), "good")


def test_mixed_plan_passes_end_to_end(mixed_run: tuple[Any, Path, Path, bool]) -> None:
    result, state, history, cluster_state_left = mixed_run
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    verdict = run_verdict(result)
    assert verdict["ok"] is True
    assert verdict["violations"] == []
    assert verdict["faults_injected"] == 5
    assert verdict["ops"] > 100
    assert len(verdict["schedule_hash"]) == 64
    assert "PASS" in result.stdout
    # Each named fault was started and healed, and the history checks again offline.
    starts, stops = _fault_lines(history)
    assert (
        sorted(starts)
        == sorted(stops)
        == sorted(
            [
                "link.delay",
                "storage.latency",
                "event.delay",
                "xenstore.commit-eagain",
                "process.stop",
            ]
        )
    )
    check = subprocess.run(
        [sys.executable, "-m", "xenpv", "faults", "check", str(history), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=False,
    )
    assert check.returncode == 0, check.stdout
    assert json.loads(check.stdout)["schedule_hash"] == verdict["schedule_hash"]
    # Nothing outlives the run: no process of its cluster, no cluster state.
    assert _processes_using(state) == []
    assert not cluster_state_left


def test_broken_disk_fails_the_run_with_the_block_checker(
    tmp_path: Path, mixed_run: tuple[Any, Path, Path, bool]
) -> None:
    # A test-only switch makes every backend disk acknowledge writes without keeping them.
    result, state, _history, _left = _run(
        tmp_path, "broken", env={"XENPV_FAULTS_BROKEN_STORAGE": "drop-writes"}
    )
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    verdict = run_verdict(result)
    assert verdict["ok"] is False
    assert verdict["checkers"]["block"] > 0
    assert any(v["checker"] == "block" for v in verdict["violations"])
    assert "FAIL" in result.stdout
    # The same plan and seed: the same schedule, whatever the execution did.
    assert verdict["schedule_hash"] == run_verdict(mixed_run[0])["schedule_hash"]
    assert _processes_using(state) == []


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    """Until `path` holds `text` (the run wrote it), the process ended, or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_ctrl_c_heals_every_fault_and_stops_every_process(tmp_path: Path) -> None:
    plan = tmp_path / "mixed.toml"
    plan.write_text(MIXED)
    state = Path(tempfile.mkdtemp(prefix="xf-int-", dir="/tmp"))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xenpv", "faults", "run", str(plan), "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        runner_log = state / "history" / "runner.jsonl"
        try:
            _wait_for_line(runner_log, '"fault-start"', proc, RUN_TIMEOUT)
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err[-3000:]
        assert err.strip().splitlines()[-1] == "xenpv: interrupted"
        lines = runner_log.read_text()
        assert lines.count('"fault-start"') == lines.count('"fault-stop"') >= 1
        assert _processes_using(state) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)
