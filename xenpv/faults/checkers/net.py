"""Net checker: frames arrive intact, in order and once; every gap is explained.

Keys `vif:GUEST:DEVID:flow=N`. `send` ops carry the sequence number; `recv` ops (ok) carry the
sequence number parsed from the frame's tag, or `corrupt: ...` when the tag did not verify.

- a corrupt frame delivered is always a violation (a fault may drop a frame, never alter what
  the receiver is given);
- a frame received twice needs a duplication fault touching the device between its send and
  the second receipt;
- per-flow order is strict: the ring keeps order whatever the transport does;
- a frame sent but skipped (a later one arrived first, or none arrived by the end) needs a
  loss fault touching the sending device, or the receiving guest (named by the process of the
  flow's `recv` ops), between its send and that moment.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from xenpv.faults.checkers.common import Context, Violation, may_duplicate, may_lose
from xenpv.faults.history import History, Op


@dataclass(slots=True)
class _Flow:
    sent: dict[int, int] = field(default_factory=dict)  # seq -> send invoke index
    failed: set[int] = field(default_factory=set)  # sends that certainly did not happen
    received: dict[int, int] = field(default_factory=dict)  # seq -> first recv index
    highest: int = -1
    # sent seqs above `highest`, in send order (a flow has one sender, seqs increase)
    unresolved: deque[int] = field(default_factory=deque)
    receiver: str | None = None  # the receiving guest (from its `recv` ops' process)


def check(history: History) -> list[Violation]:
    ctx = Context(history)
    flows: dict[str, _Flow] = {}
    pending: dict[str, Op] = {}
    out: list[Violation] = []
    for op in history:
        if op.f == "send":
            flow = flows.setdefault(op.key, _Flow())
            if op.type == "invoke":
                pending[op.process] = op
                if isinstance(op.value, int):
                    flow.sent[op.value] = op.index
                    flow.unresolved.append(op.value)
            else:
                invoke = pending.pop(op.process, None)
                if op.type == "fail" and invoke is not None and isinstance(invoke.value, int):
                    flow.failed.add(invoke.value)
        elif op.f == "recv" and op.type in ("ok", "info"):
            flow = flows.setdefault(op.key, _Flow())
            if flow.receiver is None:
                flow.receiver = receiving_guest(op.process)
            out += _receive(ctx, flow, op)
    end = len(history) - 1
    for key, flow in flows.items():
        for seq in flow.unresolved:
            if seq in flow.received or seq in flow.failed or seq <= flow.highest:
                continue
            sent = flow.sent[seq]
            if not _lost(ctx, key, flow, sent, end):
                out.append(
                    Violation(
                        "net",
                        sent,
                        key,
                        seq,
                        "frame sent but never delivered, and no loss fault explains it",
                        ctx.active(sent),
                    )
                )
    return out


def receiving_guest(process: str) -> str:
    """`guest4k/recv0` → `guest4k`; a restarted guest's `guest4k.1/recv0` → `guest4k`."""
    name = process.split("/")[0]
    base, dot, incarnation = name.rpartition(".")
    return base if dot and incarnation.isdigit() else name


def _lost(ctx: Context, key: str, flow: _Flow, first: int, last: int) -> bool:
    """A loss fault touching the sending device or the receiving guest explains a gap."""
    if ctx.touching(key, first, last, may_lose):
        return True
    return flow.receiver is not None and bool(
        ctx.touching(f"vif:{flow.receiver}", first, last, may_lose)
    )


def _receive(ctx: Context, flow: _Flow, op: Op) -> list[Violation]:
    value = op.value
    if not isinstance(value, int) or isinstance(value, bool):
        return [ctx.violation("net", op, "corrupted frame delivered")]
    if value not in flow.sent:
        return [ctx.violation("net", op, "received a frame that was never sent")]
    if value in flow.received:
        if ctx.touching(op.key, flow.sent[value], op.index, may_duplicate):
            return []
        return [
            ctx.violation("net", op, f"duplicate (first received at op {flow.received[value]})")
        ]
    flow.received[value] = op.index
    if value < flow.highest:
        return [ctx.violation("net", op, f"out of order: seq {flow.highest} arrived before it")]
    out = []
    while flow.unresolved and flow.unresolved[0] <= value:
        seq = flow.unresolved.popleft()
        if seq == value or seq in flow.received or seq in flow.failed:
            continue
        if not _lost(ctx, op.key, flow, flow.sent[seq], op.index):
            out.append(
                Violation(
                    "net",
                    op.index,
                    op.key,
                    seq,
                    f"gap: seq {seq} was skipped (seq {value} arrived) and no loss fault"
                    " explains it",
                    ctx.active(op.index),
                )
            )
    flow.highest = value
    return out
