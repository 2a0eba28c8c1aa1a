"""Event channel ports: a pending bit, a mask, and a trio-friendly wait.

Semantics (Xen's): several notifications before the handler runs deliver one wake (the
pending bit coalesces them); a masked port stays pending until unmasked; when the peer closes
its end (or dies) the local port learns it: `wait()` first returns a still-pending event, then
raises `EventChannelClosed`. Spurious wakes are allowed (drivers always re-check their ring),
and the socket transport uses them to close the ring.h Dekker race (docs/hypervisor.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from xenpv.hv.errors import EventChannelClosed


class EventSource(Protocol):
    """Where a port's events arrive (the link to its peer)."""

    async def receive_until(self, done: Callable[[], bool]) -> bool: ...

    def interrupt(self) -> None: ...


class PortOwner(Protocol):
    def send_event(self, channel: EventChannel) -> None: ...

    def close_port(self, channel: EventChannel) -> None: ...

    def event_source(self, channel: EventChannel) -> EventSource | None: ...


class EventChannel:
    """One local port, bound (or to be bound) to a port of `remote_domid`."""

    __slots__ = (
        "_closed",
        "_lot",
        "_owner",
        "_receiving",
        "_released",
        "masked",
        "pending",
        "port",
        "remote_domid",
        "remote_port",
    )

    def __init__(
        self, owner: PortOwner, port: int, remote_domid: int, remote_port: int | None
    ) -> None:
        self._owner = owner
        self.port = port
        self.remote_domid = remote_domid
        self.remote_port = remote_port  # None while unbound (alloc_unbound, peer not bound yet)
        self.pending = False
        self.masked = False
        self._closed: str | None = None
        self._released = False  # the owner's port table let go of the port (EVTCHNOP_close)
        self._lot = trio.lowlevel.ParkingLot()
        self._receiving: EventSource | None = None  # our waiter is receiving from it

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def notify(self) -> None:
        """EVTCHNOP_send: queue an event for the peer; never blocks.

        A port whose peer has not bound yet drops the event, as Xen does for an unbound port.
        Raises EventChannelClosed once the channel is closed (locally, by the peer, or death).
        """
        if self._closed is not None:
            raise EventChannelClosed(f"port {self.port}: {self._closed}")
        if self.remote_port is not None:
            self._owner.send_event(self)

    async def wait(self) -> None:
        """Return once an event is pending and the port unmasked; clears the pending bit.

        While nobody else does, the waiting task receives from the peer's link itself (like a
        CPU taking its own interrupt) instead of being woken by the link's reader task.
        """
        while True:
            if self.pending and not self.masked:
                self.pending = False
                return
            if self._closed is not None:
                raise EventChannelClosed(f"port {self.port}: {self._closed}")
            source = self._owner.event_source(self)
            if source is not None and self._receiving is None:
                self._receiving = source
                try:
                    received = await source.receive_until(self._ready)
                finally:
                    self._receiving = None
                if received:
                    continue
            await self._lot.park()

    def _ready(self) -> bool:
        return (self.pending and not self.masked) or self._closed is not None

    def _wake(self) -> None:
        self._lot.unpark_all()
        if self._receiving is not None:
            self._receiving.interrupt()

    def consume(self) -> bool:
        """Non-blocking wait: clear and report the pending bit (False while masked)."""
        if self.pending and not self.masked:
            self.pending = False
            return True
        return False

    def mask(self) -> None:
        self.masked = True

    def unmask(self) -> None:
        self.masked = False
        if self.pending:
            self._wake()

    def close(self) -> None:
        """EVTCHNOP_close: release the port; the peer's port learns it. Also after the peer
        closed its end: as in Xen, the port stays allocated until closed locally."""
        if not self._released:
            self._released = True
            self._owner.close_port(self)  # tells the peer only while the channel is open
        self._set_closed("closed locally")

    # -- used by the domain runtime ---------------------------------------------------------

    def raise_event(self) -> None:
        """An event arrived (or a spurious one is injected): set pending, wake the waiter."""
        if not self.pending:
            self.pending = True
            if not self.masked:
                self._wake()

    def _set_closed(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        self._wake()

    def peer_closed(self, reason: str) -> None:
        self._set_closed(reason)

    def __repr__(self) -> str:
        return (
            f"EventChannel(port={self.port}, remote={self.remote_domid}:{self.remote_port}, "
            f"pending={self.pending}, masked={self.masked}, closed={self._closed!r})"
        )
