"""blkfront with blkback: read-only disks, capacity change, 4096-byte sectors, features off."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from backends.blkback import serve
from frontends.blkfront import BlkError, DeviceNotFound, attach
from tests.integration.blk_env import DEVICE, FEATURES_OFF, make_vbd, pair
from tests.integration.conftest import Xenstored
from xenpv.toolstack.devices import VbdConfig, create_vbd
from xenpv.xenbus.core import Closed, Connected
from xenpv.xenbus.handshake import read_state
from xenpv.xenbus.keys import XENPV_SIZE

MiB = 1 << 20


async def test_read_only_disk(tmp_path: Path, xenstored: Xenstored) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x07" * MiB)
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, "shm", 16384) as p:
            await create_vbd(p.xs, DEVICE, VbdConfig(image=str(image), size=MiB, read_only=True))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    assert front.info.read_only is True
                    assert await front.read(4096, 8192) == b"\x07" * 8192
                    with pytest.raises(BlkError, match="read-only"):
                        await front.write(0, b"x" * 512)
                    await front.flush()  # a no-op on a read-only disk
                nursery.cancel_scope.cancel()


async def test_capacity_change_and_features_off(tmp_path: Path, xenstored: Xenstored) -> None:
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, "socket", 65536) as p:
            await make_vbd(p.xs, image=str(tmp_path / "d.img"), size=MiB, features=FEATURES_OFF)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                # the 4 KiB baseline: ring order as configured (granules: test_blk_granule)
                async with attach(p.guest, p.xs, DEVICE, granule_order=0) as front:
                    await front.wait_connected()
                    info = front.info
                    assert ((info.flush_op is not None), info.discard, info.persistent) == (
                        False,
                        False,
                        False,
                    )
                    assert (info.indirect_segments, info.queues, info.ring_page_order) == (
                        0,
                        1,
                        0,
                    )
                    await front.flush()  # no flush support: completes without the backend
                    with pytest.raises(BlkError) as excinfo:
                        await front.discard(0, 4096)
                    assert excinfo.value.status == -2
                    with pytest.raises(BlkError, match="beyond the end"):
                        await front.write(MiB, b"y" * 512)
                    # the toolstack grows the disk: blkback re-writes Connected
                    await p.xs.write(f"{DEVICE.backend}/{XENPV_SIZE}", str(2 * MiB))
                    assert await front.wait_capacity_change() == 2 * MiB // 512
                    await front.write(MiB, b"y" * 65536)  # 64 KiB page: two linked requests
                    assert await front.read(MiB, 65536) == b"y" * 65536
                nursery.cancel_scope.cancel()


async def test_4096_byte_sectors(tmp_path: Path, xenstored: Xenstored) -> None:
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, "shm", 4096) as p:
            await make_vbd(p.xs, image=str(tmp_path / "d.img"), size=MiB, sector_size=4096)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    assert front.info.sector_size == 4096
                    with pytest.raises(BlkError, match="4096-byte sector"):
                        await front.read(512, 4096)
                    with pytest.raises(BlkError, match="4096-byte sector"):
                        await front.write(0, b"z" * 512)
                    await front.write(8192, b"z" * 12288)
                    assert await front.read(4096, 16384) == bytes(4096) + b"z" * 12288
                    await front.discard(8192, 4096)
                    assert await front.read(8192, 8192) == bytes(4096) + b"z" * 4096
                nursery.cancel_scope.cancel()


async def test_reattach_after_detach_and_after_a_crashed_frontend(
    tmp_path: Path, xenstored: Xenstored
) -> None:
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, "shm", 4096) as p:
            await make_vbd(p.xs, image=str(tmp_path / "d.img"), size=MiB)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.write(0, b"a" * 4096)
                assert await read_state(p.xs, DEVICE.frontend) == Closed  # a clean detach
                async with attach(p.guest, p.xs, DEVICE) as front:
                    assert await front.read(0, 4096) == b"a" * 4096
                    await front.write(4096, b"b" * 4096)
                # a guest driver that died while connected left its state behind
                await p.xs.write(f"{DEVICE.frontend}/state", str(int(Connected)))
                async with attach(p.guest, p.xs, DEVICE) as front:
                    assert await front.read(0, 8192) == b"a" * 4096 + b"b" * 4096
                nursery.cancel_scope.cancel()


async def test_attach_to_a_device_that_does_not_exist(tmp_path: Path, xenstored: Xenstored) -> None:
    with trio.fail_after(30):
        async with pair(tmp_path, xenstored.unix, "shm", 4096) as p:
            with pytest.raises(DeviceNotFound):
                async with attach(p.guest, p.xs, DEVICE):
                    pass
            assert await p.xs.try_read(DEVICE.frontend) is None  # nothing created
