"""netfront: the vif frontend (docs/net.md), Linux xen-netfront's protocol in a guest domain.

    async with attach(dom, xs, DeviceId("vif", 1, 0, 0)) as front:
        await front.wait_connected()
        await front.send(frame)                      # gso=NetifGsoExtra(...), csum_blank=True
        got = await front.receive()                  # RxFrame: .frame .gso .csum_blank ...
        front.mac, front.info, front.stats()

Layout: `core` (sans-IO tx/rx ring logic), `keys` (handshake keys), `flowhash` (queue
selection; headers are found by `xenpv.ethernet`), `device` (the trio edge), `tap` (a Linux
TAP device on this vif). See docs/net.md, "Frontend".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from frontends.netfront.core import Negotiated, NetfrontError, NetfrontProtocolError, RxFrame
from frontends.netfront.device import Netfront
from frontends.netfront.tap import configure_link, open_tap, run_tap
from xenpv.hv import Domain
from xenpv.xenbus.core import DeviceId, Initialising, Unknown
from xenpv.xenbus.handshake import publish, read_state, run_handshake
from xenpv.xenbus.keys import XENPV_TAP
from xenpv.xenstore.client import XenstoreClient

__all__ = [
    "Negotiated",
    "Netfront",
    "NetfrontError",
    "NetfrontProtocolError",
    "RxFrame",
    "attach",
]


@asynccontextmanager
async def attach(
    dom: Domain,
    xs: XenstoreClient,
    device: DeviceId,
    *,
    granule_order: int | None = None,
    max_queues: int | None = None,
) -> AsyncIterator[Netfront]:
    """Run the frontend of `device` for the life of the block (reconnecting as needed).

    If the frontend directory has a `xenpv-tap` key, a Linux TAP device of that name is
    attached to this vif (frames then go to the TAP, not to `receive()`). Leaving the block
    closes the device as Linux netfront's remove does (Closing, then Closed).
    """
    front = Netfront(dom, xs, device, granule_order=granule_order, max_queues=max_queues)
    tap_raw = await xs.try_read(f"{device.frontend}/{XENPV_TAP}")
    tap = open_tap(tap_raw.decode("ascii", "replace")) if tap_raw else None
    front.tap = tap
    try:
        if tap is not None:
            mac = await xs.try_read(f"{device.frontend}/mac")
            await configure_link(tap, mac.decode("ascii", "replace") if mac else None)
        # A frontend (re)starting on a device that a previous instance left past
        # Initialising starts over; the backend RESETs on seeing that (xenpv.xenbus.core rules).
        if await read_state(xs, device.frontend) not in (Unknown, Initialising):
            await publish(xs, device.frontend, {}, state=Initialising)
        async with trio.open_nursery() as nursery:
            front._nursery = nursery
            nursery.start_soon(front._watch_backend)
            nursery.start_soon(run_handshake, xs, front)
            if tap is not None:
                nursery.start_soon(run_tap, front, tap)
            try:
                yield front
            finally:
                with trio.CancelScope(shield=True):
                    await front._shutdown()
                nursery.cancel_scope.cancel()
    finally:
        if tap is not None:
            tap.close()
