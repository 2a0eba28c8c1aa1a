"""A TAP device as a port of netback's switch: how real network stacks meet the PV path.

`run_tap_port()` plugs a `xenpv.tap.Tap` into the backend's switch, carrying each frame's
virtio-net header as the switch metadata, so GSO and checksum state cross the switch untouched.
"""

from __future__ import annotations

import structlog
import trio

from backends.switch import SwitchError, SwitchPort
from xenpv.abi.virtio_net import NO_OFFLOAD, VirtioNetHdr
from xenpv.tap import Tap, TapError

log = structlog.get_logger()


async def run_tap_port(tap: Tap, port: SwitchPort[VirtioNetHdr]) -> None:
    """Plug `tap` into a switch: frames the kernel sends go into `port`, frames the switch
    sends out of `port` go to the kernel, each with its virtio-net header as the switch's
    metadata. Runs until cancelled, the port is detached or the TAP fails to read. A frame the
    kernel refuses (bad offload metadata from some guest) is logged and dropped."""

    async def kernel_to_switch() -> None:
        while True:
            hdr, frame = await tap.read_frame()
            try:
                port.send(frame, hdr)
            except SwitchError:  # detached
                nursery.cancel_scope.cancel()
                return

    async def switch_to_kernel() -> None:
        async for frame, hdr in port:
            try:
                await tap.write_frame(hdr or NO_OFFLOAD, frame)
            except TapError as exc:
                log.warning("tap.frame_refused", tap=tap.name, length=len(frame), error=str(exc))
        nursery.cancel_scope.cancel()  # detached

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kernel_to_switch)
        nursery.start_soon(switch_to_kernel)
