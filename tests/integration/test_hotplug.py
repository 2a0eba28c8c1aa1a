"""Devices that come and go while the domains run (`xenpv.toolstack.hotplug`), against a real
xenstored, the domain runtime and the real drivers; backend and guests in one trio run:

- detach during a block write stream: every acknowledged write is in the image, the writes in
  flight complete or fail, none hangs; both ends reach Closed before the directories go;
- detach during a net stream: the sender fails instead of waiting forever;
- a frontend that never answers the close: no detach without force, force after the timeout,
  the backend unmaps and keeps serving the other guest;
- a frontend-initiated close, then the toolstack's detach; the same id attached again
  reconnects;
- attach/detach 100 times: no grants, mappings, event channels, xenstore nodes or tasks leak.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from frontends.blkfront import BlkError
from frontends.netfront import NetfrontError
from tests.integration.conftest import Xenstored
from xenpv.hv import Domain
from xenpv.runtime.domain_process import DomainRuntime, run_domain
from xenpv.toolstack import hotplug
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.domains import create_domain
from xenpv.xenbus.core import (
    Action,
    Closed,
    Connected,
    DeviceId,
    XenbusState,
    parse_state,
    xvd_number,
)
from xenpv.xenstore.client import XenstoreClient, connect

BLOCK = 4096
# a broadcast IPv4-typed frame: the switch floods it, nobody needs to answer
FRAME = bytes.fromhex("ffffffffffff00163e0000aa0800") + bytes(100)


@dataclass
class Cluster:
    dom0: XenstoreClient
    backend: DomainRuntime
    guests: list[DomainRuntime]

    def vbd(self, guest: int = 0, disk: int = 0) -> DeviceId:
        return DeviceId(
            "vbd", self.guests[guest].info.domid, self.backend.info.domid, xvd_number(disk)
        )

    def vif(self, guest: int = 0, devid: int = 0) -> DeviceId:
        return DeviceId("vif", self.guests[guest].info.domid, self.backend.info.domid, devid)


@contextlib.asynccontextmanager
async def cluster(xenstored: Xenstored, tmp: Path, guests: int = 1) -> AsyncIterator[Cluster]:
    """A backend and `guests` guests, each a `run_domain` in this trio run, no workloads."""
    async with contextlib.AsyncExitStack() as stack:
        dom0 = await stack.enter_async_context(connect(xenstored.unix))
        nursery = await stack.enter_async_context(trio.open_nursery())
        runtimes: list[DomainRuntime] = []
        for name in ["backend", *(f"guest{i}" for i in range(guests))]:
            created = await create_domain(
                dom0, name=name, page_size=4096, memory_bytes=64 << 20,
                endpoint=f"unix:{tmp}/{name}.sock",
            )  # fmt: skip
            key = created.key
            xs = await stack.enter_async_context(connect(xenstored.tcp, key=key))

            async def run(
                task_status: trio.TaskStatus[DomainRuntime],
                xs: XenstoreClient = xs,
                key: object = key,
            ) -> None:
                await run_domain(xs, key, workloads=(), task_status=task_status)  # type: ignore[arg-type]

            runtimes.append(await nursery.start(run))
        try:
            yield Cluster(dom0, runtimes[0], runtimes[1:])
        finally:
            nursery.cancel_scope.cancel()


async def wait_states(
    xs: XenstoreClient, device: DeviceId, frontend: XenbusState, backend: XenbusState
) -> None:
    """Wait (on a watch) until the frontend and backend states are as wanted."""
    async with xs.watch("/local/domain") as events:
        async for _event in events:
            fe = parse_state(await xs.try_read(f"{device.frontend}/state"))
            be = parse_state(await xs.try_read(f"{device.backend}/state"))
            if (fe, be) == (frontend, backend):
                return


async def wait_attached(rt: DomainRuntime, device: DeviceId) -> None:
    while device not in (rt.blk if device.cls == "vbd" else rt.net):
        await rt.ctx.wait_devices_changed()


async def wait_tasks(rt: DomainRuntime, running: int) -> None:
    """Wait until `rt` runs `running` device tasks (all watches together)."""
    while sum(t.running for t in rt.device_tasks.values()) > running:
        ended = [t.ended for t in rt.device_tasks.values()]
        async with trio.open_nursery() as nursery:
            for event in ended:

                async def one(event: trio.Event = event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(one)


async def count_nodes(xs: XenstoreClient, path: str) -> int:
    """How many nodes `path` and its subtree hold (0: it does not exist)."""
    if await xs.try_read(path) is None:
        return 0
    return 1 + sum(
        [await count_nodes(xs, f"{path}/{child}") for child in await xs.try_directory(path)]
    )


def task_names() -> list[str]:
    """Every task of this trio run, by name."""

    def walk(task: trio.lowlevel.Task) -> list[str]:
        names = [task.name]
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names += walk(child)
        return names

    return sorted(walk(trio.lowlevel.current_root_task()))


def hv_counts(backend: Domain, guest: Domain) -> dict[str, int]:
    return {
        "backend maps": backend.mapper.maps_in_use,
        "backend ports": backend.ports.open_count(),
        "guest grants": guest.grants.in_use(),
        "guest ports": guest.ports.open_count(),
    }


def pattern(block: int) -> bytes:
    return block.to_bytes(4, "little") * (BLOCK // 4)


async def test_detach_during_block_write_stream(xenstored: Xenstored, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    size = 8 << 20
    with trio.fail_after(90):
        async with cluster(xenstored, tmp_path) as c:
            vbd = c.vbd()
            await hotplug.attach_vbd(c.dom0, vbd, VbdConfig(image=str(image), size=size))
            guest = c.guests[0]
            await wait_attached(guest, vbd)
            disk = guest.blk[vbd]
            await disk.wait_connected()
            acked: list[int] = []
            failed: list[str] = []
            enough = trio.Event()
            writers = 8

            async def writer(first: int) -> None:
                for block in range(first, size // BLOCK, writers):
                    try:
                        await disk.write(block * BLOCK, pattern(block))
                    except BlkError as exc:
                        failed.append(str(exc))
                        return
                    acked.append(block)
                    if len(acked) >= 64:
                        enough.set()

            async with trio.open_nursery() as nursery:
                for first in range(writers):
                    nursery.start_soon(writer, first)
                await enough.wait()
                result = await hotplug.detach(c.dom0, vbd, grace=20)
            # every writer ended: by finishing its blocks or by a clean error
            assert result.outcome == "closed"
            assert (result.frontend_state, result.backend_state) == (Closed, Closed)
            assert failed, "the stream should have been cut by the detach"
            assert await c.dom0.try_read(vbd.backend) is None
            assert await c.dom0.try_read(vbd.frontend) is None
            await wait_tasks(c.backend, 0)
    data = image.read_bytes()
    for block in acked:
        assert data[block * BLOCK : (block + 1) * BLOCK] == pattern(block), block


async def test_detach_during_net_stream(xenstored: Xenstored, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with cluster(xenstored, tmp_path) as c:
            vif = c.vif()
            await hotplug.attach_vif(c.dom0, vif, mac="00:16:3e:00:00:aa")
            guest = c.guests[0]
            await wait_attached(guest, vif)
            net = guest.net[vif]
            await net.wait_connected()
            sent = 0
            streaming = trio.Event()
            ended: list[str] = []

            async def sender() -> None:
                nonlocal sent
                try:
                    while True:
                        await net.send(FRAME)
                        sent += 1
                        if sent == 100:
                            streaming.set()
                except NetfrontError as exc:
                    ended.append(str(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                await streaming.wait()
                result = await hotplug.detach(c.dom0, vif, grace=20)
            assert result.outcome == "closed"
            assert (result.frontend_state, result.backend_state) == (Closed, Closed)
            assert ended and sent >= 100
            await wait_tasks(c.backend, 0)
            assert c.backend.dom.mapper.maps_in_use == 0


async def test_force_detach_of_a_frontend_that_never_answers(
    xenstored: Xenstored, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with cluster(xenstored, tmp_path, guests=2) as c:
            stuck_vbd, other_vbd = c.vbd(0), c.vbd(1)
            for device in (stuck_vbd, other_vbd):
                await hotplug.attach_vbd(c.dom0, device, VbdConfig(image=None, size=4 << 20))
            for index, device in enumerate((stuck_vbd, other_vbd)):
                await wait_attached(c.guests[index], device)
                await c.guests[index].blk[device].wait_connected()
            other_maps = c.backend.dom.mapper.maps_in_use // 2
            assert other_maps > 0
            stuck = c.guests[0].blk[stuck_vbd]
            real_perform = stuck.perform

            async def never_closes(action: Action) -> object:
                if action is Action.CLOSE:
                    await trio.sleep_forever()
                return await real_perform(action)

            stuck.perform = never_closes  # type: ignore[assignment,method-assign]

            with pytest.raises(hotplug.DetachTimeout, match="--force"):
                await hotplug.detach(c.dom0, stuck_vbd, grace=0.5)
            assert await c.dom0.read_text(f"{stuck_vbd.backend}/online") == "0"
            result = await hotplug.detach(c.dom0, stuck_vbd, grace=0.5, force=True)
            assert result.outcome == "forced"
            assert result.frontend_state == Connected  # it never moved
            await wait_tasks(c.backend, 1)  # only the other guest's device is left
            assert c.backend.dom.mapper.maps_in_use == other_maps  # the stuck one's unmapped
            other = c.guests[1].blk[other_vbd]
            await other.write(0, b"k" * BLOCK)
            assert await other.read(0, BLOCK) == b"k" * BLOCK


async def test_frontend_close_then_detach_then_attach_again(
    xenstored: Xenstored, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with cluster(xenstored, tmp_path) as c:
            vbd, guest = c.vbd(), c.guests[0]
            config = VbdConfig(image=str(tmp_path / "d.img"), size=1 << 20)
            await hotplug.attach_vbd(c.dom0, vbd, config)
            with pytest.raises(hotplug.HotplugError, match="already exists"):
                await hotplug.attach_vbd(c.dom0, vbd, config)
            await wait_attached(guest, vbd)
            first = guest.blk[vbd]
            await first.write(0, b"1" * BLOCK)
            await first.detach()  # the guest's driver unbinds: Closing → Closed both ends
            await wait_states(c.dom0, vbd, Closed, Closed)
            result = await hotplug.detach(c.dom0, vbd, grace=10)
            assert result.outcome == "closed"
            await wait_tasks(guest, 0)
            await hotplug.attach_vbd(c.dom0, vbd, config)
            await wait_attached(guest, vbd)
            second = guest.blk[vbd]
            assert second is not first
            await second.wait_connected()
            assert await second.read(0, BLOCK) == b"1" * BLOCK
            await wait_states(c.dom0, vbd, Connected, Connected)
            with pytest.raises(hotplug.HotplugError, match="no device"):
                await hotplug.detach(c.dom0, c.vbd(disk=5))


async def test_attach_detach_100_times_leaks_nothing(xenstored: Xenstored, tmp_path: Path) -> None:
    with trio.fail_after(400):
        async with cluster(xenstored, tmp_path) as c:
            guest = c.guests[0]
            be_dir = f"/local/domain/{c.backend.info.domid}/backend"
            fe_dir = f"/local/domain/{guest.info.domid}/device"

            async def snapshot() -> dict[str, object]:
                return {
                    **hv_counts(c.backend.dom, guest.dom),
                    "backend nodes": await count_nodes(c.dom0, be_dir),
                    "guest nodes": await count_nodes(c.dom0, fe_dir),
                    "tasks": task_names(),
                }

            async def attach_use_detach(round_: int) -> None:
                device = c.vbd() if round_ % 2 == 0 else c.vif()
                if device.cls == "vbd":
                    await hotplug.attach_vbd(c.dom0, device, VbdConfig(image=None, size=1 << 20))
                else:
                    await hotplug.attach_vif(c.dom0, device, mac="00:16:3e:00:01:01")
                await wait_attached(guest, device)
                if device.cls == "vbd":
                    disk = guest.blk[device]
                    await disk.write(0, pattern(round_))
                    assert await disk.read(0, BLOCK) == pattern(round_)
                else:
                    net = guest.net[device]
                    await net.wait_connected()
                    await net.send(FRAME)
                result = await hotplug.detach(c.dom0, device, grace=20)
                assert result.outcome == "closed", (round_, result)
                await wait_tasks(c.backend, 0)
                await wait_tasks(guest, 0)

            # The first device brings the guest↔backend link up (its tasks stay: one per
            # domain pair, not per device); count from there.
            await attach_use_detach(0)
            await attach_use_detach(1)
            baseline = await snapshot()
            for round_ in range(2, 102):
                await attach_use_detach(round_)
                assert await snapshot() == baseline, round_
