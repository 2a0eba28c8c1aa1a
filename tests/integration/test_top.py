"""`xenpv top` and the counters in `xenpv cluster status --json` on a running cluster
(docs/metrics.md): one-shot forms for scripts, and the live view leaving on `q` and on
Ctrl-C with the terminal restored."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import termios
import time
from pathlib import Path

from tests.integration.conftest import short_tempdir
from tests.integration.hv_pair import REPO
from tests.integration.xenpv_cli import PREFIX, SMALL_VBD_FEATURES, small_topology, xenpv
from xenpv.metrics.files import read_all


def wait_for_counters(state: Path, names: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while {p.stem for p in (state / "metrics").glob("*.json")} < names:
        assert time.monotonic() < deadline, "no counter files from the domain processes"
        time.sleep(0.1)  # polling a directory another process writes: no event to wait on


def wait_for_drivers(state: Path, name: str, drivers: set[str], timeout: float = 20) -> None:
    """Until process `name`'s snapshot has a section for each of `drivers` (their queues
    register when the devices connect)."""
    deadline = time.monotonic() + timeout
    while not drivers <= set(read_all(state).get(name, {})):
        assert time.monotonic() < deadline, f"no {drivers} counters from {name}"
        time.sleep(0.1)  # polling a file another process writes: no event to wait on


def live_top(state: Path, leave: str) -> tuple[int, bool]:
    """Run the live view on a pseudo-terminal, leave it by `q` or Ctrl-C (SIGINT); its exit
    status, and whether the terminal's modes are back as they were."""
    main, child_end = pty.openpty()
    modes = termios.tcgetattr(child_end)
    proc = subprocess.Popen(
        [*PREFIX, "top", "--state-dir", str(state), "--interval", "0.2"],
        stdin=child_end,
        stdout=child_end,
        stderr=child_end,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while b"xenpv top" not in seen:  # the table is up (the key handler with it)
            assert time.monotonic() < deadline, seen[-500:]
            seen += os.read(main, 65536)
        if leave == "q":
            os.write(main, b"q")
        else:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
        return code, termios.tcgetattr(child_end) == modes
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
        os.close(child_end)


def test_top_and_status_show_the_counters_of_a_running_cluster() -> None:
    with short_tempdir() as tmp:
        topo = tmp / "small.toml"
        topo.write_text(small_topology(vbd_features=SMALL_VBD_FEATURES))
        state = tmp / "st"
        up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach")
        assert up.returncode == 0, up.stderr
        try:
            wait_for_counters(state, {"be", "g16"})
            top = xenpv("top", "--state-dir", str(state), "--json", "--interval", "0.5")
            assert top.returncode == 0, top.stderr
            found = json.loads(top.stdout)["rows"]
            domids = json.loads((state / "cluster.json").read_text())["domains"]
            be, guest_id = str(domids["be"]), str(domids["g16"])
            pairs = {(r["process"], r["peer"]) for r in found}
            assert {("be", guest_id), ("g16", be)} <= pairs, found
            assert all(r["state"] == "live" and r["drops"] >= 0 for r in found)

            once = xenpv("top", "--state-dir", str(state), "--once", "--interval", "0.2")
            assert once.returncode == 0 and "IOPS" in once.stdout, once.stderr

            status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
            counters = json.loads(status.stdout.splitlines()[-1])["counters"]
            # Connecting the devices issued grants (rings), and the backend mapped them.
            guest = counters["g16"]["domains"][guest_id]
            assert guest["grants"]["grants_issued"] > 0
            backend = counters["be"]["domains"][be]["peers"][guest_id]
            assert backend["map_segments"] + backend["copy_segments"] > 0
            # The driver queues' counters travel the same path (docs/metrics.md).
            wait_for_drivers(state, "be", {"blkback", "netback"})
            wait_for_drivers(state, "g16", {"blkfront", "netfront"})
            status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
            counters = json.loads(status.stdout.splitlines()[-1])["counters"]
            blkfront = counters["g16"]["blkfront"]
            assert {q["queue"] for q in blkfront} == {0, 1}  # queues = 2
            assert {(q["domain"], q["backend"]) for q in blkfront} == {(int(guest_id), int(be))}
            (netback,) = {(q["domain"], q["frontend"]) for q in counters["be"]["netback"]}
            assert netback == (int(be), int(guest_id))

            for leave in ("q", "ctrl-c"):
                code, restored = live_top(state, leave)
                assert (code, restored) == (0, True), leave
        finally:
            down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert not list((state / "metrics").glob("*.json"))  # each process removed its file


def test_top_without_a_cluster_is_one_line(tmp_path: Path) -> None:
    result = xenpv("top", "--state-dir", str(tmp_path), "--once")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "no cluster" in result.stderr
