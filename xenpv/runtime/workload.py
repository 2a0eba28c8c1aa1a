"""What runs inside a guest: the workload interface and the context it gets.

A workload is anything with a `name` and an async `run(ctx)`: the demo's self-test
(`xenpv.runtime.selftest`), the echo responder (`xenpv.runtime.echo`), the interop worker's
cells (`xenpv.interop.worker`) and fault-injection workloads. It reaches the guest only through
its `WorkloadContext`: the domain, its xenstore client, the block and net frontends attached
right now (which come and go: `wait_devices_changed`), and `frames`, the per-vif registry of
receive handlers.

Received frames: whoever attached a netfront runs `pump_frames` on it, which hands every frame
to the sinks registered for that vif, in registration order, until one claims it. A sink is a
plain function (it runs in the pump task, so it must not block); a workload that must answer a
frame queues the answer for a task of its own. A frame no sink claims is dropped, as a NIC
drops a frame no protocol handler wants.

Nothing here imports the drivers at run time: the runtime loads them lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreClient

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront
    from frontends.netfront import Netfront, RxFrame
    from xenpv.hv import Domain

FrameSink = Callable[["RxFrame"], bool]
"""A receive handler: True if it took the frame (no later sink sees it)."""


class FrameSinks:
    """Per-vif receive handlers (see the module docstring)."""

    def __init__(self) -> None:
        self._sinks: dict[DeviceId, list[FrameSink]] = {}

    @contextmanager
    def registered(self, device: DeviceId, sink: FrameSink) -> Iterator[None]:
        """`sink` receives `device`'s frames for the duration of the block."""
        self._sinks.setdefault(device, []).append(sink)
        try:
            yield
        finally:
            sinks = self._sinks[device]
            sinks.remove(sink)
            if not sinks:
                del self._sinks[device]

    def deliver(self, device: DeviceId, rx: RxFrame) -> bool:
        """Offer `rx` to `device`'s sinks in order; False if none took it."""
        return any(sink(rx) for sink in list(self._sinks.get(device, ())))


async def pump_frames(front: Netfront, sinks: FrameSinks) -> None:
    """Receive `front`'s frames forever and deliver them to its sinks. Ends with
    `NetfrontError` once the frontend is closed."""
    while True:
        sinks.deliver(front.device, await front.receive())


@dataclass(eq=False)
class WorkloadContext:
    """What a workload may use: one guest domain and its attached frontends."""

    dom: Domain
    xs: XenstoreClient
    name: str  # the domain's name, as the toolstack published it
    blk: dict[DeviceId, Blkfront] = field(default_factory=dict)
    net: dict[DeviceId, Netfront] = field(default_factory=dict)
    frames: FrameSinks = field(default_factory=FrameSinks)
    _changed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    def devices_changed(self) -> None:
        """Called by whoever attaches or detaches a frontend."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_devices_changed(self) -> None:
        """Return after the next attach or detach."""
        await self._changed.wait()


class Workload(Protocol):
    """Something a guest runs: until it is done, or for the domain's life (then it is
    cancelled when the domain stops)."""

    @property
    def name(self) -> str: ...

    async def run(self, ctx: WorkloadContext) -> None: ...
