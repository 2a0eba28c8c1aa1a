"""`xenpv cluster up|status|down` as a user runs them (subprocesses), on a small topology."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import short_tempdir
from tests.integration.hv_pair import REPO
from tests.integration.xenpv_cli import PREFIX, SMALL_VBD_FEATURES, small_topology, xenpv
from xenpv.toolstack import cluster


def _alive(pid: int) -> bool:
    return cluster._alive(pid)  # zombies (exited, not yet reaped by their parent) are gone


@pytest.mark.parametrize("transport", ["auto", "tcp"])
def test_up_detached_status_down(transport: str) -> None:
    with short_tempdir() as tmp:
        topo = tmp / "small.toml"
        topo.write_text(small_topology(transport, vbd_features=SMALL_VBD_FEATURES))
        state = tmp / "st"
        up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach", "--json")
        assert up.returncode == 0, up.stderr
        pids = [p["pid"] for p in json.loads((state / "cluster.json").read_text())["processes"]]
        try:
            shown = json.loads(up.stdout.splitlines()[-1])
            assert [d["name"] for d in shown["domains"]] == ["be", "g16"]
            assert all(d["connected"] for d in shown["devices"])
            assert (state / "disk.img").stat().st_size == 4 << 20
            assert oct((state / "keys" / "g16.key").stat().st_mode & 0o777) == "0o600"

            # A second `up` in the same state directory is refused with one line.
            again = xenpv("cluster", "up", str(topo), "--state-dir", str(state))
            assert again.returncode == 1
            assert again.stderr.strip().count("\n") == 0
            assert "already running" in again.stderr

            status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
            assert status.returncode == 0, status.stderr
            report = json.loads(status.stdout.splitlines()[-1])
            pages = {d["name"]: d["page_size"] for d in report["domains"]}
            assert pages == {"be": 4096, "g16": 16384}
            by_cls = {d["cls"]: d for d in report["devices"]}
            vbd, vif = by_cls["vbd"], by_cls["vif"]
            assert (vbd["frontend_state"], vbd["backend_state"]) == ("Connected", "Connected")
            # The features the topology switched off or limited are what was negotiated. The
            # 16K guest uses 16 KiB grants (docs/granule-extension.md), and its ring is then
            # at least one granule: max(max-ring-page-order 1, granule order 2).
            assert vbd["grant_size"] in (4096, 16384)
            granule_order = (vbd["grant_size"] // 4096).bit_length() - 1
            assert (vbd["queues"], vbd["ring_page_order"]) == (2, max(1, granule_order))
            assert (vbd["indirect_segments"], vbd["persistent"]) == (0, False)
            assert vif["connected"] and vif["frontend"] == "g16"

            human = xenpv("cluster", "status", "--state-dir", str(state))
            assert human.returncode == 0 and "Conn/Conn" in human.stderr
        finally:
            down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert not any(_alive(pid) for pid in pids)
        assert not (state / "cluster.json").exists()
        assert not list((state / "links").glob("*.sock"))
        gone = xenpv("cluster", "status", "--state-dir", str(state))
        assert gone.returncode == 1 and gone.stderr.startswith("xenpv: error: no cluster")


def test_foreground_up_stops_everything_on_sigint() -> None:
    with short_tempdir() as tmp:
        topo = tmp / "small.toml"
        topo.write_text(small_topology(vbd_features=SMALL_VBD_FEATURES))
        state = tmp / "st"
        proc = subprocess.Popen(
            [*PREFIX, "cluster", "up", str(topo), "--state-dir", str(state), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the status, printed once everything is Connected
            shown = json.loads(line)
            assert all(d["connected"] for d in shown["devices"])
            children = _descendants(proc.pid)
            # xenstored, the fork server and the two domain processes it forked
            assert len(children) == 4
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
            assert not any(_alive(pid) for pid in children)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[[domain]]\nname = 'a'\npage_size = '8K'\n",
            "domain[0].page_size: must be 4K, 16K or 64K",
        ),
        ("[[domain]]\nname = 'a'\n[[vbd]]\nfrontend = 'a'\nbackend = 'zz'\n", "no domain named"),
        ("transport = 'carrier-pigeon'\n[[domain]]\nname = 'a'\n", "transport: must be one of"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_topology_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    topo = tmp_path / "bad.toml"
    topo.write_text(text)
    result = xenpv("cluster", "up", str(topo), "--state-dir", str(tmp_path / "st"))
    assert result.returncode == 2  # a bad topology file is a usage error
    assert result.stderr.startswith("xenpv: error: ") and expected in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "st" / "cluster.json").exists()


def test_missing_topology_file(tmp_path: Path) -> None:
    result = xenpv("cluster", "up", str(tmp_path / "nope.toml"))
    assert result.returncode == 2  # a usage error, found by the parser
    missing = tmp_path / "nope.toml"
    assert result.stderr == f"xenpv cluster up: error: argument file: {missing}: no such file\n"


@pytest.mark.parametrize("detach", [False, True])
def test_fatal_device_error_fails_at_once_naming_device_and_reason(detach: bool) -> None:
    """A backend that cannot open its image (xenbus_dev_fatal) fails `up` within seconds,
    not after the whole timeout (detached: the supervisor's own error line)."""
    with short_tempdir() as tmp:
        topo = tmp / "stuck.toml"
        topo.write_text(
            "[[domain]]\nname = 'be'\nrole = 'backend'\n[[domain]]\nname = 'g'\n"
            "[[vbd]]\nfrontend = 'g'\nbackend = 'be'\nimage = '/nonexistent/d/x.img'\n"
        )
        state = tmp / "st"
        started = time.monotonic()
        args = ["cluster", "up", str(topo), "--state-dir", str(state), "--timeout", "60"]
        result = xenpv(*args, *(["--detach"] if detach else []))
        elapsed = time.monotonic() - started
        assert result.returncode == 1
        line = result.stderr.strip()
        assert line.count("\n") == 0, line
        assert line.startswith("xenpv: error: g/vbd51712 failed (frontend "), line
        assert "cannot open image '/nonexistent/d/x.img'" in line
        assert elapsed < 30, f"took {elapsed:.1f} s: the timeout, not the error, ended it"
        assert not (state / "cluster.json").exists()
        assert not (state / "lock").exists()
        assert not list((state / "links").glob("*.sock"))
