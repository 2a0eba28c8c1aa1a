"""blkfront: a guest's virtual block device over blkif (the frontend half; docs/blk.md).

    async with attach(dom, xs, DeviceId("vbd", 1, 0, 51712)) as disk:
        await disk.wait_connected()
        await disk.write(0, b"x" * 4096)
        data = await disk.read(0, 4096)
        await disk.flush()
        print(disk.info)   # a `Negotiated`: sectors, sector_size, queues, ...

Layout: `split` (I/O → ring requests), `core` (the sans-IO engine: shadow tables, grants,
persistent pool, recovery), `keys` (xenstore keys), `device` (trio edge). See
docs/blk.md, section Frontend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from frontends.blkfront.core import Negotiated
from frontends.blkfront.device import DETACH_TIMEOUT, Blkfront
from frontends.blkfront.errors import BlkError, BlkfrontProtocolError, DeviceNotFound
from frontends.blkfront.keys import Wishes, default_protocol
from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.granule import MAX_GRANULE_ORDER
from xenpv.hv import Domain
from xenpv.xenbus.core import DeviceId
from xenpv.xenbus.keys import BLK_MAX_INDIRECT_SEGMENTS, BLK_MAX_QUEUES, MAX_RING_PAGE_ORDER
from xenpv.xenstore.client import XenstoreClient

__all__ = [
    "BlkError",
    "Blkfront",
    "BlkfrontProtocolError",
    "DeviceNotFound",
    "GranuleNotSupported",
    "Negotiated",
    "Wishes",
    "attach",
]


class GranuleNotSupported(BlkError):
    """A grant granule order outside 0..4 was asked for."""


@asynccontextmanager
async def attach(
    dom: Domain,
    xs: XenstoreClient,
    device: DeviceId,
    *,
    queue_depth: int = 32,
    granule_order: int | None = None,
    protocol: str | None = None,
    max_ring_page_order: int = MAX_RING_PAGE_ORDER,
    max_queues: int = BLK_MAX_QUEUES,
    max_indirect_segments: int = BLK_MAX_INDIRECT_SEGMENTS,
    persistent: bool = True,
) -> AsyncIterator[Blkfront]:
    """Run the frontend of `device` in `dom` for the duration of the block.

    `granule_order` caps the grant granule (docs/granule-extension.md): None uses
    the largest the guest's page size and the backend's `max-grant-granule-order` allow, 0
    declines (4 KiB grants, the baseline); it is chosen anew at every handshake.
    `protocol` defaults to the guest's ABI (`keys.default_protocol`). The other keyword
    arguments are the frontend's maxima (Linux's module parameters). Leaving the block closes
    the device through xenbus and fails I/Os still waiting.
    """
    if granule_order is not None and not 0 <= granule_order <= MAX_GRANULE_ORDER:
        raise GranuleNotSupported(
            -2, f"grant granule order {granule_order}: expected 0..{MAX_GRANULE_ORDER} or None"
        )
    wishes = Wishes(
        max_ring_page_order=max_ring_page_order,
        max_queues=max_queues,
        max_indirect_segments=max_indirect_segments,
        persistent=persistent,
        protocol=protocol or default_protocol(dom.page_size),
        granule_order=granule_order,
    )
    front = Blkfront(
        dom, xs, device, queue_depth=queue_depth, grant_size=XEN_PAGE_SIZE, wishes=wishes
    )
    await front.start()
    async with trio.open_nursery() as nursery:
        front._nursery = nursery
        nursery.start_soon(front.run_handshake)
        try:
            yield front
        finally:
            # Shielded so that a cancelled caller still closes the device; bounded so that a
            # dead xenstored cannot hang the exit.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2 * DETACH_TIMEOUT):
                try:
                    await front.detach()
                finally:
                    nursery.cancel_scope.cancel()
