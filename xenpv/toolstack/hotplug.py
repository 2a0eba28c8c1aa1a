"""Devices that come and go while their domains run: attach and detach, as xl does them.

Attach writes a device's first keys (`xenpv.toolstack.devices`) into a running cluster; the
domains' runtimes see the directories appear and start the drivers. A device that already
exists is refused (xl: "device already exists").

Detach follows libxl's device removal (`libxl__initiate_device_generic_remove`), key by key:

1. in one transaction: backend `online` = 0, and backend `state` = 5 (Closing) unless the
   backend is already Closed (a frontend-initiated close that finished);
2. the frontend sees the backend Closing: blkfront fails what is not on a ring, lets the
   backend answer what is, ends its grants and writes 6 (Closed); netfront tears down and
   writes Closed. The backend, which serves until then, sees the frontend Closed, drains,
   unmaps, closes its ports and writes 6 (Closed); being offline it does not start over;
3. once the backend `state` is 6 the toolstack removes both directories in one transaction
   (the runtimes cancel the device tasks; they have nothing left to tear down).

If the backend is not Closed within the timeout, `force` removes both directories anyway
(`xl block-detach --force`): the backend's device task is cancelled and tears down whatever
is still mapped, dropping requests in flight; without `force` the device is left offline and
Closing, and `DetachTimeout` says to retry with force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import trio

from xenpv.errors import XenpvError
from xenpv.toolstack import devices
from xenpv.toolstack.devices import VbdConfig
from xenpv.xenbus import keys
from xenpv.xenbus.core import Closed, Closing, DeviceId, XenbusState, parse_state
from xenpv.xenstore.client import Transaction, XenstoreClient

DETACH_TIMEOUT = 10.0  # libxl's LIBXL_DESTROY_TIMEOUT


class HotplugError(XenpvError):
    """A device cannot be attached or detached (no such device, already there, ...)."""


class DetachTimeout(HotplugError):
    """The device did not close within the timeout and `force` was not given."""


@dataclass(frozen=True, slots=True)
class DetachResult:
    device: DeviceId
    outcome: Literal["closed", "forced"]
    backend_state: XenbusState  # as last seen before the directories were removed
    frontend_state: XenbusState


async def device_exists(xs: XenstoreClient, device: DeviceId) -> bool:
    return (
        await xs.try_read(device.backend) is not None
        or await xs.try_read(device.frontend) is not None
    )


async def _refuse_existing(xs: XenstoreClient, device: DeviceId) -> None:
    if await device_exists(xs, device):
        raise HotplugError(f"device {device} already exists (detach it first)")


async def attach_vbd(xs: XenstoreClient, device: DeviceId, config: VbdConfig) -> None:
    await _refuse_existing(xs, device)
    await devices.create_vbd(xs, device, config)


async def attach_vif(
    xs: XenstoreClient, device: DeviceId, *, mac: str, tap: str | None = None
) -> None:
    await _refuse_existing(xs, device)
    await devices.create_vif(xs, device, mac=mac, tap=tap)


async def request_close(xs: XenstoreClient, device: DeviceId) -> XenbusState:
    """Step 1: `online` = 0 and backend Closing (left alone if already Closed), in one
    transaction. Returns the backend state found."""
    path = f"{device.backend}/state"

    async def body(tx: Transaction) -> XenbusState:
        raw = await tx.try_read(path)
        if raw is None:
            raise HotplugError(f"no device {device} (no {path})")
        state = parse_state(raw)
        await tx.write(f"{device.backend}/{keys.ONLINE}", "0")
        if state != Closed:
            await tx.write(path, str(int(Closing)))
        return state

    return await xs.transact(body)


async def _wait_backend_closed(xs: XenstoreClient, device: DeviceId) -> None:
    path = f"{device.backend}/state"
    async with xs.watch(path) as events:
        async for _event in events:
            raw = await xs.try_read(path)
            if raw is None or parse_state(raw) == Closed:
                return


async def detach(
    xs: XenstoreClient,
    device: DeviceId,
    *,
    grace: float = DETACH_TIMEOUT,
    force: bool = False,
) -> DetachResult:
    """Remove `device` through the xenbus close handshake (see the module docstring)."""
    if not math.isfinite(grace) or grace < 0:
        raise ValueError("grace must be a finite number of seconds >= 0")
    await request_close(xs, device)
    with trio.move_on_after(grace):
        await _wait_backend_closed(xs, device)
    backend = parse_state(await xs.try_read(f"{device.backend}/state"))
    frontend = parse_state(await xs.try_read(f"{device.frontend}/state"))
    closed = backend in (Closed, XenbusState.XenbusStateUnknown)
    if not closed and not force:
        raise DetachTimeout(
            f"device {device} did not close within {grace:g}s (backend {backend.short}, "
            f"frontend {frontend.short}); it is offline and Closing: detach with --force "
            f"to remove it anyway"
        )
    await devices.destroy_device(xs, device)
    return DetachResult(device, "closed" if closed else "forced", backend, frontend)


# -- detach and re-attach under the same id, with the same configuration ------------------

# Keys that belong to one attach or to the handshake, not to the device's configuration.
_NOT_CONFIG = frozenset(
    {"frontend", "frontend-id", "backend", "backend-id", "state", keys.ONLINE, keys.XENPV_INSTANCE}
)


@dataclass(frozen=True, slots=True)
class SavedDevice:
    """A device's configuration keys (as `devices.vbd_keys` / `vif_keys` wrote them), read
    before a detach so that `reattach` can plug the same device back."""

    device: DeviceId
    backend_keys: dict[str, str | int]
    frontend_keys: dict[str, str | int]


def _config_names(device: DeviceId) -> tuple[frozenset[str], frozenset[str]]:
    if device.cls == "vbd":
        backend, frontend = devices.vbd_keys(device, VbdConfig(image=None, size=0))
        extra_front = {keys.XENPV_NBD}
    else:
        backend, frontend = devices.vif_keys(device, mac="00:00:00:00:00:00")
        extra_front = {keys.XENPV_TAP}
    return frozenset(backend), frozenset(frontend) | extra_front


async def save_config(xs: XenstoreClient, device: DeviceId) -> SavedDevice:
    """The configuration keys of an attached device; HotplugError if it is not attached."""
    if not await device_exists(xs, device):
        raise HotplugError(f"no device {device}")
    backend_names, frontend_names = _config_names(device)
    saved: list[dict[str, str | int]] = []
    for directory, names in ((device.backend, backend_names), (device.frontend, frontend_names)):
        values: dict[str, str | int] = {}
        for name in sorted(names - _NOT_CONFIG):
            raw = await xs.try_read(f"{directory}/{name}")
            if raw is not None:
                values[name] = raw.decode("utf-8", "replace")
        saved.append(values)
    return SavedDevice(device, saved[0], saved[1])


async def reattach(xs: XenstoreClient, saved: SavedDevice) -> None:
    """Attach a detached device again under its id, with the keys `save_config` read (a new
    `xenpv-instance`, so the drivers tell it apart from the old attach)."""
    await _refuse_existing(xs, saved.device)
    await devices.create_device(xs, saved.device, saved.backend_keys, saved.frontend_keys)
