"""Scale (`xenpv bench scale`, `xenpv.toolstack.forkserver`, topology `group`).

- 32 guests on one backend, one process per guest, forked from the fork server: every
  device Connected on both ends, a verified I/O on each (block check, echo with the next
  guest), teardown with no process or socket left;
- guests grouped several per process do the same;
- the fork server's children are the supervisor's like spawned ones: recorded, exit status
  reported, signalled.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import REPO
from xenpv.toolstack import cluster
from xenpv.toolstack.supervisor import Child, Supervisor, wait_exit


async def _spawn_until_signalled(sup: Supervisor, tmp: Path, name: str, forkserver: Path) -> Child:
    """A forked child that runs until signalled (a xenstored), logging to logs/NAME.log."""
    (tmp / "data").mkdir(exist_ok=True)
    args = ["xenstored", "--socket", str(tmp / "xs.sock"), "--data-dir", str(tmp / "data")]
    return await sup.spawn(name, "guest", args, tmp / "logs" / f"{name}.log", forkserver=forkserver)


def _bench(*args: str, limit_s: float) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "xenpv", "bench", "scale", "--json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=limit_s,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_32_guests_one_process_each_connect_and_verify_every_device() -> None:
    result = _bench("--guests", "32", "--timeout", "240", limit_s=480)
    assert result["guests"] == 32 and result["guest_processes"] == 32
    assert result["connected"] == 64
    assert result["verified"] == 64  # a vbd and a vif per guest
    assert result["left_processes"] == [] and result["left_sockets"] == []
    for key in ("seconds_to_connected", "seconds_to_teardown", "guest_uss_mib"):
        assert isinstance(result[key], (int, float))


def test_grouped_guests_connect_and_verify_every_device() -> None:
    result = _bench("--guests", "6", "--group-size", "3", "--timeout", "120", limit_s=300)
    assert result["guest_processes"] == 2
    assert result["connected"] == 12 and result["verified"] == 12
    assert result["left_processes"] == [] and result["left_sockets"] == []


async def test_forked_children_are_recorded_reaped_and_signalled(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    sup = Supervisor(state_file=tmp_path / "cluster.json")
    with trio.fail_after(60):
        try:
            sock = await cluster._start_forkserver(sup, tmp_path)
            done = await sup.spawn(
                "version", "guest", ["--version"], tmp_path / "logs" / "v.log", forkserver=sock
            )
            assert await wait_exit(done) == 0
            assert "xenpv" in (tmp_path / "logs" / "v.log").read_text()
            waiting = await _spawn_until_signalled(sup, tmp_path, "waiting", sock)
            state = json.loads((tmp_path / "cluster.json").read_text())
            assert {p["pid"] for p in state["processes"]} >= {done.pid, waiting.pid}
            await sup.terminate([waiting])
            assert not waiting.running
            assert waiting.proc is not None and waiting.proc.returncode is not None
        finally:
            await sup.stop()
    assert all(not c.running for c in sup.children)


@pytest.mark.parametrize("sig", [signal.SIGKILL])
async def test_a_killed_forked_child_reports_the_signal(tmp_path: Path, sig: int) -> None:
    (tmp_path / "logs").mkdir()
    sup = Supervisor()
    with trio.fail_after(60):
        try:
            sock = await cluster._start_forkserver(sup, tmp_path)
            child = await _spawn_until_signalled(sup, tmp_path, "sleeper", sock)
            assert child.proc is not None
            child.proc.send_signal(sig)
            assert await wait_exit(child) == -sig
        finally:
            await sup.stop()
