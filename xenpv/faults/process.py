"""`ProcessInjector`: the `process.*` kinds and `xenstore.xenstored-kill`, by signals.

It does not own processes: the runner's supervisor does. It is given `pid_of(name)` (the pid
of a domain's process, or of `xenstored`; None when it is not running) and, for restarts,
`restart(name)` (start it again; it must not block: a supervisor schedules the start).

- `process.stop`: SIGSTOP at start, SIGCONT at stop (so a stopped domain always resumes);
- `process.kill`: the signal (SIGKILL by default) at start; nothing at stop;
- `process.restart`: the signal at start, `restart(name)` at stop;
- `xenstore.xenstored-kill`: SIGKILL to xenstored at start, `restart("xenstored")` at stop
  if its `restart` parameter is true.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from xenpv.faults.schedule import ScheduledFault

log = structlog.get_logger()

KINDS = frozenset({"process.stop", "process.kill", "process.restart", "xenstore.xenstored-kill"})


def process_name(target: str) -> str:
    """`domain:guest4k` → `guest4k`; `xenstored` stays `xenstored`."""
    return target.removeprefix("domain:")


@dataclass
class ProcessInjector:
    pid_of: Callable[[str], int | None]
    restart: Callable[[str], None] | None = None
    send: Callable[[int, int], None] = os.kill  # (pid, signal), replaceable in tests
    _stopped: dict[str, int] = field(default_factory=dict)  # fault id -> pid sent SIGSTOP

    def handles(self, fault: ScheduledFault) -> bool:
        if fault.kind not in KINDS:
            return False
        needs_restart = fault.kind == "process.restart" or (
            fault.kind == "xenstore.xenstored-kill" and bool(fault.param("restart"))
        )
        return self.restart is not None or not needs_restart

    def _signal(self, name: str, signum: int) -> int | None:
        pid = self.pid_of(name)
        if pid is None:
            log.warning("fault target not running", target=name, signal=signum)
            return None
        try:
            self.send(pid, signum)
        except ProcessLookupError:  # it died on its own meanwhile
            return None
        return pid

    def start(self, fault: ScheduledFault) -> None:
        name = process_name(fault.target)
        if fault.kind == "process.stop":
            pid = self._signal(name, signal.SIGSTOP)
            if pid is not None:
                self._stopped[fault.id] = pid
        elif fault.kind == "xenstore.xenstored-kill":
            self._signal(name, signal.SIGKILL)
        else:
            self._signal(name, int(getattr(signal, str(fault.param("signal")))))

    def stop(self, fault: ScheduledFault) -> None:
        name = process_name(fault.target)
        if fault.kind == "process.stop":
            pid = self._stopped.pop(fault.id, None)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):  # it died meanwhile
                    self.send(pid, signal.SIGCONT)
        elif self.restart is not None and (
            fault.kind == "process.restart"
            or (fault.kind == "xenstore.xenstored-kill" and bool(fault.param("restart")))
        ):
            self.restart(name)
