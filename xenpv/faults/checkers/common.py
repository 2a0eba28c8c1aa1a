"""What every checker shares: violations and the fault windows of a history."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xenpv.faults.catalogue import CATALOGUE, FaultKind
from xenpv.faults.history import History, Op
from xenpv.faults.records import JsonRecord
from xenpv.faults.targets import DeviceTarget, Targets

NEVER = 1 << 62  # the stop index of a fault that was never stopped


@dataclass(frozen=True, slots=True)
class FaultWindow:
    """One injected fault as the history saw it, in op indexes and seconds."""

    id: str
    kind: str
    target: str
    start_index: int
    start_time: float
    stop_index: int = NEVER
    stop_time: float | None = None

    @property
    def info(self) -> FaultKind | None:
        return CATALOGUE.get(self.kind)

    def overlaps(self, first: int, last: int) -> bool:
        """Whether the fault was active at any op index in [first, last]."""
        return self.start_index <= last and self.stop_index >= first

    def label(self) -> str:
        return f"{self.id} {self.kind} on {self.target}"


@dataclass(frozen=True, slots=True)
class Violation(JsonRecord):
    checker: str
    index: int  # the op that shows it
    key: str
    value: Any
    message: str
    active: tuple[str, ...] = ()  # faults active at that op (labels)

    def line(self) -> str:
        faults = ", ".join(self.active) if self.active else "no fault active"
        return (
            f"[{self.checker}] op {self.index} {self.key} = {self.value!r}: {self.message}"
            f" ({faults})"
        )


def fault_windows(history: History) -> list[FaultWindow]:
    starts: dict[str, FaultWindow] = {}
    done: list[FaultWindow] = []
    for op in history:
        if op.f not in ("fault-start", "fault-stop") or not isinstance(op.value, dict):
            continue
        fid = str(op.value.get("id", op.key))
        if op.f == "fault-start":
            starts[fid] = FaultWindow(
                fid,
                str(op.value.get("kind", "?")),
                str(op.value.get("target", "?")),
                op.index,
                op.time,
            )
        elif fid in starts:
            w = starts.pop(fid)
            done.append(
                FaultWindow(w.id, w.kind, w.target, w.start_index, w.start_time, op.index, op.time)
            )
    done += starts.values()
    done.sort(key=lambda w: w.start_index)
    return done


class Context:
    """Per-history lookups shared by the checkers."""

    def __init__(self, history: History) -> None:
        self.history = history
        self.targets: Targets = history.schedule.topology
        self.windows = fault_windows(history)
        self._by_key = {d.key: d for d in self.targets.devices}

    def device_of(self, key: str) -> DeviceTarget | None:
        """`vbd:guest4k:51712:block=3` → that device (None if the topology has no such)."""
        return self._by_key.get(":".join(key.split(":")[:3]))

    def guest_of(self, key: str) -> str | None:
        parts = key.split(":")
        return parts[1] if len(parts) > 1 and parts[0] in ("vbd", "vif", "xs") else None

    def active(self, index: int) -> tuple[str, ...]:
        return tuple(w.label() for w in self.windows if w.overlaps(index, index))

    def touching(
        self, key: str, first: int, last: int, want: Callable[[FaultWindow], bool]
    ) -> list[FaultWindow]:
        """Faults matching `want`, active in [first, last], whose target touches `key`."""
        device = self.device_of(key)
        guest = self.guest_of(key)
        out = []
        for w in self.windows:
            if not (want(w) and w.overlaps(first, last)):
                continue
            if device is not None:
                hit = self.targets.touches_device(w.target, device)
            elif guest is not None:
                hit = self.targets.touches_guest(w.target, guest)
            else:
                hit = True
            if hit:
                out.append(w)
        return out

    def violation(self, checker: str, op: Op, message: str, key: str | None = None) -> Violation:
        return Violation(checker, op.index, key or op.key, op.value, message, self.active(op.index))


def may_lose(w: FaultWindow) -> bool:
    return w.info is not None and w.info.may_lose


def may_duplicate(w: FaultWindow) -> bool:
    return w.info is not None and w.info.may_duplicate


def loses_cache(w: FaultWindow) -> bool:
    return w.info is not None and w.info.loses_cache
