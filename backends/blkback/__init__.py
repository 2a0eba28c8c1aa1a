"""blkback: the backend half of Xen's block split driver, over the emulated hypervisor.

    await serve(dom, xs, device)     # serve one vbd until the toolstack removes it

Layout (sans-IO cores first, trio edges last):
- `keys`: the toolstack's keys (storage, which features to offer) → `BackendConfig`, and the
  handshake's: what we advertise, the frontend's ring keys → params, what we publish at connect;
- `request`: `RequestCore`, validation of one ring slot into an I/O plan or a rejection;
- `persistent`: the per-ring cache of persistently mapped grants;
- `queue`: `QueueWorker`, the trio task serving one ring;
- `device`: `BlkbackDevice`, the handshake driver, storage and connection life cycle.
docs/blk.md (## Backend) explains the choices where Linux and the headers leave room.
"""

from __future__ import annotations

from collections.abc import Callable

from backends.blkback.device import BlkbackDevice
from backends.blkback.keys import BackendConfig
from backends.storage import Storage
from xenpv.hv import Domain
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import XenstoreClient

__all__ = ["BlkbackDevice", "serve"]


async def serve(
    dom: Domain,
    xs: XenstoreClient,
    device: DeviceId,
    *,
    open_storage: Callable[[BackendConfig], Storage] | None = None,
) -> None:
    """Serve one vbd for its whole life (handshake, reconnects, restarts); return when the
    device's backend directory is removed; cancel to stop. Frontend misbehaviour never
    raises out of here (bad requests get error responses, bad rings close the device).
    `open_storage` replaces how the disk is opened (a fault run wraps it)."""
    await BlkbackDevice(dom, xs, device, open_storage=open_storage).run()
