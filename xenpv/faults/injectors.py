"""The `Injector` interface and the manager that guarantees every fault is healed.

A runner (1) builds the schedule, (2) opens a `HistoryWriter`, (3) enters an `Injection` over
its injectors and calls `start(fault)` / `stop(fault)` as the schedule says (`follow` does
that on trio's clock), (4) runs the checkers. `Injection` is a context manager: leaving it
for any reason (the run ended, an error, a cancellation, Ctrl-C) stops every fault still
active, newest first, so no fault outlives its run; it also writes the `fault-start` /
`fault-stop` lines the checkers read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Protocol

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.faults.catalogue import CATALOGUE
from xenpv.faults.history import Recorder
from xenpv.faults.schedule import Schedule, ScheduledFault

log = structlog.get_logger()


class Injector(Protocol):
    """Applies some fault kinds. `start` injects, `stop` heals; both are idempotent and
    must not block (an injector that needs I/O starts it and returns)."""

    def handles(self, fault: ScheduledFault) -> bool: ...

    def start(self, fault: ScheduledFault) -> None: ...

    def stop(self, fault: ScheduledFault) -> None: ...


class NoInjector(XenpvError):
    """A scheduled fault that none of the run's injectors can apply."""


@contextmanager
def injected(injector: Injector, fault: ScheduledFault) -> Iterator[ScheduledFault]:
    """One fault for the duration of a `with` block; healed however the block ends."""
    injector.start(fault)
    try:
        yield fault
    finally:
        injector.stop(fault)


class Injection:
    """Dispatches faults to the injector that handles them and heals all on exit."""

    def __init__(self, injectors: Sequence[Injector], history: Recorder | None = None):
        self.injectors = list(injectors)
        self.history = history
        self.active: dict[str, tuple[Injector, ScheduledFault]] = {}

    def injector_for(self, fault: ScheduledFault) -> Injector:
        for injector in self.injectors:
            if injector.handles(fault):
                return injector
        where = CATALOGUE[fault.kind].injector if fault.kind in CATALOGUE else None
        hint = f" (see {where})" if where else " (this kind has no injector yet)"
        raise NoInjector(f"{fault.id}: no injector for {fault.kind} on {fault.target}{hint}")

    def check(self, faults: Sequence[ScheduledFault]) -> None:
        """Fail before the run if any scheduled fault cannot be injected."""
        for fault in faults:
            self.injector_for(fault)

    def start(self, fault: ScheduledFault) -> None:
        if fault.id in self.active:
            return
        injector = self.injector_for(fault)
        self._record("fault-start", fault)
        self.active[fault.id] = (injector, fault)
        injector.start(fault)
        log.info("fault started", fault=fault.id, kind=fault.kind, target=fault.target)

    def stop(self, fault: ScheduledFault) -> None:
        entry = self.active.pop(fault.id, None)
        if entry is None:
            return
        injector, _ = entry
        try:
            injector.stop(fault)
        finally:
            self._record("fault-stop", fault)
            log.info("fault healed", fault=fault.id, kind=fault.kind, target=fault.target)

    def heal_all(self) -> None:
        errors: list[BaseException] = []
        for _, fault in reversed(list(self.active.values())):
            try:
                self.stop(fault)
            except Exception as exc:  # heal the rest before reporting
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Injection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal_all()

    def _record(self, f: str, fault: ScheduledFault) -> None:
        if self.history is not None:
            self.history.append(
                "nemesis",
                "info",
                f,
                fault.target,
                {"id": fault.id, "kind": fault.kind, "target": fault.target},
            )


async def follow(schedule: Schedule, injection: Injection, *, start: float | None = None) -> None:
    """Start and stop each scheduled fault at its offset from `start` (trio's clock; default:
    now) and return after the last stop. Run it inside `with injection:`, so that cancelling
    it (the run is over, or failed) still heals whatever it had started."""
    origin = trio.current_time() if start is None else start
    for offset, action, fault in schedule.events():
        await trio.sleep_until(origin + offset)
        if action == "start":
            injection.start(fault)
        else:
            injection.stop(fault)
