"""End to end: blkfront (guests of 4K/16K/64K pages) against blkback on a raw image file.

Random reads and writes of 512 B to 1 MiB at random (sector-aligned) offsets, every 512-byte
block tagged with the write that put it there, from several concurrent workers on disjoint
regions; then the image file is checked by an independent reader (plain open()/read()).
The feature combinations are pairwise (every pair of values of page size, indirect,
persistent, ring order, queues, sector size and transport appears in some case), not the
full product, to keep CI small.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio

from backends.blkback import serve
from frontends.blkfront import BlkError, attach
from tests.integration.blk_env import DEVICE, make_vbd, pair, read_image
from tests.integration.conftest import Xenstored
from xenpv.granule import blk_ring_geometry, page_order
from xenpv.toolstack.topology import VbdFeatures

DISK = 16 << 20
WORKERS = 4
REGION = DISK // WORKERS

# page size, indirect segments, persistent, ring order, queues, sector size, transport
CASES = [
    (4096, 0, False, 0, 1, 512, "socket"),
    (4096, 256, True, 4, 4, 4096, "shm"),
    (16384, 0, True, 4, 1, 4096, "socket"),
    (16384, 256, False, 0, 4, 512, "shm"),
    (65536, 0, False, 4, 4, 512, "shm"),
    (65536, 256, True, 0, 1, 512, "socket"),
    (65536, 256, False, 4, 1, 4096, "socket"),
    (4096, 0, True, 0, 1, 4096, "shm"),
    (16384, 256, True, 4, 4, 512, "socket"),
]
IDS = [
    f"p{c[0] // 1024}k-ind{c[1]}-{'pers' if c[2] else 'nopers'}-o{c[3]}-q{c[4]}-s{c[5]}-{c[6]}"
    for c in CASES
]
TAG = struct.Struct("<IIQ")  # worker, op number, byte offset: 16 bytes at the start of each block


def tagged(worker: int, op: int, offset: int, length: int, rng: random.Random) -> bytes:
    out = bytearray(rng.randbytes(length))
    for at in range(0, length, 512):
        TAG.pack_into(out, at, worker, op, offset + at)
    return bytes(out)


def pick(rng: random.Random, block: int, limit: int) -> int:
    size = rng.choice(
        [512, 4096, 8192, 45056, 65536, 131072, 1 << 20, rng.randrange(1, 2049) * 512]
    )
    return max(block, min(size, limit) // block * block)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_random_io_integrity(
    tmp_path: Path, xenstored: Xenstored, case: tuple[int, int, bool, int, int, int, str]
) -> None:
    page_size, indirect, persistent, order, queues, block, transport = case
    image = tmp_path / "disk.img"
    features = VbdFeatures(
        ring_page_order=order, queues=queues, indirect_segments=indirect, persistent=persistent
    )
    model = bytearray(DISK)
    with trio.fail_after(60):
        async with pair(tmp_path, xenstored.unix, transport, page_size) as p:
            await make_vbd(p.xs, image=str(image), size=DISK, sector_size=block, features=features)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, p.backend, p.xs, DEVICE)
                async with attach(p.guest, p.xs, DEVICE) as front:
                    await front.wait_connected()
                    info = front.info
                    assert info.sector_size == block and info.sectors == DISK // 512
                    # attach() picks the largest grant granule (docs/granule-extension.md):
                    # the ring holds at least one granule
                    granule_order = page_order(page_size)
                    ring = blk_ring_geometry(order, granule_order).ring_page_order
                    assert info.ring_page_order == ring and info.queues == queues
                    assert info.grant_size == page_size
                    assert info.indirect_segments == indirect and info.persistent == persistent

                    async def worker(w: int) -> None:
                        rng = random.Random(w * 1000 + page_size + block)
                        base = w * REGION
                        for op in range(12):
                            length = pick(rng, block, REGION)
                            offset = base + rng.randrange(0, (REGION - length) // block + 1) * block
                            if rng.random() < 0.6:
                                data = tagged(w, op, offset, length, rng)
                                await front.write(offset, data)
                                model[offset : offset + length] = data
                            else:
                                got = await front.read(offset, length)
                                assert got == bytes(model[offset : offset + length]), (
                                    w,
                                    op,
                                    offset,
                                    length,
                                )

                    async with trio.open_nursery() as workers:
                        for w in range(WORKERS):
                            workers.start_soon(worker, w)
                    await front.flush()
                    with pytest.raises(BlkError):
                        await front.read(DISK - block, 2 * block)
                nursery.cancel_scope.cancel()
    on_disk = read_image(image)
    assert len(on_disk) == DISK
    for at in range(0, DISK, 1 << 20):
        assert on_disk[at : at + (1 << 20)] == model[at : at + (1 << 20)], f"MiB {at >> 20} differs"


def test_cases_are_pairwise() -> None:
    """Every pair of values of two different features meets in at least one case."""
    values = [sorted({c[i] for c in CASES}, key=str) for i in range(7)]
    for i in range(7):
        for j in range(i + 1, 7):
            for a in values[i]:
                for b in values[j]:
                    assert any(c[i] == a and c[j] == b for c in CASES), (i, j, a, b)
