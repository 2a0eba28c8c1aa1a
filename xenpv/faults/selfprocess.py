"""Process faults a domain applies to itself, for runs attached to a cluster the runner did
not start (`xenpv faults run --attach`; compose's `chaos` service).

There the runner has no pid to signal: the domains live in other containers, maybe on other
hosts. The runner lists the `process.*` fault on the target domain's control node like any
other agent-applied fault, and the domain's fault agent applies it to its own process:

- `process.kill`, `process.restart`: the fault's signal (SIGKILL by default) to itself. What
  brings the domain back is the cluster's own restart policy (compose: `restart:
  unless-stopped`), as a real toolstack restarts a crashed guest;
- `process.stop`: the agent holds the domain's event loop for the fault's window: every task
  of the domain stops, nothing is read or answered, as under SIGSTOP (a stopped process
  cannot resume itself, and a helper process to send SIGCONT could outlive the domain).

A fault takes effect once per run: before signalling, the agent adds the fault's id to
`<history_dir>/<domain>.applied` (the run's directory, which outlives the domain's process
and, in a launcher's restart, its xenstore records), so the restarted domain, which reads the
same control node, does not apply the fault again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from xenpv.faults.control import param
from xenpv.faults.schedule import ScheduledFault

log = structlog.get_logger()

KINDS = frozenset({"process.stop", "process.kill", "process.restart"})


def applied_file(history_dir: str | Path, domain: str) -> Path:
    return Path(history_dir) / f"{domain}.applied"


def apply_to_self(
    fault: ScheduledFault,
    marker: Path,
    *,
    send: Callable[[int, int], None] = os.kill,
    hold: Callable[[float], None] = time.sleep,
) -> bool:
    """Apply `fault` to this process; `marker` is the domain's `applied_file`. False when an
    earlier incarnation of this domain already applied it in this run."""
    try:
        done = marker.read_text().split()
    except FileNotFoundError:
        done = []
    if fault.id in done:
        return False
    with marker.open("a") as out:  # on disk before the signal
        out.write(fault.id + "\n")
        out.flush()
        os.fsync(out.fileno())
    log.warning("fault applied to this process", fault=fault.id, kind=fault.kind)
    if fault.kind == "process.stop":
        hold(max(0.0, fault.stop - fault.start))  # blocks the whole event loop, on purpose
    else:
        send(os.getpid(), int(getattr(signal, str(param(fault, "signal", "SIGKILL")))))
    return True
