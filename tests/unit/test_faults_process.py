"""ProcessInjector: signals on a real child process (started and ended by the test)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.unit.faults_helpers import fault
from xenpv.faults.injectors import Injection
from xenpv.faults.process import ProcessInjector


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str) -> None:
    deadline = time.monotonic() + 10
    while _state(pid) != want:
        assert time.monotonic() < deadline, f"process {pid} never reached state {want}"
        time.sleep(0.01)


@pytest.fixture
def child() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_stop_is_always_continued(child: subprocess.Popen[bytes]) -> None:
    injector = ProcessInjector(lambda name: child.pid if name == "guest4k" else None)
    with pytest.raises(RuntimeError), Injection([injector]) as injection:
        injection.start(fault("process.stop", "domain:guest4k"))
        _wait_state(child.pid, "T")
        raise RuntimeError("the run failed while the guest was stopped")
    _wait_state(child.pid, "S")  # resumed on the way out


def test_kill_and_restart(child: subprocess.Popen[bytes]) -> None:
    restarted: list[str] = []
    sent: list[tuple[int, int]] = []
    injector = ProcessInjector(
        lambda name: 4242, restart=restarted.append, send=lambda p, s: sent.append((p, s))
    )
    f = fault("process.restart", "domain:backend", signal="SIGTERM")
    injector.start(f)
    injector.stop(f)
    assert sent == [(4242, signal.SIGTERM)] and restarted == ["backend"]
    xs = fault("xenstore.xenstored-kill", "xenstored", "f1.0", restart=True)
    injector.start(xs)
    injector.stop(xs)
    assert sent[-1] == (4242, signal.SIGKILL) and restarted[-1] == "xenstored"
    # Without a restart callback, only the kinds that need none are handled.
    assert not ProcessInjector(lambda n: None).handles(f)
    assert ProcessInjector(lambda n: None).handles(fault("process.kill", "domain:x"))

    real = ProcessInjector(lambda name: child.pid)
    real.start(fault("process.kill", "domain:guest4k", signal="SIGKILL"))
    assert child.wait(timeout=10) == -signal.SIGKILL
    real.start(fault("process.kill", "domain:guest4k", "f2.0", signal="SIGKILL"))  # gone: no error
