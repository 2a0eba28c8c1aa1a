"""`DeviceInjector`: `device.detach-reattach`, applied by the runner, which is dom0 and has
the toolstack (`xenpv.toolstack.hotplug`).

- at the fault's start the device's configuration keys are saved and the device is detached
  through the xenbus close handshake (`hotplug.detach`): online=0, backend Closing, both ends
  Closed, directories removed; if the backend is not Closed within `grace` seconds and
  `force` is true the directories are removed anyway (`xl block-detach --force`);
- at its stop the device is attached again under the same id with the same keys
  (`hotplug.reattach`) and the runner waits, bounded, for both ends to be Connected before
  it records `fault-stop`.

The guest's workloads see the frontend go and come back: an I/O in flight or issued while it
is away fails (a `fail`/`info` op), and the next one goes through the new frontend.

`start`/`stop` (the `Injector` interface, which must not block) only mark the fault; the
runner awaits `detach` / `reattach` around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import trio

from xenpv.faults.catalogue import CATALOGUE, Scalar
from xenpv.faults.schedule import ScheduledFault
from xenpv.faults.targets import DeviceTarget, Targets
from xenpv.toolstack import hotplug
from xenpv.xenbus.core import DeviceId, domain_path
from xenpv.xenstore.client import XenstoreClient, XenstoreConnectionError
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

KIND = "device.detach-reattach"


def device_id(device: DeviceTarget, domids: dict[str, int]) -> DeviceId:
    return DeviceId(
        "vbd" if device.cls == "vbd" else "vif",
        domids[device.guest],
        domids[device.backend],
        device.devid,
    )


def state_paths(device: DeviceId) -> tuple[str, str]:
    """(frontend, backend) `state` paths of a device."""
    fe = domain_path(device.frontend_domid)
    be = domain_path(device.backend_domid)
    return (
        f"{fe}/device/{device.cls}/{device.devid}/state",
        f"{be}/backend/{device.cls}/{device.frontend_domid}/{device.devid}/state",
    )


def param(fault: ScheduledFault, name: str) -> Scalar:
    """The fault's parameter, or the catalogue's default when the plan did not set it."""
    try:
        return fault.param(name)
    except KeyError:
        return CATALOGUE[fault.kind].param(name).default


@dataclass
class DeviceInjector:
    xs: XenstoreClient
    topology: Targets
    domids: dict[str, int]
    saved: dict[str, hotplug.SavedDevice] = field(default_factory=dict)  # fault id -> keys

    def handles(self, fault: ScheduledFault) -> bool:
        return fault.kind == KIND

    def start(self, fault: ScheduledFault) -> None:
        """Nothing to do synchronously: the runner awaits `detach`."""

    def stop(self, fault: ScheduledFault) -> None:
        """Nothing to do synchronously: the runner awaits `reattach`."""

    def device(self, fault: ScheduledFault) -> DeviceId:
        return device_id(self.topology.device(fault.target), self.domids)

    async def detach(self, fault: ScheduledFault) -> None:
        device = self.device(fault)
        try:
            saved = await hotplug.save_config(self.xs, device)
            result = await hotplug.detach(
                self.xs,
                device,
                grace=float(param(fault, "grace")),
                force=bool(param(fault, "force")),
            )
        except (hotplug.HotplugError, XsError, XenstoreConnectionError) as exc:
            # Not there (an overlapping fault detached it), or not Closed in time without
            # `force`: then it stays offline and Closing, as xl leaves it, and the liveness
            # checker reports it. Nothing is re-attached at the stop.
            log.warning("detach failed", fault=fault.id, device=str(device), error=str(exc))
            return
        self.saved[fault.id] = saved
        log.info("device detached", fault=fault.id, device=str(device), outcome=result.outcome)

    async def reattach(self, fault: ScheduledFault, *, wait: float) -> None:
        """Plug the device back, then wait (up to `wait` s) for both ends to be Connected."""
        saved = self.saved.pop(fault.id, None)
        if saved is None:
            return  # never detached (the detach timed out without force)
        try:
            await hotplug.reattach(self.xs, saved)
        except (hotplug.HotplugError, XsError, XenstoreConnectionError) as exc:
            log.warning(
                "re-attach failed", fault=fault.id, device=str(saved.device), error=str(exc)
            )
            return
        log.info("device re-attached", fault=fault.id, device=str(saved.device))
        with trio.move_on_after(wait):
            for path in state_paths(saved.device):
                await _until_connected(self.xs, path)


async def _until_connected(xs: XenstoreClient, path: str) -> None:
    async with xs.watch(path) as events:
        async for _event in events:
            raw = await xs.try_read(path)
            if raw is not None and raw.strip() == b"4":
                return
