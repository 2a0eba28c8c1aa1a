"""Liveness checker: after the last heal, every device recovers within the plan's bound.

`state` lines keyed `state:GUEST:vbd:xvda:frontend` / `...:backend` carry a xenbus state (4 or
"Connected"); `probe` lines keyed by the device's key prefix (`vbd:guest4k:51712`) are probe
I/Os. Let T be the time of the last `fault-stop` (0 without faults) and B the bound. Each
device must end Connected on both ends, with both ends Connected from some time at or before
T + B onwards, and a probe must complete (`ok`) after T and by T + B.
"""

from __future__ import annotations

from xenpv.faults.checkers.common import Context, Violation
from xenpv.faults.history import History

CONNECTED = 4
_CONNECTED_NAMES = {"Connected", "XenbusStateConnected", "4"}


def is_connected(value: object) -> bool:
    return value == CONNECTED or (isinstance(value, str) and value in _CONNECTED_NAMES)


def check(history: History) -> list[Violation]:
    ctx = Context(history)
    bound = history.schedule.liveness
    stops = [op for op in history if op.f == "fault-stop"]
    heal = stops[-1].time if stops else 0.0
    heal_index = stops[-1].index if stops else 0
    deadline = heal + bound
    out: list[Violation] = []
    for device in ctx.targets.devices:
        ends = {
            e: f"state:{device.guest}:{device.cls}:{device.name}:{e}"
            for e in ("frontend", "backend")
        }
        last: dict[str, object] = {}
        connected_since: float | None = None
        connected_index = len(history) - 1
        probe_ok: float | None = None
        probe_index = len(history) - 1
        for op in history:
            if op.f == "state" and op.key in ends.values():
                last[op.key] = op.value
                both = all(is_connected(last.get(k)) for k in ends.values())
                if both and connected_since is None:
                    connected_since = op.time
                    connected_index = op.index
                elif not both:
                    connected_since = None
            elif (
                op.f == "probe"
                and op.type == "ok"
                and op.key == device.key
                and op.index > heal_index
                and probe_ok is None
            ):
                probe_ok = op.time
                probe_index = op.index
        where = f"{device.id} after the last heal at {heal:.3f} s"
        end = len(history) - 1
        if connected_since is None:
            states = ", ".join(f"{e}={last.get(k, 'never seen')}" for e, k in ends.items())
            out.append(
                Violation(
                    "liveness",
                    end,
                    device.key,
                    states,
                    f"{where}: not Connected on both ends by the end of the history ({states})",
                )
            )
        elif max(connected_since, heal) > deadline + 1e-9:
            out.append(
                Violation(
                    "liveness",
                    connected_index,
                    device.key,
                    connected_since,
                    f"{where}: Connected only at {connected_since:.3f} s, after the"
                    f" {bound:g} s bound",
                )
            )
        if probe_ok is None:
            out.append(
                Violation("liveness", end, device.key, None, f"{where}: no probe I/O completed")
            )
        elif probe_ok > deadline + 1e-9:
            out.append(
                Violation(
                    "liveness",
                    probe_index,
                    device.key,
                    probe_ok,
                    f"{where}: the first probe completed at {probe_ok:.3f} s, after the"
                    f" {bound:g} s bound",
                )
            )
    return out
