"""Grant granules end to end (docs/granule-extension.md): real blkback and blkfront, real
xenstored, two domains, both transports.

Every mix of the extension (old frontend, old backend, 64 KiB guest with a 4 KiB-page
backend domain and the reverse, 16 KiB guest, the backend's maximum bounding the order),
with the order both ends state in xenstore and data verified through the image file; an
order above the backend's maximum (fatal, with the reason recorded); and a backend restart
(with a smaller maximum) under writes, whose re-issued requests use the new granule.
"""

from __future__ import annotations

import dataclasses
import random
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from backends.blkback import serve
from frontends.blkfront import attach
from tests.integration.blk_env import (
    DEVICE,
    Pair,
    QuarterWriters,
    make_vbd,
    pair,
    read_image,
    start_backend,
)
from tests.integration.conftest import Xenstored
from xenpv import granule
from xenpv.toolstack.topology import VbdFeatures
from xenpv.xenbus import core as xenbus
from xenpv.xenbus.handshake import read_state
from xenpv.xenbus.keys import XENPV_MAX_GRANULE_ORDER
from xenpv.xenstore.client import XenstoreClient

DISK = 8 << 20


def domains(
    tmp: Path, xs_address: str, transport: str, guest_page: int, backend_page: int
) -> AbstractAsyncContextManager[Pair]:
    """blk_env.pair with a chosen backend page size too, 64 MiB for each domain."""
    return pair(
        tmp,
        xs_address,
        transport,
        guest_page,
        backend_page=backend_page,
        guest_memory=64 << 20,
        backend_memory=64 << 20,
    )


async def key(xs: XenstoreClient, path: str) -> str | None:
    raw = await xs.try_read(path)
    return None if raw is None else raw.decode()


async def wait_state(xs: XenstoreClient, directory: str, state: xenbus.XenbusState) -> None:
    async with xs.watch(f"{directory}/state") as events:
        async for _ in events:
            if await read_state(xs, directory) == state:
                return


# guest page, backend page, backend max, frontend cap, expected order, features
MIXES = [
    (65536, 4096, 4, None, 4, VbdFeatures(indirect_segments=256, persistent=False)),
    (65536, 4096, 4, None, 4, VbdFeatures(indirect_segments=0, persistent=True)),
    (4096, 65536, 4, None, 0, VbdFeatures()),  # 4 KiB guest, 64 KiB-page backend
    (16384, 4096, 4, None, 2, VbdFeatures(ring_page_order=0, queues=2)),
    (65536, 16384, 2, None, 2, VbdFeatures(persistent=False)),  # the backend's max bounds it
    (65536, 4096, 0, None, 0, VbdFeatures()),  # old backend (max 0)
    (65536, 65536, 4, 0, 0, VbdFeatures(indirect_segments=0)),  # old frontend (declines)
]
MIX_IDS = [
    f"g{m[0] >> 10}k-b{m[1] >> 10}k-max{m[2]}-cap{m[3]}-ind{m[5].indirect_segments}"
    f"-{'pers' if m[5].persistent else 'nopers'}"
    for m in MIXES
]


@pytest.mark.parametrize("mix", MIXES, ids=MIX_IDS)
async def test_every_mix_agrees_and_keeps_data(
    tmp_path: Path,
    xenstored: Xenstored,
    transport: str,
    mix: tuple[int, int, int, int | None, int, VbdFeatures],
) -> None:
    guest_page, backend_page, backend_max, cap, order, features = mix
    image = tmp_path / "disk.img"
    rng = random.Random(guest_page + backend_max)
    model = bytearray(DISK)
    with trio.fail_after(60):
        async with domains(tmp_path, xenstored.unix, transport, guest_page, backend_page) as p:
            features = dataclasses.replace(features, max_granule_order=backend_max)
            await make_vbd(p.xs, image=str(image), size=DISK, features=features)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                async with attach(p.guest, p.xs, DEVICE, granule_order=cap) as front:
                    await front.wait_connected()
                    info = front.info
                    assert (info.granule_order, info.grant_size) == (
                        order,
                        granule.granule_size(order),
                    )
                    ring = granule.blk_ring_geometry(features.ring_page_order, order)
                    assert info.ring_page_order == ring.ring_page_order
                    # both ends state what was agreed
                    be, fe = DEVICE.backend, DEVICE.frontend
                    assert await key(p.xs, f"{be}/{granule.BACKEND_MAX_KEY}") == str(backend_max)
                    assert await key(p.xs, f"{fe}/{granule.FRONTEND_KEY}") == str(order)
                    assert await key(p.xs, f"{be}/{granule.FRONTEND_KEY}") == str(order)
                    # data: whole granules, pieces inside one, and ranges straddling them
                    spans = [(0, 1 << 20), (65536, 65536), (3 * 512, 12 << 10)]
                    spans += [((1 << 20) + 7 * 512, 65 << 10), ((2 << 20) - 512, 130 << 10)]
                    for offset, length in spans:
                        data = rng.randbytes(length)
                        await front.write(offset, data)
                        model[offset : offset + length] = data
                    for offset, length in [*spans, (0, 3 << 20)]:
                        got = await front.read(offset, length)
                        assert got == bytes(model[offset : offset + length]), (offset, length)
                    await front.flush()
                nursery.cancel_scope.cancel()
    assert read_image(image)[: 3 << 20] == bytes(model[: 3 << 20])


