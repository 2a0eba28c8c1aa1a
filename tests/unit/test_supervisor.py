"""The process supervisor (`xenpv.toolstack.supervisor`), the state-directory lock, the
topology's restart policy and the CLI's handling of exception groups."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from xenpv import cli
from xenpv.errors import XenpvError
from xenpv.toolstack.supervisor import (
    Child,
    StateDirBusy,
    Supervisor,
    alive,
    describe_status,
    lock_holder,
    lock_state_dir,
    stop_popen,
    unlock_state_dir,
)
from xenpv.toolstack.topology import TopologyError, loads

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# Ignores SIGTERM (as a process stuck in a graceful stop would), then says so on fd argv[1].
STUBBORN = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "os.write(int(sys.argv[1]), b'ready'); time.sleep(60)"
)


async def _spawn_stubborn(sup: Supervisor, log: Path) -> Child:
    """A child that ignores SIGTERM, once it does (it writes to a pipe when it is set)."""
    read_fd, write_fd = os.pipe()
    args = [sys.executable, "-c", STUBBORN, str(write_fd)]
    try:
        child = await sup.spawn("stubborn", "guest", args, log, pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    async with trio.lowlevel.FdStream(read_fd) as ready:
        assert await ready.receive_some() == b"ready"
    return child


async def test_spawn_records_at_once_and_stop_goes_in_order(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    sup = Supervisor(state_file=state, describe=lambda: {"what": "test"})
    with trio.fail_after(30):
        store = await sup.spawn("store", "xenstored", SLEEPER, tmp_path / "s.log")
        backend = await sup.spawn("be", "backend", SLEEPER, tmp_path / "b.log", domid=1)
        guest = await sup.spawn("g", "guest", SLEEPER, tmp_path / "g.log", domid=2)
        recorded = json.loads(state.read_text())
        assert recorded["what"] == "test"
        assert [p["pid"] for p in recorded["processes"]] == [store.pid, backend.pid, guest.pid]
        order: list[str] = []

        async def before_xenstored() -> None:
            order.append("records")
            assert not guest.running and not backend.running and store.running

        await sup.stop(before_xenstored)
        assert order == ["records"]
        assert not any(alive(c.pid) for c in (store, backend, guest))
        assert guest.proc is not None and guest.proc.returncode == -signal.SIGTERM


async def test_a_process_ignoring_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    sup = Supervisor()
    with trio.fail_after(30):
        child = await _spawn_stubborn(sup, tmp_path / "x.log")
        await sup.stop(grace=0.3)
        assert child.proc is not None and child.proc.returncode == -signal.SIGKILL


async def test_escalation_kills_at_once_during_a_stop(tmp_path: Path) -> None:
    sup = Supervisor()
    with trio.fail_after(20):  # the grace asked for is far longer: escalation ends it
        child = await _spawn_stubborn(sup, tmp_path / "x.log")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.stop, None, 600.0)
            await trio.testing.wait_all_tasks_blocked()  # the stop waits out its grace
            assert child.running
            sup.escalate()
        assert child.proc is not None and child.proc.returncode == -signal.SIGKILL


def test_describe_status() -> None:
    assert describe_status(0) == "exited with status 0"
    assert describe_status(3) == "exited with status 3"
    assert describe_status(-9) == "killed by SIGKILL"


def test_the_lock_refuses_a_second_owner_and_a_stale_one_is_taken_over(tmp_path: Path) -> None:
    assert lock_holder(tmp_path) is None
    fd = lock_state_dir(tmp_path, lambda pid: f"busy {pid}")
    try:
        assert lock_holder(tmp_path) is not None  # our own pid (flock is per open file)
        with pytest.raises(StateDirBusy, match=r"^busy \d+$"):
            lock_state_dir(tmp_path, lambda pid: f"busy {pid}")
    finally:
        unlock_state_dir(tmp_path, fd)
    assert not (tmp_path / "lock").exists()
    (tmp_path / "lock").write_text("999999\n")  # left by a dead process: nobody holds it
    assert lock_holder(tmp_path) is None
    fd = lock_state_dir(tmp_path, lambda pid: "busy")
    unlock_state_dir(tmp_path, fd)


BASE = '[[domain]]\nname = "be"\nrole = "backend"\n[[domain]]\nname = "g"\n'


def test_restart_policy() -> None:
    assert loads(BASE).domain("g").restart == "no"
    topo = loads(BASE.replace('name = "g"', 'name = "g"\nrestart = "on-failure"'))
    assert topo.domain("g").restart == "on-failure"
    with pytest.raises(TopologyError, match=r"domain\[1\]\.restart: must be one of 'no', 'on-"):
        loads(BASE.replace('name = "g"', 'name = "g"\nrestart = "always"'))


def _cli_with(monkeypatch: pytest.MonkeyPatch, run: object) -> None:
    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser()
        parser.add_argument("--log-level", default="info")
        parser.add_argument("--log-format", default="console")
        parser.set_defaults(run=run)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)


def test_cli_error_in_an_exception_group_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(_args: argparse.Namespace) -> int:
        inner = BaseExceptionGroup("inner", [XenpvError("the device is gone")])
        raise BaseExceptionGroup("outer", [inner])

    _cli_with(monkeypatch, run)
    assert cli.main([]) == 1
    assert capsys.readouterr().err == "xenpv: error: the device is gone\n"


def test_cli_interrupt_in_an_exception_group_is_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(_args: argparse.Namespace) -> int:
        raise BaseExceptionGroup("g", [KeyboardInterrupt(), XenpvError("lost")])

    _cli_with(monkeypatch, run)
    assert cli.main([]) == 130
    assert capsys.readouterr().err == "xenpv: interrupted\n"


def test_stop_popen_terminates_then_kills_a_child_that_ignores_sigterm() -> None:
    polite = subprocess.Popen(SLEEPER)
    assert stop_popen(polite, 30) == -signal.SIGTERM
    assert stop_popen(polite, 30) == -signal.SIGTERM  # already stopped: its status again
    read_fd, write_fd = os.pipe()
    stubborn = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, str(write_fd)], pass_fds=(write_fd,)
    )
    os.close(write_fd)
    try:
        assert os.read(read_fd, 5) == b"ready"
    finally:
        os.close(read_fd)
    assert stop_popen(stubborn, 0.2) is None
    assert stubborn.returncode == -signal.SIGKILL
