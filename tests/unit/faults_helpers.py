"""Shared helpers for the fault-injection tests: small schedules and in-memory histories."""

from __future__ import annotations

import io
from typing import Any

from xenpv.faults import plan, schedule
from xenpv.faults.history import History, HistoryWriter, parse_lines
from xenpv.faults.schedule import Schedule, ScheduledFault

QUIET_PLAN = """
[run]
seed = 1
duration = 30.0
quiet = 10.0
[checks]
liveness = 5.0
"""

DISK_KEY = "vbd:guest4k:51712"
VIF_KEY = "vif:guest4k:0"


def quiet_schedule(extra: str = "") -> Schedule:
    return schedule.build(plan.loads(QUIET_PLAN + extra, "test"))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, dt: float = 0.01) -> None:
        self.now += dt


class Recorder:
    """A HistoryWriter over a StringIO with a manual clock (each append advances it)."""

    def __init__(self, sched: Schedule | None = None) -> None:
        self.clock = Clock()
        self.stream = io.StringIO()
        self.schedule = sched if sched is not None else quiet_schedule()
        self.writer = HistoryWriter(self.stream, self.schedule, clock=self.clock)

    def __call__(self, process: str, type: str, f: str, key: str, value: Any = None) -> None:
        self.clock.tick()
        self.writer.append(process, type, f, key, value)

    def fault(self, f: str, fault_id: str, kind: str, target: str) -> None:
        self.clock.tick()
        self.writer.append(
            "nemesis", "info", f, target, {"id": fault_id, "kind": kind, "target": target}
        )

    def history(self) -> History:
        return parse_lines(self.stream.getvalue().splitlines(), "test")

    @property
    def text(self) -> str:
        return self.stream.getvalue()


def fault(kind: str, target: str, fault_id: str = "f0.0", **params: Any) -> ScheduledFault:
    return ScheduledFault(
        fault_id, 0, kind, target, 0.0, 1.0, None, None, tuple(sorted(params.items()))
    )
