"""`Supervisor.record` / `forget`: children that synchronous code started are stopped too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from xenpv.toolstack.supervisor import Supervisor, alive


async def test_a_recorded_popen_child_is_stopped() -> None:
    with trio.fail_after(30):
        sup = Supervisor()
        proc = subprocess.Popen(  # noqa: ASYNC220 - what a sync starter does
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        try:
            child = sup.record("sleeper", "guest", proc.pid, Path(os.devnull))
            assert sup.children == [child]
            await sup.stop(grace=5)
            # Stopped (a zombie until its starter reaps it, which `alive` counts as exited).
            assert not alive(proc.pid)
            assert proc.wait(timeout=5) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_a_forgotten_child_is_left_alone() -> None:
    with trio.fail_after(30):
        sup = Supervisor()
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: ASYNC220
        try:
            sup.forget(sup.record("sleeper", "guest", proc.pid, Path(os.devnull)))
            assert sup.children == []
            await sup.stop(grace=5)
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
