"""Isolation checker: guests no fault touches see no errors; backends stay up unless killed.

The unaffected guests are the schedule's (`[checks] unaffected`, or every guest no scheduled
fault touches). Any `fail`, or `info` on a data operation (an outcome that is unknown, e.g. a
timeout), on a key or process of such a guest is a violation. A `state` line keyed
`domain:NAME` with a value other than `up` says a domain went down: a violation for a backend
unless a `process` fault aimed at it (or `xenstored-kill`, for xenstored) had started.
"""

from __future__ import annotations

from xenpv.faults.checkers.common import Context, Violation
from xenpv.faults.history import History

DATA_OPS = frozenset({"write", "read", "flush", "send", "recv", "xs-write", "xs-read", "probe"})


def check(history: History) -> list[Violation]:
    ctx = Context(history)
    unaffected = set(history.schedule.unaffected)
    out: list[Violation] = []
    for op in history:
        if op.type == "fail" or (op.type == "info" and op.f in DATA_OPS):
            guest = ctx.guest_of(op.key) or op.process.split("/")[0]
            if guest in unaffected:
                out.append(
                    ctx.violation(
                        "isolation", op, f"{op.f} {op.type} on {guest}, a guest no fault targets"
                    )
                )
        elif op.f == "state" and op.key.startswith("domain:") and op.value != "up":
            name = op.key[len("domain:") :]
            if ctx.targets.roles.get(name) != "backend":
                continue
            killed = any(
                w.kind.startswith("process.") and w.target == op.key and w.start_index <= op.index
                for w in ctx.windows
            )
            if not killed:
                out.append(
                    ctx.violation(
                        "isolation",
                        op,
                        f"backend {name} went {op.value!r} and the plan did not kill it",
                    )
                )
    return out
