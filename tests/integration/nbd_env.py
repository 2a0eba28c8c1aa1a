"""`xenpv nbd` as a subprocess for the NBD integration tests, and the tool requirement check."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from xenpv.toolstack.supervisor import stop_popen

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 90.0
INSTALL_HINT = "apt-get install qemu-utils libnbd-bin fio nbdkit"


def need_tools(*tools: str) -> None:
    """Skip (fail under XENPV_REQUIRE_SYSTEM=1) unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail("tools", missing, INSTALL_HINT)


@dataclass
class NbdExport:
    uri: str
    socket: Path
    process: subprocess.Popen[bytes]
    state_dir: Path
    pid_file: Path

    def log(self) -> str:
        logs = sorted((self.state_dir / "logs").glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


@contextmanager
def xenpv_nbd(image: Path, *args: str) -> Iterator[NbdExport]:
    """Run `xenpv nbd IMAGE ARGS` until the block ends (SIGTERM; must exit 0)."""
    state_dir = Path(tempfile.mkdtemp(prefix="xn", dir="/tmp"))
    sock = state_dir / "export.sock"
    pid_file = state_dir / "nbd.pid"
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "xenpv", "--log-format", "json", "nbd", str(image)]
    command += ["--socket", str(sock), "--state-dir", str(state_dir / "c")]
    command += ["--ready-fd", str(write_fd), "--pid-file", str(pid_file), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with (state_dir / "nbd.err").open("wb") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, pass_fds=(write_fd,), env=env
        )
    os.close(write_fd)
    export = NbdExport("", sock, process, state_dir / "c", pid_file)
    try:
        ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT)
        line = os.read(read_fd, 4096).decode() if ready else ""
        if not line.startswith("READY "):
            process.kill()
            process.wait()
            err_text = (state_dir / "nbd.err").read_text(errors="replace")[-3000:]
            pytest.fail(f"xenpv nbd did not start: {err_text}\n{export.log()}")
        export.uri = line.split()[1]
        yield export
    finally:
        os.close(read_fd)
        code = stop_popen(process, 60)  # reads its stdout to the end and closes it
        shutil.rmtree(state_dir, ignore_errors=True)
    assert code == 0, f"xenpv nbd exited with {code}"


def run_tool(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
