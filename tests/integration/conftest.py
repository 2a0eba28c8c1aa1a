"""Shared fixtures: a real `xenpv xenstored` subprocess on a temporary socket and data dir."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

READY_TIMEOUT = 30.0
LINK_TRANSPORTS = ("socket", "shm")  # how domains' links carry grants and events


class Xenstored:
    """A xenstored subprocess; `restart()` keeps the socket, TCP port and data dir."""

    def __init__(self, workdir: Path, *, tcp: bool = True, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.socket = str(workdir / "socket")
        self.data_dir = workdir / "data"
        self.log_path = workdir / "xenstored.log"
        self.extra = extra
        self.tcp_wanted = tcp
        self.tcp_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def unix(self) -> str:
        return f"unix:{self.socket}"

    @property
    def tcp(self) -> str:
        assert self.tcp_port, "server started without --tcp"
        return f"tcp:127.0.0.1:{self.tcp_port}"

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        args = [
            sys.executable,
            "-m",
            "xenpv",
            "--log-level",
            "info",
            "--log-format",
            "json",
            "xenstored",
            "--socket",
            self.socket,
            "--data-dir",
            str(self.data_dir),
            "--ready-fd",
            str(write_fd),
            *self.extra,
        ]
        if self.tcp_wanted:
            args += ["--tcp", f"127.0.0.1:{self.tcp_port}"]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(args, stderr=logf, pass_fds=(write_fd,))
        os.close(write_fd)
        try:
            line = _read_line(read_fd, READY_TIMEOUT)
        finally:
            os.close(read_fd)
        if not line.startswith("READY "):
            self.kill()
            raise RuntimeError(f"xenstored did not become ready: {line!r}\n{self.log()}")
        for word in line.split()[1:]:
            if word.startswith("tcp:"):
                self.tcp_port = int(word.rsplit(":", 1)[1])

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        return code

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


@contextmanager
def short_tempdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep the directory short.
    path = Path(tempfile.mkdtemp(prefix="xs", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_xenstored(workdir: Path, *, tcp: bool = True) -> Iterator[Xenstored]:
    server = Xenstored(workdir, tcp=tcp)
    server.start()
    try:
        yield server
    finally:
        if server.alive():
            server.stop()


@pytest.fixture
def xs_workdir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


@pytest.fixture
def xenstored(xs_workdir: Path) -> Iterator[Xenstored]:
    with running_xenstored(xs_workdir) as server:
        yield server


@pytest.fixture(params=LINK_TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each link transport in turn, for a test that takes `transport` (a test's own
    `parametrize("transport", ...)` overrides it)."""
    value: str = request.param
    return value
