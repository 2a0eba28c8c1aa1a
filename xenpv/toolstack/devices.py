"""Toolstack side of PV devices: the first xenstore keys of a vbd or vif, as xl writes them.

Both directories are written in one transaction (retried on EAGAIN). Permissions follow xl:
the backend directory is owned by the backend domain and readable by the frontend, the frontend
directory is owned by the frontend domain and readable by the backend.

Keys starting with `xenpv-` are xenpv's toolstack-to-driver configuration (what Linux takes
from module parameters, e.g. `max_ring_page_order`); their names and how they are read are the
key contract in `xenpv.xenbus.keys`, shared with the drivers. Backends read them once per
connection.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus import keys
from xenpv.xenbus.core import DEVICE_CLASSES, DeviceId, Initialising
from xenpv.xenstore.client import Transaction, XenstoreClient
from xenpv.xenstore.wire import XsError


@dataclass(frozen=True, slots=True)
class VbdConfig:
    """What the backend needs to serve a vbd: `image` None means an in-memory disk."""

    image: str | None
    size: int
    read_only: bool = False
    sector_size: int = 512
    features: VbdFeatures = field(default_factory=VbdFeatures)
    nbd: str | None = None  # unix:PATH | tcp:HOST:PORT: the guest exports this disk there


async def _write_all(tx: Transaction, directory: str, values: Mapping[str, str | int]) -> None:
    for name, value in values.items():
        await tx.write(f"{directory}/{name}", str(value))


async def create_device(
    xs: XenstoreClient,
    device: DeviceId,
    backend_keys: Mapping[str, str | int],
    frontend_keys: Mapping[str, str | int],
) -> None:
    """Write a device's first keys (both ends' directories, in one transaction) from its
    configuration keys, as `vbd_keys`/`vif_keys` build them or as a re-attach saved them."""
    be, fe = device.backend_domid, device.frontend_domid
    instance = secrets.token_hex(8)  # this attach, told apart from an earlier one of the id

    async def body(tx: Transaction) -> None:
        for directory, owner, reader in (
            (device.backend, be, fe),
            (device.frontend, fe, be),
        ):
            await _rm_missing_ok(tx, directory)  # a fresh device: drop leftovers of an old one
            await tx.mkdir(directory)
            await tx.set_perms(directory, [f"n{owner}", f"r{reader}"])
        await _write_all(
            tx,
            device.backend,
            {
                "frontend": device.frontend,
                "frontend-id": fe,
                keys.ONLINE: 1,
                "state": int(Initialising),
                keys.XENPV_INSTANCE: instance,
                **backend_keys,
            },
        )
        await _write_all(
            tx,
            device.frontend,
            {
                "backend": device.backend,
                "backend-id": be,
                "state": int(Initialising),
                keys.XENPV_INSTANCE: instance,
                **frontend_keys,
            },
        )

    await xs.transact(body)


DeviceKeys = tuple[dict[str, str | int], dict[str, str | int]]


def vbd_keys(device: DeviceId, config: VbdConfig) -> DeviceKeys:
    """A vbd's configuration keys (backend, frontend), beyond the ends and `state`: as xl
    writes them (backend `mode`, `params`, `type`; frontend `virtual-device`) plus xenpv's."""
    f = config.features
    backend: dict[str, str | int] = {
        "mode": "r" if config.read_only else "w",
        "params": config.image or "",
        "type": "file" if config.image else "memory",
        "device-type": "disk",
        keys.XENPV_SIZE: config.size,
        keys.XENPV_SECTOR_SIZE: config.sector_size,
        keys.XENPV_MAX_RING_PAGE_ORDER: f.ring_page_order,
        keys.XENPV_MAX_QUEUES: f.queues,
        keys.XENPV_MAX_INDIRECT_SEGMENTS: f.indirect_segments,
        keys.XENPV_PERSISTENT: keys.flag(f.persistent),
        keys.XENPV_FLUSH: keys.flag(f.flush),
        keys.XENPV_BARRIER: keys.flag(f.barrier),
        keys.XENPV_DISCARD: keys.flag(f.discard),
        keys.XENPV_MAX_GRANULE_ORDER: f.max_granule_order,
    }
    frontend: dict[str, str | int] = {"virtual-device": device.devid, "device-type": "disk"}
    if config.nbd:
        frontend[keys.XENPV_NBD] = config.nbd
    return backend, frontend


def vif_keys(device: DeviceId, *, mac: str, tap: str | None = None) -> DeviceKeys:
    """A vif's configuration keys (backend, frontend): `mac`, `handle`, and the TAP if any."""
    frontend: dict[str, str | int] = {"handle": device.devid, "mac": mac}
    if tap is not None:
        frontend[keys.XENPV_TAP] = tap
    return {"handle": device.devid, "mac": mac, "type": "vif", "bridge": "xenpv"}, frontend


async def create_vbd(xs: XenstoreClient, device: DeviceId, config: VbdConfig) -> None:
    """Write a vbd's first keys (`vbd_keys`)."""
    if device.cls != "vbd":
        raise ValueError(f"not a vbd: {device}")
    await create_device(xs, device, *vbd_keys(device, config))


async def create_vif(
    xs: XenstoreClient, device: DeviceId, *, mac: str, tap: str | None = None
) -> None:
    """Write a vif's first keys (`vif_keys`)."""
    if device.cls != "vif":
        raise ValueError(f"not a vif: {device}")
    await create_device(xs, device, *vif_keys(device, mac=mac, tap=tap))


async def destroy_device(xs: XenstoreClient, device: DeviceId) -> None:
    """Remove both directories (xl does this once the backend reached Closed; the graceful
    path, key by key, is `xenpv.toolstack.hotplug.detach`)."""

    async def body(tx: Transaction) -> None:
        await _rm_missing_ok(tx, device.frontend)
        await _rm_missing_ok(tx, device.backend)
        # and the parents left empty (libxl__xs_path_cleanup): `device/<cls>`,
        # `backend/<cls>/<fe-domid>` and `backend/<cls>`
        for parent in (
            device.frontend.rsplit("/", 1)[0],
            device.backend.rsplit("/", 1)[0],
            device.backend.rsplit("/", 2)[0],
        ):
            try:
                if not await tx.directory(parent):
                    await tx.rm(parent)
            except XsError as exc:
                if exc.errno_name != "ENOENT":
                    raise

    await xs.transact(body)


async def list_devices(xs: XenstoreClient, backend_domid: int) -> list[DeviceId]:
    """Every device whose backend lives in `backend_domid` (what a restarted backend picks up)."""
    out: list[DeviceId] = []
    for cls in DEVICE_CLASSES:
        base = f"/local/domain/{backend_domid}/backend/{cls}"
        for fe in await xs.try_directory(base):
            for devid in await xs.try_directory(f"{base}/{fe}"):
                if fe.isdigit() and devid.isdigit():
                    out.append(DeviceId(cls, int(fe), backend_domid, int(devid)))
    return out


async def _rm_missing_ok(tx: Transaction, path: str) -> None:
    try:
        await tx.rm(path)
    except XsError as exc:
        if exc.errno_name != "ENOENT":  # ENOENT: not even the parent exists
            raise
