"""blkfront over real xenstored and two domains, against a small stub backend (blk_stub.py):
I/O on both transports and guest page sizes, backend restart with re-issue, and recovery from
a backend that answers a request nobody issued."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

from frontends.blkfront import BlkError, attach
from tests.integration.blk_env import DEVICE, pair
from tests.integration.blk_stub import StubBackend
from tests.integration.conftest import Xenstored
from xenpv.toolstack.devices import VbdConfig, create_vbd
from xenpv.xenbus.handshake import run_handshake

DISK = 4 << 20


async def start_stub(nursery: trio.Nursery, stub: StubBackend) -> trio.CancelScope:
    scope = trio.CancelScope()
    stub.nursery = nursery

    async def run() -> None:
        with scope:
            await run_handshake(stub.xs, stub)

    nursery.start_soon(run)
    return scope


@pytest.mark.parametrize("page_size", [4096, 65536])
async def test_io_against_stub(
    tmp_path: Path, xenstored: Xenstored, transport: str, page_size: int
) -> None:
    rng = random.Random(page_size)
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, transport, page_size) as p:
            await create_vbd(p.xs, DEVICE, VbdConfig(image=None, size=DISK))
            disk = bytearray(DISK)
            async with trio.open_nursery() as nursery:
                stub = StubBackend(p.backend, p.xs, DEVICE, disk, order=2, queues=2, indirect=32)
                await start_stub(nursery, stub)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    info = front.info
                    assert (info.sectors, info.ring_page_order, info.queues) == (
                        DISK // 512,
                        2,
                        2,
                    )
                    assert (info.indirect_segments, info.persistent, info.grant_size) == (
                        32,
                        True,
                        4096,
                    )
                    assert info.protocol.name == ("x86_64-abi" if page_size == 4096 else "arm-abi")
                    data = rng.randbytes(300 * 1024)
                    await front.write(512 * 7, data)
                    assert disk[512 * 7 : 512 * 7 + len(data)] == data
                    assert await front.read(512 * 7, len(data)) == data
                    await front.flush()
                    await front.discard(512 * 7, 4096)
                    assert disk[512 * 7 : 512 * 7 + 4096] == bytes(4096)
                    with pytest.raises(BlkError):
                        await front.read(DISK, 512)
                    with pytest.raises(BlkError):
                        await front.write(100, b"x" * 512)
                nursery.cancel_scope.cancel()


async def test_backend_restart_reissues_unfinished_requests(
    tmp_path: Path, xenstored: Xenstored, transport: str
) -> None:
    rng = random.Random(5)
    with trio.fail_after(60):
        async with pair(tmp_path, xenstored.unix, transport, 16384) as p:
            await create_vbd(p.xs, DEVICE, VbdConfig(image=None, size=DISK))
            disk = bytearray(DISK)
            async with trio.open_nursery() as nursery:
                stub = StubBackend(p.backend, p.xs, DEVICE, disk, order=4, queues=4, indirect=256)
                scope = await start_stub(nursery, stub)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    acked: dict[int, bytes] = {}
                    half = trio.Event()

                    async def writer(slot: int) -> None:
                        for i in range(8):
                            data = rng.randbytes(rng.choice([512, 4096, 16384, 32768]))
                            offset = slot * (DISK // 16) + i * 32768
                            await front.write(offset, data)
                            acked[offset] = data
                            if len(acked) == 40:
                                half.set()

                    async with trio.open_nursery() as writers:
                        for slot in range(16):
                            writers.start_soon(writer, slot)
                        await half.wait()
                        # The backend dies (its tasks stop, mappings and ports go away) and a
                        # new one takes the device over with fewer features.
                        scope.cancel()
                        await stub._stop()
                        stub = StubBackend(
                            p.backend,
                            p.xs,
                            DEVICE,
                            disk,
                            order=0,
                            queues=1,
                            indirect=0,
                            persistent=False,
                        )
                        await start_stub(nursery, stub)
                    assert len(acked) == 128
                    for offset, data in acked.items():
                        assert disk[offset : offset + len(data)] == data
                    assert front.connections == 2
                    assert (
                        front.info.queues,
                        front.info.indirect_segments,
                        front.info.persistent,
                    ) == (1, 0, False)
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("transport", "fault", "offset", "connections"),
    [
        ("shm", "bogus_id", 0, 2),  # the first answer is bogus: the write is re-issued
        ("socket", "bad_sectors", 4096, 1),  # the write waits for the second connection
    ],
    ids=["bogus-response-id", "unusable-device-keys"],
)
async def test_misbehaving_backend_closes_and_recovers(
    tmp_path: Path, xenstored: Xenstored, transport: str, fault: str, offset: int, connections: int
) -> None:
    data = b"\x42" * 4096
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, transport, 4096) as p:
            await create_vbd(p.xs, DEVICE, VbdConfig(image=None, size=DISK))
            disk = bytearray(DISK)
            async with trio.open_nursery() as nursery:
                stub = StubBackend(p.backend, p.xs, DEVICE, disk, **{fault: True})
                await start_stub(nursery, stub)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.write(offset, data)
                    assert disk[offset : offset + 4096] == data
                    assert front.connections == connections
                    assert front.info.sectors == DISK // 512
                nursery.cancel_scope.cancel()
