"""The guest-side NBD export workload: serve a vbd over NBD from the guest's own blkfront.

The toolstack asks for it with the frontend key `xenpv-nbd` (`unix:PATH` or
`tcp:HOST:PORT`; a topology's `nbd = ...` on a `[[vbd]]`). Once that vbd's frontend is
attached and Connected, the guest listens there (`xenpv.nbd.server`) and reports the bound
address in `/local/domain/<id>/xenpv/nbd/<devid>` (`error: ...` if it cannot listen), which
`xenpv nbd` and scripts watch. The export lives as long as the frontend: a detached vbd
stops its server. See docs/nbd.md.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.nbd.blkfront import BlkfrontDisk
from xenpv.nbd.server import open_listener, serve_listener
from xenpv.runtime.workload import WorkloadContext
from xenpv.xenbus import keys
from xenpv.xenbus.core import DeviceId, domain_path
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront

log = structlog.get_logger()

NBD_KEY = keys.XENPV_NBD  # in the vbd's frontend directory: where to export it
NBD_STATUS = "xenpv/nbd"  # under the guest's domain path: <devid> = the bound address


def status_path(device: DeviceId) -> str:
    return f"{domain_path(device.frontend_domid)}/{NBD_STATUS}/{device.devid}"


class NbdExports:
    """Serves every attached vbd whose frontend directory asks for an NBD export."""

    name = "nbd-exports"

    async def run(self, ctx: WorkloadContext) -> None:
        running: dict[DeviceId, tuple[Blkfront, trio.CancelScope]] = {}
        changed = trio.Event()

        async def follow() -> None:
            nonlocal changed
            while True:
                await ctx.wait_devices_changed()
                changed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            while True:
                changed = trio.Event()
                for device, (front, scope) in list(running.items()):
                    if ctx.blk.get(device) is not front:
                        scope.cancel()
                        del running[device]
                for device, front in list(ctx.blk.items()):
                    if device in running:
                        continue
                    try:
                        raw = await ctx.xs.try_read(f"{device.frontend}/{NBD_KEY}")
                    except XsError:
                        continue
                    if not raw:
                        continue
                    scope = trio.CancelScope()
                    running[device] = (front, scope)
                    nursery.start_soon(self._export, ctx, device, front, raw.decode(), scope)
                await changed.wait()

    async def _export(
        self,
        ctx: WorkloadContext,
        device: DeviceId,
        front: Blkfront,
        address: str,
        scope: trio.CancelScope,
    ) -> None:
        with scope, structlog.contextvars.bound_contextvars(device=str(device)):
            await front.wait_connected()
            try:
                listener, bound = await open_listener(address)
            except XenpvError as exc:
                log.error("cannot export the vbd over NBD", address=address, error=str(exc))
                with contextlib.suppress(XsError, XenpvError):
                    await ctx.xs.write(status_path(device), f"error: {exc}")
                return
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_listener, listener, bound, BlkfrontDisk(front))
                await ctx.xs.write(status_path(device), bound)
