"""Checkers: each `check(history) -> list[Violation]`, in linear time, with no search.

They can be linear because every payload is tagged (`xenpv.faults.tags`): a read names the
write it returns, a frame names its flow and sequence number. Faults are known from the
history's own `fault-start`/`fault-stop` lines (what was really injected, when), and the
topology from its schedule line.

- `block`: a block is a register: a read returns its last acknowledged write, one in flight,
  or (never written) the initial zeroes; never a value never written, never a stale one; a
  cache-losing fault may roll a block back to its last flushed value, nothing else may;
- `net`: frames arrive intact, in order, once; a gap needs a loss fault, a duplicate a
  duplication fault, active at the time;
- `xenstore`: acknowledged writes survive (xenstored restarts included) and every change to a
  watched path fires a watch;
- `liveness`: after the last heal every device is Connected on both ends and a probe I/O
  completes within the plan's bound;
- `isolation`: guests no fault touches see no errors; backends stay up unless killed.
"""

from __future__ import annotations

from xenpv.faults.checkers.common import FaultWindow, Violation, fault_windows
from xenpv.faults.history import History

CHECKERS: tuple[str, ...] = ("block", "net", "xenstore", "liveness", "isolation")


def check_all(history: History) -> list[Violation]:
    """Every checker's violations, in history order."""
    from xenpv.faults.checkers import block, isolation, liveness, net, xenstore

    out: list[Violation] = []
    for module in (block, net, xenstore, liveness, isolation):
        out += module.check(history)
    out.sort(key=lambda v: (v.index, v.checker))
    return out


__all__ = ["CHECKERS", "FaultWindow", "Violation", "check_all", "fault_windows"]
