"""Toolstack side of PV devices: the first xenstore keys of a vbd or vif, as xl writes them.

Both directories are written in one transaction (retried on EAGAIN). Permissions follow xl:
the backend directory is owned by the backend domain and readable by the frontend, the frontend
directory is owned by the frontend domain and readable by the backend.

Keys starting with `xenpv-` are xenpv's toolstack-to-backend configuration (what Linux takes
from module parameters, e.g. `max_ring_page_order`): which features the backend offers for this
device, so that frontends can meet every combination. Backends read them once per connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus.core import DEVICE_CLASSES, DeviceId, Initialising
from xenpv.xenstore.client import Transaction, XenstoreClient
from xenpv.xenstore.wire import XsError

# vbd backend configuration keys (toolstack → backend).
VBD_SIZE = "xenpv-size"
VBD_SECTOR_SIZE = "xenpv-sector-size"
VBD_MAX_RING_PAGE_ORDER = "xenpv-max-ring-page-order"
VBD_MAX_QUEUES = "xenpv-max-queues"
VBD_MAX_INDIRECT_SEGMENTS = "xenpv-max-indirect-segments"
VBD_PERSISTENT = "xenpv-persistent"
VBD_FLUSH = "xenpv-flush"
VBD_BARRIER = "xenpv-barrier"
VBD_DISCARD = "xenpv-discard"
# docs/granule-extension.md: the backend offers `max-grant-granule-order` up to this.
VBD_MAX_GRANULE_ORDER = "xenpv-max-grant-granule-order"
# vif frontend configuration: attach a host TAP device to this netfront.
VIF_TAP = "xenpv-tap"
# vbd frontend configuration: the guest exports this disk over NBD there (docs/nbd.md).
VBD_NBD = "xenpv-nbd"


@dataclass(frozen=True, slots=True)
class VbdConfig:
    """What the backend needs to serve a vbd: `image` None means an in-memory disk."""

    image: str | None
    size: int
    read_only: bool = False
    sector_size: int = 512
    features: VbdFeatures = field(default_factory=VbdFeatures)
    nbd: str | None = None  # unix:PATH | tcp:HOST:PORT


async def _write_all(tx: Transaction, directory: str, keys: Mapping[str, str | int]) -> None:
    for name, value in keys.items():
        await tx.write(f"{directory}/{name}", str(value))


def _flag(value: bool) -> str:
    return "1" if value else "0"


async def _create(
    xs: XenstoreClient,
    device: DeviceId,
    backend_keys: Mapping[str, str | int],
    frontend_keys: Mapping[str, str | int],
) -> None:
    be, fe = device.backend_domid, device.frontend_domid

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
                "online": 1,
                "state": int(Initialising),
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
                **frontend_keys,
            },
        )

    await xs.transact(body)


async def create_vbd(xs: XenstoreClient, device: DeviceId, config: VbdConfig) -> None:
    """Write a vbd's first keys (as xl writes them: backend `mode`, `params`, `type`; frontend
    `virtual-device`)."""
    if device.cls != "vbd":
        raise ValueError(f"not a vbd: {device}")
    f = config.features
    await _create(
        xs,
        device,
        {
            "mode": "r" if config.read_only else "w",
            "params": config.image or "",
            "type": "file" if config.image else "memory",
            "device-type": "disk",
            VBD_SIZE: config.size,
            VBD_SECTOR_SIZE: config.sector_size,
            VBD_MAX_RING_PAGE_ORDER: f.ring_page_order,
            VBD_MAX_QUEUES: f.queues,
            VBD_MAX_INDIRECT_SEGMENTS: f.indirect_segments,
            VBD_PERSISTENT: _flag(f.persistent),
            VBD_FLUSH: _flag(f.flush),
            VBD_BARRIER: _flag(f.barrier),
            VBD_DISCARD: _flag(f.discard),
            VBD_MAX_GRANULE_ORDER: f.max_granule_order,
        },
        {
            "virtual-device": device.devid,
            "device-type": "disk",
            **({VBD_NBD: config.nbd} if config.nbd else {}),
        },
    )


async def create_vif(
    xs: XenstoreClient, device: DeviceId, *, mac: str, tap: str | None = None
) -> None:
    """Write a vif's first keys (backend and frontend `mac`, `handle`)."""
    if device.cls != "vif":
        raise ValueError(f"not a vif: {device}")
    frontend_keys: dict[str, str | int] = {"handle": device.devid, "mac": mac}
    if tap is not None:
        frontend_keys[VIF_TAP] = tap
    await _create(
        xs,
        device,
        {"handle": device.devid, "mac": mac, "type": "vif", "bridge": "xenpv"},
        frontend_keys,
    )


async def destroy_device(xs: XenstoreClient, device: DeviceId) -> None:
    """Remove both directories (xl does this once the backend reached Closed)."""

    async def body(tx: Transaction) -> None:
        await _rm_missing_ok(tx, device.frontend)
        await _rm_missing_ok(tx, device.backend)

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
