"""Ctrl-C during `xenpv bench`: every process the bench started is stopped by its supervisor,
its temporary directory removed, the exit status 130, and no traceback (no figures read)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
POINT_TIMEOUT = 120.0  # until the bench reaches the point where it is interrupted
EXIT_TIMEOUT = 60.0  # from the SIGINT to its exit (stops are bounded by the supervisor)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A short directory under /tmp (Unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="xbi-", dir="/tmp"))
    yield path
    # After a failed test only: what the bench left running (in sessions of their own).
    found = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def _start(args: list[str], scratch: Path) -> subprocess.Popen[str]:
    # Its own process group, as a shell gives a foreground command; TMPDIR: its temp dir
    # lands in `scratch`, so that what it leaves (files, processes) is found there.
    return subprocess.Popen(
        [sys.executable, "-m", "xenpv", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(scratch)),
    )


def _wait_for_file(scratch: Path, pattern: str, proc: subprocess.Popen[str]) -> None:
    """Until a file matching `pattern` appears under `scratch` (the bench reached that
    point), the bench ended, or the timeout."""
    deadline = time.monotonic() + POINT_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if any(scratch.glob(pattern)):
            return
        time.sleep(0.05)  # polling a file another process creates
    raise AssertionError(f"{pattern} never appeared under {scratch} (exit {proc.poll()})")


def _interrupt_and_check(proc: subprocess.Popen[str], scratch: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    left = subprocess.run(["pgrep", "-af", str(scratch)], capture_output=True, text=True)
    assert left.stdout == "", f"processes left: {left.stdout}"
    assert list(scratch.iterdir()) == [], "the bench's temporary directory is left"


@pytest.mark.parametrize(
    "point",
    ["*/logs/echo-0.log", "*/logs/domain-socket-default.log", "*/logs/domain-shm-0.log"],
)
def test_ctrl_c_stops_bench_link(scratch: Path, point: str) -> None:
    proc = _start(["bench", "link", "--seconds", "30"], scratch)
    _wait_for_file(scratch, point, proc)
    _interrupt_and_check(proc, scratch)


BLK_POINTS = [
    pytest.param("*/logs/xs.log", id="xenstored"),
    pytest.param("*/logs/backend-shm4096.log", id="first-guest"),
    pytest.param("*/logs/backend-socket65536.log", id="last-guest"),
    pytest.param("*/pv4k.sock", id="fio-via-xenpv-nbd", marks=pytest.mark.tools),
    pytest.param("*/nbd.sock", id="fio-via-nbdkit", marks=pytest.mark.tools),
]


@pytest.mark.parametrize("point", BLK_POINTS)
def test_ctrl_c_stops_bench_blk(scratch: Path, point: str) -> None:
    if point.endswith(".sock") and not (shutil.which("fio") and shutil.which("nbdkit")):
        pytest.skip("needs fio and nbdkit (the bench's NBD comparisons)")
    proc = _start(["bench", "blk", "--quick", "--dir", str(scratch)], scratch)
    _wait_for_file(scratch, point, proc)
    _interrupt_and_check(proc, scratch)


@pytest.mark.parametrize("point", ["*/null.sock", "*/big.sock"])
def test_ctrl_c_stops_bench_xenstore(scratch: Path, point: str) -> None:
    proc = _start(["bench", "xenstore", "--quick", "--dir", str(scratch)], scratch)
    _wait_for_file(scratch, point, proc)
    _interrupt_and_check(proc, scratch)