async def test_order_above_the_backends_maximum_is_fatal(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """A frontend (written by hand here: blkfront never does it) that uses 64 KiB granules
    with a backend whose maximum is 2: the backend records why and closes; no guessing."""
    with trio.fail_after(30):
        async with domains(tmp_path, xenstored.unix, transport, 65536, 4096) as p:
            await make_vbd(p.xs, size=1 << 20, features=VbdFeatures(max_granule_order=2))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                await wait_state(p.xs, DEVICE.backend, xenbus.InitWait)
                ring = p.guest.alloc_buffer(16)
                gref = p.guest.grants.grant_access(0, ring.frame, order=4)
                channel = await p.guest.alloc_unbound(0)
                fe = DEVICE.frontend
                for name, value in {
                    "ring-page-order": "4",
                    "ring-ref": str(gref),
                    "event-channel": str(channel.port),
                    "protocol": "arm-abi",
                    granule.FRONTEND_KEY: "4",
                    "state": str(int(xenbus.Initialised)),
                }.items():
                    await p.xs.write(f"{fe}/{name}", value)
                await wait_state(p.xs, DEVICE.backend, xenbus.Closing)
                want = "grant-granule-order 4 exceeds max-grant-granule-order 2"
                assert await key(p.xs, f"{DEVICE.backend}/error") == want
                linux = f"/local/domain/0/error/backend/vbd/1/{DEVICE.devid}/error"
                assert await key(p.xs, linux) == want
                assert await key(p.xs, f"{DEVICE.backend}/{granule.FRONTEND_KEY}") is None
                channel.close()
                nursery.cancel_scope.cancel()


async def test_backend_restart_reissues_with_the_new_granule(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    """A 64 KiB guest writes with 64 KiB granules; the backend dies with writes in flight and
    a new one (maximum now 2) takes over: the unfinished requests are re-issued as 16 KiB
    granules and every acknowledged write is in the image."""
    image = tmp_path / "disk.img"
    size = 4 << 20
    model = bytearray(size)
    with trio.fail_after(60):
        async with domains(tmp_path, xenstored.unix, transport, 65536, 4096) as p:
            await make_vbd(p.xs, image=str(image), size=size, features=VbdFeatures())
            async with trio.open_nursery() as nursery:
                first = start_backend(nursery, p)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    assert front.info.granule_order == 4
                    writers = QuarterWriters(
                        front, model, [512, 4096, 65536, 256 << 10], marks=(20, 60)
                    )
                    async with trio.open_nursery() as writing:
                        writers.start(writing)
                        await writers.reached(20)
                        first.cancel()  # the backend goes away with writes in flight
                        await p.xs.write(f"{DEVICE.backend}/{XENPV_MAX_GRANULE_ORDER}", "2")
                        start_backend(nursery, p)
                        await writers.reached(60)
                        writers.stop()
                    assert front.connections >= 2
                    assert front.engine.reissued > 0  # writes were in flight at the restart
                    assert (front.info.granule_order, front.info.grant_size) == (2, 16384)
                    assert await key(p.xs, f"{DEVICE.backend}/{granule.FRONTEND_KEY}") == "2"
                    assert await front.read(0, size) == bytes(model)
                nursery.cancel_scope.cancel()
    assert read_image(image)[:size] == bytes(model)
