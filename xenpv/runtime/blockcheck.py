"""The verified block check every guest workload shares.

Data whose every sector starts with a tag naming its writer and byte offset (`tagged`; the
rest is seeded pseudo-random) is written at awkward offsets (unaligned to pages, crossing page
and segment boundaries), then in a bulk run of concurrent chunks; the cache is flushed;
everything is read back and compared; then a chunk in the middle of the bulk run is discarded
and the data on both sides of it must be intact. What was negotiated decides nothing here: the
caller turns `BlockCheckResult` into its own report.
"""

from __future__ import annotations

import functools
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront


def awkward_extents(sector: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: the first sector; 12 KiB from sector 3 (unaligned, across a
    4 KiB page and several segments); two sectors across the 64 KiB line."""
    return [(0, sector), (3 * sector, 12 << 10), ((64 << 10) - sector, 2 * sector)]


BULK_BASE = 1 << 20
BULK_CONCURRENCY = 4
Discard = Literal["require", "if-offered", "skip"]


def tagged(tag: str, offset: int, length: int, sector: int, seed: int) -> bytes:
    """Data for [offset, offset+length): each sector starts with `tag@offset`, then noise."""
    rng = random.Random(seed ^ offset)
    out = bytearray(rng.randbytes(length))
    for at in range(0, length, sector):
        label = f"{tag}@{offset + at}|".encode()[:sector]
        out[at : at + len(label)] = label
    return bytes(out)


@dataclass(frozen=True, slots=True)
class BlockCheckPlan:
    """What to write. `extents`: the awkward (offset, length) pairs for the disk's sector
    size; `bulk_bytes` (rounded down to whole `chunk`s, capped by the disk) starts at 1 MiB
    or half the disk, whichever is less. `discard`: whether the backend must offer it."""

    tag: str
    bulk_bytes: int
    chunk: int = 128 << 10
    extents: Callable[[int], list[tuple[int, int]]] = awkward_extents
    discard: Discard = "require"


@dataclass(slots=True)
class BlockCheckResult:
    """What the check did and saw. `error` is set when it failed; throughput figures are
    for the bulk run alone."""

    info: dict[str, object]
    extents: int = 0
    bulk_bytes: int = 0
    write_s: float = 0.0  # the bulk writes
    flush_s: float = 0.0
    read_s: float = 0.0  # reading the bulk run back
    discarded: bool = False
    error: str | None = None
    mismatches: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


async def check_block(disk: Blkfront, plan: BlockCheckPlan) -> BlockCheckResult:
    """Run the check on a connected-or-connecting `disk`. Driver errors propagate."""
    await disk.wait_connected()
    info = dict(disk.info)
    result = BlockCheckResult(info)
    sector = int(info["sector_size"])
    capacity = int(disk.capacity)
    seed = secrets.randbits(32)
    small = [(off, n) for off, n in plan.extents(sector) if off + n <= capacity]
    bulk_base = min(BULK_BASE, capacity // 2)
    bulk_bytes = max(0, min(plan.bulk_bytes, capacity - bulk_base))
    bulk_bytes -= bulk_bytes % plan.chunk
    chunks = [(bulk_base + at, plan.chunk) for at in range(0, bulk_bytes, plan.chunk)]
    result.extents, result.bulk_bytes = len(small) + len(chunks), bulk_bytes

    def data(off: int, n: int) -> bytes:
        return tagged(plan.tag, off, n, sector, seed)

    for off, n in small:
        await disk.write(off, data(off, n))
    result.write_s = await _concurrently(
        [functools.partial(disk.write, o, data(o, n)) for o, n in chunks]
    )
    start = trio.current_time()
    await disk.flush()
    result.flush_s = trio.current_time() - start

    async def verify(off: int, n: int) -> None:
        if await disk.read(off, n) != data(off, n):
            result.mismatches.append(off)

    for off, n in small:
        await verify(off, n)
    result.read_s = await _concurrently([functools.partial(verify, o, n) for o, n in chunks])
    if result.mismatches:
        result.error = f"read back differs at offsets {sorted(result.mismatches)[:4]}"
        return result

    if plan.discard == "skip" or (plan.discard == "if-offered" and not info.get("discard")):
        return result
    if not info.get("discard"):
        result.error = "the backend did not offer discard"
        return result
    if chunks:
        first, length = chunks[len(chunks) // 2]
        await disk.discard(first, length)
        for off, n in (chunks[len(chunks) // 2 - 1], chunks[-1]):
            if off != first:
                await verify(off, n)
        if result.mismatches:
            result.error = f"data next to a discarded range changed at {result.mismatches}"
            return result
    result.discarded = True
    return result


async def _concurrently(jobs: list[Callable[[], Awaitable[None]]]) -> float:
    """Run the zero-argument coroutine functions `jobs`, BULK_CONCURRENCY at a time; the
    seconds it took."""
    limit = trio.CapacityLimiter(BULK_CONCURRENCY)
    start = trio.current_time()

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with limit:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    return trio.current_time() - start
