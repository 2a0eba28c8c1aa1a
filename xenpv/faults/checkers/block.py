"""Block checker: every block is a register (see `registers`), durability follows flushes.

History keys: `vbd:GUEST:DEVID:block=N` for writes and reads (values: tag texts, `initial`
or `corrupt: ...`), `vbd:GUEST:DEVID` for flushes. A `storage.power-cut` on a device is a
crash at its start: every block of that device falls back to what the last completed flush
covered (writes acknowledged before that flush was issued). Writes that overlap a
cache-losing fault (`drop-writes`, `power-cut`) on their device may vanish without a crash.
"""

from __future__ import annotations

from xenpv.faults.checkers.common import Context, Violation, loses_cache
from xenpv.faults.checkers.registers import RegisterCheck
from xenpv.faults.history import History

CRASH_KINDS = frozenset({"storage.power-cut"})


def check(history: History) -> list[Violation]:
    ctx = Context(history)

    def vanishable(key: str, first: int, last: int) -> bool:
        return bool(ctx.touching(key, first, last, loses_cache))

    reg = RegisterCheck("block", ctx, "write", "read", vanishable)
    crashes = {w.start_index: w for w in ctx.windows if w.kind in CRASH_KINDS}
    flush_pending: dict[str, int] = {}
    last_flush: dict[str, int] = {}  # device key -> invoke index of the last completed flush
    keys_of: dict[str, list[str]] = {}  # device key -> block keys seen
    for op in history:
        crash = crashes.get(op.index)
        if crash is not None:
            for device in ctx.targets.devices:
                if crash.target in (device.id, f"domain:{device.backend}"):
                    reg.crash(keys_of.get(device.key, []), last_flush.get(device.key, -1))
        if op.f == "flush":
            if op.type == "invoke":
                flush_pending[op.process] = op.index
            elif op.type == "ok" and op.process in flush_pending:
                last_flush[op.key] = max(last_flush.get(op.key, -1), flush_pending.pop(op.process))
            else:
                flush_pending.pop(op.process, None)
            continue
        if op.f in ("write", "read") and op.key.startswith("vbd:"):
            device_key = ":".join(op.key.split(":")[:3])
            blocks = keys_of.setdefault(device_key, [])
            if op.key not in reg.keys:
                blocks.append(op.key)
            reg.feed(op)
    return reg.violations
