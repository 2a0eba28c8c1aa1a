"""Xenstore checker: acknowledged writes survive (restarts included); watches fire.

Keys `xs:DOMAIN:PATH`. `xs-write`/`xs-read` follow the register rule with no exception: a
restarted xenstored must come back with every acknowledged write. `xs-watch` lines: `ok` with
value `registered` sets a watch on a key prefix; `info` with value `fired` is an event for a
key. After every acknowledged write to a watched key an event for that key must arrive,
unless a fault that may lose events (watch-drop, conn-reset, xenstored-kill) touched it
between the write and the end of the history.
"""

from __future__ import annotations

from xenpv.faults.checkers.common import Context, Violation, may_lose
from xenpv.faults.checkers.registers import RegisterCheck
from xenpv.faults.history import History, Op


def check(history: History) -> list[Violation]:
    ctx = Context(history)
    reg = RegisterCheck("xenstore", ctx, "xs-write", "xs-read")
    watched: list[str] = []
    last_event: dict[str, int] = {}
    acked: list[tuple[Op, int]] = []  # (ok op, invoke index)
    invokes: dict[str, int] = {}
    for op in history:
        if op.f in ("xs-write", "xs-read"):
            reg.feed(op)
            if op.f == "xs-write":
                if op.type == "invoke":
                    invokes[op.process] = op.index
                elif op.type == "ok" and op.process in invokes:
                    acked.append((op, invokes.pop(op.process)))
        elif op.f == "xs-watch":
            if op.type == "ok" and op.value == "registered":
                watched.append(op.key)
            elif op.type == "info":
                last_event[op.key] = op.index
    out = reg.violations
    end = len(history) - 1
    for op, invoke in acked:
        if not any(op.key.startswith(prefix) for prefix in watched):
            continue
        if last_event.get(op.key, -1) > invoke:
            continue
        if ctx.touching(op.key, invoke, end, may_lose):
            continue
        out.append(ctx.violation("xenstore", op, "no watch event followed this acknowledged write"))
    return out
