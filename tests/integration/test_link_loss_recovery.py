"""A window of link loss between a backend and a live guest: the link fails (never a silently
lost message), the backend closes as after a restart, and after the heal the devices are
Connected again and I/O flows: blk writes issued during the window complete after it, and a
vif receives again (docs/faults.md, "Link faults")."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from backends.blkback import BlkbackDevice
from backends.netback.device import Vif
from backends.switch import LiveSwitch
from frontends.blkfront import attach as blk_attach
from frontends.netfront import attach as net_attach
from tests.integration.blk_env import DEVICE, make_vbd, pair
from tests.integration.conftest import Xenstored
from tests.unit.faults_helpers import fault
from xenpv.abi.virtio_net import VirtioNetHdr
from xenpv.faults.link import LinkInjector
from xenpv.toolstack.devices import create_vif
from xenpv.xenbus.core import Connected, DeviceId, parse_state
from xenpv.xenstore.client import XenstoreClient

LOSS = fault("link.loss", "link:back-front", "f0.0")
DOMIDS = {"back": 0, "front": 1}


async def _connected(xs: XenstoreClient, device: DeviceId) -> bool:
    states = [
        parse_state(await xs.try_read(f"{end}/state")) for end in (device.frontend, device.backend)
    ]
    return all(state == Connected for state in states)


async def _until_connected(xs: XenstoreClient, device: DeviceId) -> None:
    async with xs.watch(f"{device.backend}/state") as events:
        async for _event in events:
            if await _connected(xs, device):
                return


async def _until_backend_not_connected(xs: XenstoreClient, device: DeviceId) -> None:
    """The backend's data path died with the link and it closed (writing Closed, as after a
    restart). It cannot connect again while the loss lasts (CONNECT's mappings need the link),
    so it stays out of Connected until the heal, whatever step of the cycle a read finds."""
    async with xs.watch(f"{device.backend}/state") as events:
        async for _event in events:
            if parse_state(await xs.try_read(f"{device.backend}/state")) != Connected:
                return


@pytest.mark.parametrize("transport", ["shm", "socket"])
async def test_blk_writes_during_a_loss_window_complete_after_the_heal(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    injector = LinkInjector(DOMIDS, seed=1)
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, transport, 4096, guest_memory=32 << 20) as p:
            p.backend.set_link_faults(injector)
            p.guest.set_link_faults(injector)
            await make_vbd(p.xs, size=4 << 20)
            backend = BlkbackDevice(p.backend, p.xs, DEVICE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.run)
                async with blk_attach(p.guest, p.xs, DEVICE) as front:
                    await front.write(0, b"a" * 4096)
                    first = backend.connections
                    injector.start(LOSS)
                    done = trio.Event()

                    async def write_through() -> None:
                        for n in range(8):
                            await front.write(4096 * n, bytes([n]) * 4096)
                        done.set()

                    nursery.start_soon(write_through)
                    # The first message across fails the link: the backend closes.
                    await _until_backend_not_connected(p.xs, DEVICE)
                    assert not done.is_set()
                    injector.stop(LOSS)
                    await done.wait()  # re-issued on the new connection
                    await _until_connected(p.xs, DEVICE)
                    assert backend.connections > first
                    for n in range(8):
                        assert await front.read(4096 * n, 4096) == bytes([n]) * 4096
                nursery.cancel_scope.cancel()


async def test_a_vif_receives_again_after_a_loss_window(
    xenstored: Xenstored, xs_workdir: Path
) -> None:
    injector = LinkInjector(DOMIDS, seed=1)
    device = DeviceId("vif", frontend_domid=1, backend_domid=0, devid=0)
    switch: LiveSwitch[VirtioNetHdr] = LiveSwitch()
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, "shm", 4096, guest_memory=32 << 20) as p:
            p.backend.set_link_faults(injector)
            p.guest.set_link_faults(injector)
            await create_vif(p.xs, device, mac="00:16:3e:00:00:01")
            vif = Vif(p.backend, p.xs, device, switch)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(vif.run)
                async with net_attach(p.guest, p.xs, device) as front:
                    await vif.wait_until(lambda v: v.connected)
                    port = switch.attach("probe")
                    header = b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5"

                    async def received(payload: bytes) -> None:
                        """Send frames carrying `payload` until one arrives."""
                        while True:
                            port.send(header + payload, None)
                            with trio.move_on_after(0.2):
                                while (await front.receive()).frame[14:] != payload:
                                    pass
                                return

                    await received(b"before" * 8)
                    first = vif.connections
                    injector.start(LOSS)
                    async with trio.open_nursery() as traffic:

                        async def send_frames() -> None:
                            # Until one makes netback notify the guest: that fails the link.
                            while True:
                                port.send(header + b"during" * 8, None)
                                await trio.sleep(0.01)

                        traffic.start_soon(send_frames)
                        await _until_backend_not_connected(p.xs, device)
                        traffic.cancel_scope.cancel()
                    injector.stop(LOSS)
                    await _until_connected(p.xs, device)
                    await received(b"after!" * 8)
                    assert vif.connections > first
                nursery.cancel_scope.cancel()
