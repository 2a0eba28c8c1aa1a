"""The register rule behind the block and xenstore checkers, in one pass.

Values are unique per key (tags carry a sequence number), so each read names the write it
returns. A read invoked at index r may return the write W unless W is stale: some other write
W2 was acknowledged before r and invoked after W completed. `floor[key]` keeps, as the scan
goes, the largest invoke index of an acknowledged write; W is stale iff it completed before
that floor. A crash that loses a cache lowers the floor to what the last completed flush
covered; writes that a fault may have dropped never raise it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from xenpv.faults.checkers.common import Context, Violation
from xenpv.faults.history import Op
from xenpv.faults.tags import INITIAL


@dataclass(slots=True)
class _Write:
    invoke: int
    done: int | None = None  # index of its ok/fail/info
    acked: bool = False


@dataclass(slots=True)
class _Key:
    writes: dict[object, _Write] = field(default_factory=dict)
    floor: int = -1
    ack_indexes: list[int] = field(default_factory=list)  # ok indexes, increasing
    ack_floors: list[int] = field(default_factory=list)  # the floor after each ack


@dataclass
class RegisterCheck:
    checker: str
    ctx: Context
    write_f: str
    read_f: str
    vanishable: Callable[[str, int, int], bool] = lambda key, first, last: False
    keys: dict[str, _Key] = field(default_factory=dict)
    pending: dict[str, tuple[Op, int]] = field(default_factory=dict)  # process -> (invoke, floor)
    violations: list[Violation] = field(default_factory=list)

    def key(self, name: str) -> _Key:
        k = self.keys.get(name)
        if k is None:
            k = self.keys[name] = _Key()
        return k

    def feed(self, op: Op) -> None:
        if op.f == self.write_f:
            self._write(op)
        elif op.f == self.read_f:
            self._read(op)

    def _write(self, op: Op) -> None:
        k = self.key(op.key)
        if op.type == "invoke":
            self.pending[op.process] = (op, -1)
            k.writes[_hashable(op.value)] = _Write(op.index)
            return
        invoke, _ = self.pending.pop(op.process, (None, -1))
        if invoke is None or invoke.f != op.f:
            return  # a completion without its invoke: nothing to learn
        w = k.writes.get(_hashable(invoke.value))
        if w is None:
            return
        w.done = op.index
        if op.type == "ok" and not self.vanishable(op.key, invoke.index, op.index):
            w.acked = True
            k.floor = max(k.floor, w.invoke)
            k.ack_indexes.append(op.index)
            k.ack_floors.append(k.floor)

    def _read(self, op: Op) -> None:
        k = self.key(op.key)
        if op.type == "invoke":
            self.pending[op.process] = (op, k.floor)
            return
        invoke, floor = self.pending.pop(op.process, (None, -1))
        if op.type != "ok" or invoke is None:
            return
        value = op.value
        if isinstance(value, str) and value.startswith("corrupt"):
            self.violations.append(
                self.ctx.violation(self.checker, op, "read returned data no write produced")
            )
            return
        if value == INITIAL or value is None:
            if floor >= 0:
                self.violations.append(
                    self.ctx.violation(
                        self.checker,
                        op,
                        f"read the initial value after write {self._last(k, floor)}"
                        " was acknowledged",
                    )
                )
            return
        w = k.writes.get(_hashable(value))
        if w is None:
            self.violations.append(
                self.ctx.violation(self.checker, op, "read a value never written to this key")
            )
            return
        if w.done is not None and w.done < floor:
            self.violations.append(
                self.ctx.violation(
                    self.checker,
                    op,
                    f"stale read: write {self._last(k, floor)} (invoked at op {floor}) was"
                    f" acknowledged before this read began, after this value's write completed"
                    f" (op {w.done})",
                )
            )

    def _last(self, k: _Key, floor: int) -> str:
        for value, w in k.writes.items():
            if w.invoke == floor:
                return repr(value)
        return "?"

    def crash(self, keys: list[str], covered_before: int) -> None:
        """A cache was lost: each key falls back to what acks before `covered_before` (the
        invoke of the last completed flush) guarantee."""
        names = set(keys)
        for name in names:
            k = self.key(name)
            i = bisect.bisect_left(k.ack_indexes, covered_before)
            k.floor = k.ack_floors[i - 1] if i > 0 else -1
        # A read in flight across the crash may see the rolled-back value too.
        for process, (invoke, floor) in list(self.pending.items()):
            if invoke.f == self.read_f and invoke.key in names:
                self.pending[process] = (invoke, min(floor, self.keys[invoke.key].floor))


def _hashable(value: object) -> object:
    return value if isinstance(value, str | int | float | bool | None) else repr(value)
