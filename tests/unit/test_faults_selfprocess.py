"""Process faults a domain applies to itself (attached runs): once per run, whatever
restarts follow; a stop holds the loop for the window; the fault's signal is sent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from xenpv.faults.schedule import ScheduledFault
from xenpv.faults.selfprocess import applied_file, apply_to_self


def fault(kind: str, fid: str = "f1.0", **params: object) -> ScheduledFault:
    return ScheduledFault(fid, 1, kind, "domain:guest4k", 2.0, 3.5, None, None,
                          tuple(params.items()))  # type: ignore[arg-type]  # fmt: skip


def test_a_kill_is_applied_once_per_run_even_after_the_restart(tmp_path: Path) -> None:
    sent: list[tuple[int, int]] = []
    marker = applied_file(tmp_path, "guest4k")
    kill = fault("process.kill", signal="SIGKILL")
    assert apply_to_self(kill, marker, send=lambda p, s: sent.append((p, s)))
    # The restarted domain reads the same control node: it must not kill itself again.
    assert not apply_to_self(kill, marker, send=lambda p, s: sent.append((p, s)))
    assert sent == [(os.getpid(), signal.SIGKILL)]
    assert marker.read_text().split() == ["f1.0"]


def test_restart_sends_its_signal_and_stop_holds_for_the_window(tmp_path: Path) -> None:
    sent: list[int] = []
    held: list[float] = []
    marker = applied_file(tmp_path, "guest4k")
    restart = fault("process.restart", "f2.0", signal="SIGTERM")
    assert apply_to_self(restart, marker, send=lambda _p, s: sent.append(s))
    stop = fault("process.stop", "f3.0")
    assert apply_to_self(stop, marker, send=lambda _p, s: sent.append(s), hold=held.append)
    assert sent == [signal.SIGTERM] and held == [1.5]
