"""`xenpv faults run --attach`: a plan against a cluster the runner did not start (how
compose's `chaos` service runs one). A detached demo cluster with `XENPV_FAULTS=1` and
guests restarted on failure stands in for compose's containers; the runner reaches it through
xenstored only. A guest kills itself (its agent applies the process fault: the runner has no
pid to signal) and is brought back by the cluster's restart policy; the verdict passes, the
history shows the faults and the guest's death and return, and the cluster is still healthy
afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.test_faults_run import MIXED

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120.0

# The mixed plan's run and its block and net workloads, with faults of its own: a
# self-applied kill and hold. Not its xenstore workload: this launcher restarts a killed
# domain by re-creating it, which drops the domain's xenstore data (compose's restart keeps
# the records), and the xenstore checker would rightly see acknowledged writes gone.
_WORKLOADS = [w for w in MIXED.split("[[fault]]")[0].split("[[workload]]") if "xenstore" not in w]
PLAN = (
    "[[workload]]".join(_WORKLOADS)
    + """
[[fault]]
kind = "storage.latency"
target = "device:guest4k:vbd:xvda"
at = 0.5
duration = 1.5
delay = 0.002

[[fault]]
kind = "process.kill"
target = "domain:guest64k"
at = 2.0
duration = 1.0

[[fault]]
kind = "process.stop"
target = "domain:guest16k"
at = 3.0
duration = 1.0

[checks]
liveness = 6.0
"""
)


def xenpv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenpv", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        env=env,
    )


@contextmanager
def detached_demo() -> Iterator[Path]:
    """A detached demo cluster whose guests restart on failure, with storage faults
    possible; stopped (and its state directory removed) whatever happens."""
    state = Path(tempfile.mkdtemp(prefix="xfa-", dir="/tmp"))  # short: Unix socket paths
    example = xenpv("topology", "example")
    assert example.returncode == 0, example.stderr
    topo = state.parent / f"{state.name}.toml"
    topo.write_text(
        example.stdout.replace('role = "guest"', 'role = "guest"\nrestart = "on-failure"')
    )
    env = {**os.environ, "XENPV_FAULTS": "1"}
    try:
        up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach", env=env)
        assert up.returncode == 0, up.stderr
        yield state
    finally:
        down = xenpv("cluster", "down", "--state-dir", str(state))
        topo.unlink(missing_ok=True)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr


def test_attached_run_passes_and_a_guest_kills_itself(tmp_path: Path) -> None:
    plan = tmp_path / "attached.toml"
    plan.write_text(PLAN)
    with detached_demo() as state:
        unix = json.loads((state / "cluster.json").read_text())["xenstore"]["unix"]
        histories = state / "fault-histories"
        history = tmp_path / "history.jsonl"
        run = xenpv(
            "faults", "run", str(plan), "--attach", unix,
            "--history-dir", str(histories), "--history", str(history), "--json",
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        verdict = json.loads(run.stdout.strip().splitlines()[-1])
        assert verdict["ok"] is True and verdict["faults_injected"] == 3
        lines = [json.loads(line) for line in history.read_text().splitlines()]
        started = {op["value"]["kind"] for op in lines if op.get("f") == "fault-start"}
        assert started == {"storage.latency", "process.kill", "process.stop"}
        # The killed guest came back: its agent began the run a second time.
        assert (histories / "guest64k.incarnation").read_text() == "1"
        assert (histories / "guest16k.incarnation").read_text() == "0"
        # And the cluster is still whole after the run.
        status = xenpv("cluster", "status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attach", "unix:/nonexistent.sock"], "--attach needs --history-dir"),
        (["--history-dir", "/tmp/x"], "--history-dir goes with --attach"),
    ],
)
def test_attach_flags_are_checked_before_anything_starts(args: list[str], message: str) -> None:
    run = xenpv("faults", "run", "smoke", *args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_a_kind_that_needs_the_runners_supervisor_is_refused_when_attached(
    tmp_path: Path,
) -> None:
    plan = tmp_path / "xs.toml"
    plan.write_text(
        PLAN.split("[[fault]]")[0]
        + '[[fault]]\nkind = "xenstore.xenstored-kill"\ntarget = "xenstored"\nat = 1.0\n'
        + "duration = 1.0\n"
    )
    run = xenpv(
        "faults", "run", str(plan), "--attach", "unix:/nonexistent.sock",
        "--history-dir", str(tmp_path),
    )  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "xenstore.xenstored-kill" in run.stderr
