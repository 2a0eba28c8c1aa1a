"""blkback with the real blkfront: what the frontend negotiates is what the toolstack
configured, and a backend restarted under load loses no acknowledged write."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from backends.blkback import BlkbackDevice
from frontends.blkfront import BlkError, attach
from tests.integration.blk_env import (
    DEVICE,
    FEATURES_OFF,
    QuarterWriters,
    make_vbd,
    pair,
    start_backend,
)
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import domains
from tests.integration.test_blkback import MiniFront, read_image, wait_backend
from xenpv.toolstack.devices import VbdConfig, create_vbd
from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus.core import Closing, DeviceId
from xenpv.xenstore.client import connect

# (features, sector size, read-only, transport): each combination once, transports alternating
CONFIGS = [
    (VbdFeatures(), 512, False, "shm"),
    (
        FEATURES_OFF,
        4096,
        False,
        "socket",
    ),
    (VbdFeatures(ring_page_order=2, queues=2, indirect_segments=32), 512, True, "shm"),
    (VbdFeatures(queues=1, persistent=False), 4096, False, "socket"),
]


@pytest.mark.parametrize(("features", "sector_size", "read_only", "transport"), CONFIGS)
async def test_blkfront_negotiates_what_was_configured(
    xenstored: Xenstored,
    xs_workdir: Path,
    transport: str,
    features: VbdFeatures,
    sector_size: int,
    read_only: bool,
) -> None:
    image = xs_workdir / "disk.img"
    image.write_bytes(bytes(4 << 20))
    with trio.fail_after(30):
        async with pair(xs_workdir, xenstored.unix, transport, 16384, guest_memory=32 << 20) as p:
            await make_vbd(
                p.xs,
                image=str(image),
                size=4 << 20,
                sector_size=sector_size,
                features=features,
            )
            if read_only:
                await p.xs.write(f"{DEVICE.backend}/mode", "r")
            async with trio.open_nursery() as nursery:
                start_backend(nursery, p)
                # the 4 KiB baseline: ring order as configured (granules: test_blk_granule)
                async with attach(p.guest, p.xs, DEVICE, granule_order=0) as front:
                    await front.wait_connected()
                    info = front.info
                    assert info.sectors == (4 << 20) // 512
                    assert info.sector_size == sector_size
                    assert info.ring_page_order == features.ring_page_order
                    assert info.queues == features.queues
                    assert info.indirect_segments == features.indirect_segments
                    assert info.persistent == features.persistent
                    assert (info.flush_op is not None) == (features.flush and not read_only)
                    assert info.discard == (features.discard and not read_only)
                    assert info.read_only == read_only
                    data = random.Random(1).randbytes(256 * 1024)
                    if read_only:
                        with pytest.raises(BlkError):
                            await front.write(0, data)
                        assert await front.read(8192, 4096) == bytes(4096)
                    else:
                        await front.write(8192, data)
                        assert await front.read(8192, len(data)) == data
                        if features.flush:
                            await front.flush()
                        assert read_image(image, 8192, len(data)) == data
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["socket", "shm"])
async def test_backend_restart_under_load(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    """The backend task is cancelled mid-stream and a new one serves the device: blkfront
    re-issues what was in flight; every acknowledged write is in the image."""
    image = xs_workdir / "disk.img"
    size = 4 << 20
    model = bytearray(size)
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, transport, 4096, guest_memory=32 << 20) as p:
            await make_vbd(
                p.xs, image=str(image), size=size, features=VbdFeatures(ring_page_order=1)
            )
            async with trio.open_nursery() as nursery:  # outlives the frontend: clean detach
                first = start_backend(nursery, p)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    writers = QuarterWriters(front, model, [512, 4096, 65536], marks=(20, 60))
                    await front.wait_connected()
                    async with trio.open_nursery() as writing:
                        writers.start(writing)
                        await writers.reached(20)
                        first.cancel()  # the backend goes away with writes in flight
                        start_backend(nursery, p)
                        await writers.reached(60)
                        writers.stop()
                    assert front.connections >= 2
                    assert await front.read(0, size) == bytes(model)
                nursery.cancel_scope.cancel()
    assert read_image(image, 0, size) == bytes(model)


@pytest.mark.parametrize("transport", ["socket", "shm"])
async def test_blkfront_unaffected_by_hostile_neighbour(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    """A blkfront guest keeps its I/O going while another guest of the same backend domain
    sends garbage and then breaks its ring."""
    hostile_dev = DeviceId("vbd", frontend_domid=2, backend_domid=0, devid=51712)
    with trio.fail_after(60):
        async with (
            connect(xenstored.unix) as xs,
            domains(xs_workdir, transport, "unix", (0, 1, 2)) as (dom0, dom1, dom2),
        ):
            await create_vbd(xs, DEVICE, VbdConfig(None, 4 << 20))
            await create_vbd(xs, hostile_dev, VbdConfig(None, 1 << 20))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(BlkbackDevice(dom0, xs, DEVICE).run)
                hostile_backend = BlkbackDevice(dom0, xs, hostile_dev)
                nursery.start_soon(hostile_backend.run)
                async with attach(dom1, xs, DEVICE) as front:
                    await front.wait_connected()
                    rounds = 0
                    target = 10**9
                    reached = trio.Event()
                    stop = trio.Event()

                    async def honest() -> None:
                        nonlocal rounds
                        rng = random.Random(3)
                        while not stop.is_set():
                            offset = rng.randrange(0, 1000) * 4096
                            data = rng.randbytes(rng.choice([512, 4096, 65536]))
                            await front.write(offset, data)
                            assert await front.read(offset, len(data)) == data
                            rounds += 1
                            if rounds >= target:
                                reached.set()

                    async with trio.open_nursery() as guests:
                        guests.start_soon(honest)
                        bad = MiniFront(dom2, xs, hostile_dev, npages=4)
                        await bad.start()
                        garbage = [  # unknown ops, each with its own id at offset 8
                            bytes([op]) + bytes(7) + bad.next_id().to_bytes(8, "little")
                            for op in (4, 7, 99, 255)
                        ]
                        garbage = [slot.ljust(112, b"\0") for slot in garbage]
                        assert [r.status for r in await bad.run(garbage)] == [-2] * 4
                        q = bad.queues[0]
                        struct.pack_into("<I", q.buffer.view, 0, q.ring.req_prod_pvt + 999)
                        q.buffer.written(0, 4)
                        q.channel.notify()
                        assert await wait_backend(xs, hostile_dev, Closing) == Closing
                        assert hostile_backend.broken is not None
                        target = rounds + 5
                        await reached.wait()  # the honest guest kept going
                        stop.set()
                nursery.cancel_scope.cancel()
