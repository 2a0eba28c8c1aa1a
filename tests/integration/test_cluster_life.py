"""The cluster's life under Ctrl-C and crashes, as a user lives it (real processes).

- SIGINT to the process group of `xenpv cluster up` / `xenpv demo` at points of start-up and
  teardown chosen by waiting for files and log lines (plus a few small delays for "any
  moment"): exit 130, no traceback, no process and no temporary file left;
- a second Ctrl-C kills at once;
- a detached cluster's supervisor notices a guest's death (`status` and `probe` say dead)
  and restarts a guest whose policy is `on-failure`;
- a live state directory (foreground or detached) is never clobbered; `status` and `down`
  work for a foreground cluster.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import short_tempdir
from tests.integration.hv_pair import REPO
from tests.integration.xenpv_cli import ENV, PREFIX, small_topology, xenpv
from xenpv.toolstack.supervisor import alive

WAIT = 60.0  # seconds any awaited condition may take on a loaded machine
EXIT_WAIT = 60.0  # seconds an interrupted command may take to stop everything


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A command in its own process group, as a shell runs it (Ctrl-C goes to the group)."""
    return subprocess.Popen(
        [*PREFIX, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
        cwd=REPO,
        start_new_session=True,
    )


def ctrl_c(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGINT)


def wait_for(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str]) -> None:
    """Poll `condition` (a file, a log line) until true; fail if `proc` ended first."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"exited ({proc.returncode}) before {what}: {proc.stderr and proc.stderr.read()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT:.0f} s")
        time.sleep(0.01)


def recorded_pids(state: Path) -> set[int]:
    try:
        value = json.loads((state / "cluster.json").read_text())
    except (OSError, ValueError):
        return set()
    pids = {int(p["pid"]) for p in value.get("processes", [])}
    return pids | ({int(value["supervisor"])} if "supervisor" in value else set())


def processes_using(path: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", str(path)], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if "pgrep" not in line]


def log_has(path: Path, text: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return text in path.read_text(errors="replace")
        except OSError:
            return False

    return check


def state_has(state: Path, test: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return test(json.loads((state / "cluster.json").read_text()))
        except (OSError, ValueError):
            return False

    return check


def up_until(topo: Path, state: Path, point: str) -> tuple[subprocess.Popen[str], set[int]]:
    """`cluster up` in the foreground, once its start-up reached `point` (one of
    START_UP_POINTS), and the pids it has recorded."""
    proc = start("cluster", "up", str(topo), "--state-dir", str(state))
    wait_for(point, START_UP_POINTS[point](state), proc)
    return proc, recorded_pids(state)


def up_ready(topo: Path, state: Path) -> tuple[subprocess.Popen[str], set[int]]:
    """`cluster up --json` in the foreground, once ready (its JSON line is out), and the pids
    it has recorded."""
    proc = start("cluster", "up", str(topo), "--state-dir", str(state), "--json")
    assert proc.stdout is not None
    assert json.loads(proc.stdout.readline())["devices"]
    return proc, recorded_pids(state)


def finish(proc: subprocess.Popen[str], pids: set[int], state: Path) -> tuple[int, str]:
    """Wait for the command, collecting the pids it records meanwhile; kill it on timeout."""
    deadline = time.monotonic() + EXIT_WAIT
    while proc.poll() is None:
        pids |= recorded_pids(state)
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"still running {EXIT_WAIT:.0f} s after Ctrl-C")
        time.sleep(0.02)
    _out, err = proc.communicate()
    return proc.returncode, err


def assert_nothing_left(state: Path, pids: set[int], err: str) -> None:
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left: {left}"
    assert not processes_using(state), processes_using(state)
    for name in ("cluster.json", "cluster.json.tmp", "lock", "xenstored.sock"):
        assert not (state / name).exists(), name
    assert not list((state / "links").glob("*.sock"))


@contextmanager
def topology_dir(restart: str = "no") -> Iterator[tuple[Path, Path]]:
    with short_tempdir() as tmp:
        topo = tmp / "small.toml"
        topo.write_text(small_topology(restart=restart))
        try:
            yield topo, tmp / "st"
        finally:
            for line in processes_using(tmp):  # never leave a cluster behind a failed test
                os.kill(int(line.split()[0]), signal.SIGKILL)


# -- Ctrl-C during `cluster up` -----------------------------------------------------------------

START_UP_POINTS: dict[str, Callable[[Path], Callable[[], bool]]] = {
    "state dir locked": lambda st: (st / "lock").exists,
    "xenstored spawned": lambda st: (st / "logs" / "xenstored.log").exists,
    "xenstored ready": lambda st: state_has(st, lambda s: "xenstore" in s),
    "domains created": lambda st: state_has(st, lambda s: bool(s.get("domains"))),
    "guest spawned": lambda st: state_has(
        st, lambda s: any(p.get("name") == "g16" for p in s.get("processes", []))
    ),
    "backend ready": lambda st: log_has(st / "logs" / "be.log", "domain ready"),
}


@pytest.mark.parametrize("point", list(START_UP_POINTS))
def test_ctrl_c_during_up_start_up_leaves_nothing(point: str) -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_until(topo, state, point)
        ctrl_c(proc)
        code, err = finish(proc, pids, state)
        assert code == 130, err
        assert "xenpv: interrupted" in err
        assert_nothing_left(state, pids, err)


def test_sigterm_during_start_up_is_an_interruption_too() -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_until(topo, state, "guest spawned")
        proc.terminate()  # SIGTERM to the command alone, as a service manager sends it
        code, err = finish(proc, pids, state)
        assert code == 130, err
        assert_nothing_left(state, pids, err)


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.4, 0.7, 1.0])
def test_ctrl_c_at_any_moment_of_up_leaves_nothing(delay: float) -> None:
    with topology_dir() as (topo, state):
        proc = start("cluster", "up", str(topo), "--state-dir", str(state))
        # Counted from xenpv's first step (the state dir): a Ctrl-C while the interpreter
        # itself starts (its `site` imports) is Python's, before any xenpv code runs.
        wait_for("the state directory", state.exists, proc)
        time.sleep(delay)  # "any moment": a spread of delays, not a synchronisation
        pids = recorded_pids(state)
        ctrl_c(proc)
        code, err = finish(proc, pids, state)
        # Ready before the signal came (a fast machine): then Ctrl-C is its normal stop.
        assert code in (0, 130), err
        assert_nothing_left(state, pids | recorded_pids(state), err)


def test_ctrl_c_during_teardown_and_twice_kills_at_once() -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_ready(topo, state)
        ctrl_c(proc)  # the normal stop of a foreground cluster...
        wait_for("the guest stopping", log_has(state / "logs" / "g16.log", "stopping"), proc)
        ctrl_c(proc)  # ...and a second Ctrl-C during it: SIGKILL, no grace
        code, err = finish(proc, pids, state)
        assert code == 130, err
        assert_nothing_left(state, pids, err)


def test_double_ctrl_c_during_start_up() -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_until(topo, state, "guest spawned")
        ctrl_c(proc)
        ctrl_c(proc)
        started = time.monotonic()
        code, err = finish(proc, pids, state)
        assert code == 130, err
        assert time.monotonic() - started < 15  # no grace periods once killed
        assert_nothing_left(state, pids, err)


def test_foreground_sigint_after_ready_is_a_normal_stop() -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_ready(topo, state)
        ctrl_c(proc)
        code, err = finish(proc, pids, state)
        assert code == 0, err
        assert err.rstrip().endswith("xenpv: cluster stopped")
        assert_nothing_left(state, pids, err)


# -- Ctrl-C during `demo` -----------------------------------------------------------------------


def _demo_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("xenpv-demo-*"))


def _demo_state(tmp: Path) -> Path:
    dirs = _demo_dirs(tmp)
    return dirs[0] if dirs else tmp / "none"


DEMO_POINTS: dict[str, Callable[[Path], bool]] = {
    "temporary dir made": lambda tmp: bool(_demo_dirs(tmp)),
    "xenstored spawned": lambda tmp: (_demo_state(tmp) / "logs" / "xenstored.log").exists(),
    # xenstored and the 4 domains, and the fork server when domains are forked from one.
    "every domain spawned": lambda tmp: state_has(
        _demo_state(tmp), lambda s: len(s.get("processes", [])) >= 5
    )(),
    # A first check of the guest's self-test round is logged: the round is under way.
    "self-test running": lambda tmp: log_has(
        _demo_state(tmp) / "logs" / "guest4k.log", '"event": "check"'
    )(),
    "teardown": lambda tmp: log_has(_demo_state(tmp) / "logs" / "guest4k.log", "stopping")(),
}


@pytest.mark.parametrize("point", list(DEMO_POINTS))
def test_ctrl_c_during_demo_leaves_nothing(point: str) -> None:
    with short_tempdir() as tmp:
        proc = start("demo", env=dict(ENV, TMPDIR=str(tmp)))
        wait_for(point, lambda: DEMO_POINTS[point](tmp), proc)
        state = _demo_state(tmp)
        pids = recorded_pids(state)
        ctrl_c(proc)
        code, err = finish(proc, pids, state)
        assert code == 130, err
        assert "Traceback" not in err, err
        assert not [pid for pid in pids if alive(pid)]
        assert not processes_using(tmp), processes_using(tmp)
        assert not _demo_dirs(tmp), "the demo's temporary directory is left"


# -- a detached cluster -------------------------------------------------------------------------


def _up_detached(topo: Path, state: Path) -> subprocess.CompletedProcess[str]:
    up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach", "--json")
    assert up.returncode == 0, up.stderr
    assert "cluster stopped" not in up.stderr
    assert "cluster running; stop it with" in up.stderr
    return up


def _pid_of(state: Path, name: str) -> int:
    value = json.loads((state / "cluster.json").read_text())
    return next(int(p["pid"]) for p in value["processes"] if p["name"] == name)


def _poll(what: str, condition: Callable[[], bool], limit: float) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit:
            pytest.fail(f"no {what} within {limit:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


def test_detached_guest_killed_is_reported_dead() -> None:
    with topology_dir() as (topo, state):
        _up_detached(topo, state)
        pids = recorded_pids(state)
        try:
            unix = json.loads((state / "cluster.json").read_text())["xenstore"]["unix"]
            os.kill(_pid_of(state, "g16"), signal.SIGKILL)

            def status_says_dead() -> bool:
                return xenpv("cluster", "status", "--state-dir", str(state)).returncode == 1

            _poll("dead domain in status", status_says_dead, 20)
            status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
            assert status.returncode == 1
            report = json.loads(status.stdout.splitlines()[-1])
            assert "killed by SIGKILL" in report["dead"]["g16"]["reason"]
            assert not any(d["connected"] for d in report["devices"])
            assert "g16" not in [d["name"] for d in report["domains"]]
            assert "domain g16 is dead" in status.stderr
            recorded = json.loads((state / "cluster.json").read_text())
            assert recorded["dead"]["g16"]["status"] == -signal.SIGKILL

            probe = xenpv("probe", "domain", "g16", "--connected", "--xenstore", unix)
            assert probe.returncode == 1
            assert "domain g16 is dead" in probe.stderr
            backend = xenpv("probe", "domain", "be", "--xenstore", unix)
            assert backend.returncode == 0, backend.stderr
        finally:
            down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert_nothing_left(state, pids, down.stderr)


def test_detached_guest_with_restart_on_failure_comes_back() -> None:
    with topology_dir(restart="on-failure") as (topo, state):
        _up_detached(topo, state)
        pids = recorded_pids(state)
        try:
            first = _pid_of(state, "g16")
            os.kill(first, signal.SIGKILL)

            def restarted_and_connected() -> bool:
                if _pid_of(state, "g16") == first:
                    return False
                status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
                report = json.loads(status.stdout.splitlines()[-1]) if status.stdout else {}
                devices = report.get("devices", [])
                return (
                    status.returncode == 0
                    and len(devices) == 2
                    and all(d["connected"] for d in devices)
                )

            _poll("restarted guest Connected", restarted_and_connected, 60)
            recorded = json.loads((state / "cluster.json").read_text())
            assert recorded["restarts"] == {"g16": 1}
            assert not recorded["dead"]
            pids |= recorded_pids(state)
            unix = recorded["xenstore"]["unix"]
            probe = xenpv("probe", "domain", "g16", "--connected", "--xenstore", unix)
            assert probe.returncode == 0, probe.stderr
        finally:
            down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert_nothing_left(state, pids, down.stderr)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_while_a_detached_cluster_starts_leaves_nothing(presses: int) -> None:
    with topology_dir() as (topo, state):
        proc = start("cluster", "up", str(topo), "--state-dir", str(state), "--detach")
        wait_for("guest spawned", START_UP_POINTS["guest spawned"](state), proc)
        pids = recorded_pids(state)
        for _ in range(presses):
            ctrl_c(proc)
        code, err = finish(proc, pids, state)
        assert code == 130, err
        _poll("the supervisor's exit", lambda: not any(alive(p) for p in pids), 30)
        assert_nothing_left(state, pids, err)


# -- no clobbering ------------------------------------------------------------------------------


def test_live_foreground_state_dir_is_not_clobbered() -> None:
    with topology_dir() as (topo, state):
        proc, pids = up_ready(topo, state)
        try:
            sock = state / "xenstored.sock"
            inode = sock.stat().st_ino
            for again in (
                xenpv("cluster", "up", str(topo), "--state-dir", str(state)),
                xenpv("demo", "--state-dir", str(state)),
            ):
                assert again.returncode == 1, again.stderr
                assert again.stderr.strip().count("\n") == 0, again.stderr
                assert "already running" in again.stderr
            assert sock.stat().st_ino == inode  # the live cluster's socket is untouched

            status = xenpv("cluster", "status", "--state-dir", str(state), "--json")
            assert status.returncode == 0, status.stderr
            assert all(d["connected"] for d in json.loads(status.stdout)["devices"])
        finally:
            down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        code, err = finish(proc, pids, state)
        assert code == 0, err  # stopped by `down`: its normal end
        assert_nothing_left(state, pids, err)


def test_processes_of_a_killed_supervisor_are_refused_then_stopped_by_down() -> None:
    with topology_dir() as (topo, state):
        _up_detached(topo, state)
        pids = recorded_pids(state)
        supervisor = json.loads((state / "cluster.json").read_text())["supervisor"]
        os.kill(supervisor, signal.SIGKILL)
        _poll("the supervisor's death", lambda: not alive(supervisor), 10)
        again = xenpv("cluster", "up", str(topo), "--state-dir", str(state))
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert "left by a supervisor that died" in again.stderr
        down = xenpv("cluster", "down", "--state-dir", str(state))
        assert down.returncode == 0, down.stderr
        assert_nothing_left(state, pids, down.stderr)


def test_stale_lock_of_a_dead_supervisor_is_taken_over() -> None:
    with topology_dir() as (topo, state):
        state.mkdir()
        (state / "lock").write_text("999999\n")  # nobody holds it: a stale lock
        proc = start("cluster", "up", str(topo), "--state-dir", str(state), "--json")
        assert proc.stdout is not None
        line = proc.stdout.readline()
        pids = recorded_pids(state)
        ctrl_c(proc)
        code, err = finish(proc, pids, state)
        assert line and code == 0, err
        assert_nothing_left(state, pids, err)


# -- progress on a terminal -----------------------------------------------------------------------


def _read_pty_until(fd: int, text: bytes, proc: subprocess.Popen[str]) -> bytes:
    seen = b""
    deadline = time.monotonic() + WAIT
    while text not in seen:
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f"no {text!r} on the terminal: {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            seen += os.read(fd, 65536)
    return seen


def test_progress_shows_on_a_terminal_only() -> None:
    with topology_dir() as (topo, state):
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [*PREFIX, "cluster", "up", str(topo), "--state-dir", str(state)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
            env=ENV,
            cwd=REPO,
            start_new_session=True,
        )
        os.close(slave)
        try:
            shown = _read_pty_until(master, b"cluster running", proc)
            assert b"starting xenstored" in shown
            assert b"devices Connected" in shown  # the wait's counts
            pids = recorded_pids(state)
            ctrl_c(proc)
            code, _err = finish(proc, pids, state)
            assert code == 0
        finally:
            os.close(master)
        assert_nothing_left(state, pids, "")
    # Not a terminal (every other test here): nothing but the lines it always prints.
    with topology_dir() as (topo, state):
        up = xenpv("cluster", "up", str(topo), "--state-dir", str(state), "--detach", "--json")
        try:
            assert up.returncode == 0, up.stderr
            assert "waiting" not in up.stderr and "starting" not in up.stderr
        finally:
            xenpv("cluster", "down", "--state-dir", str(state))
