"""`xenpv bench storage`: where should RawImage run its system calls?

Runs the same workloads against one image with each `IoPolicy` mode: "thread" (every
preadv/pwritev through `trio.to_thread.run_sync`), "inline" (every call on the trio thread)
and "auto" (the default: RWF_NOWAIT reads inline with a thread fallback, small writes inline).
"Cold" reads first drop the image's pages from the page cache with
posix_fadvise(DONTNEED) (only this file's pages), so they measure real device reads.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from backends.storage import IoPolicy, RawImage
from xenpv.bench.cli import SCRATCH_DIR, Bench, run_supervised
from xenpv.bench.report import emit

MiB = 1 << 20
MODES = ("thread", "inline", "auto")


BENCH = Bench(
    "storage", help="RawImage I/O: inline fast path vs worker threads", options=(SCRATCH_DIR,)
)


def run(args: argparse.Namespace) -> int:
    seconds = 0.3 if args.quick else 1.5
    image_mib = 64 if args.quick else 256
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        # No child processes; the supervisor makes a Ctrl-C exit 130 as every bench does.
        code, measured = run_supervised(
            lambda _sup: _bench_all(Path(tmp) / "bench.img", image_mib * MiB, seconds)
        )
    if measured is None:
        return code
    results = measured
    rows = []
    for mode, scenarios in results.items():
        for name, r in scenarios.items():
            rows.append([mode, name, r["iops"], r["mbps"], r["lat_us"]])
    summary = {
        name: {mode: results[mode][name]["iops"] for mode in MODES} for name in results["auto"]
    }
    emit(
        {"storage": results, "summary_iops": summary, "default_mode": "auto"},
        title="RawImage I/O by policy",
        columns=["mode", "workload", "IOPS", "MB/s", "mean latency µs"],
        rows=rows,
        notes=[f"image {image_mib} MiB, {seconds:.1f} s per workload; cold = page cache dropped"],
    )
    return 0


async def _bench_all(path: Path, size: int, seconds: float) -> dict[str, dict[str, Any]]:
    disk = RawImage(path, size=size, create=True)
    chunk = random.Random(0).randbytes(MiB)
    for off in range(0, size, MiB):  # real data, so that reads are not of holes
        await disk.write(off, [chunk])
    await disk.flush()
    await disk.close()
    results: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        disk = RawImage(path, policy=IoPolicy(mode=mode))  # type: ignore[arg-type]
        results[mode] = await _bench_mode(disk, size, seconds)
        await disk.close()
    return results


async def _bench_mode(disk: RawImage, size: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(1)
    blocks4k = size // 4096

    def rand4k() -> int:
        return rng.randrange(blocks4k) * 4096

    def rand64k() -> int:
        return rng.randrange(size // 65536) * 65536

    seq = iter(range(1 << 62))

    def seq1m() -> int:
        return (next(seq) * MiB) % size

    async def read(offset: int, buf: memoryview) -> None:
        await disk.readinto(offset, [buf])

    async def write(offset: int, buf: memoryview) -> None:
        await disk.write(offset, [buf])

    await disk.read(0, size)  # warm the page cache
    out["randread_4k_qd1"] = await _measure(read, rand4k, 4096, 1, seconds)
    out["randread_4k_qd32"] = await _measure(read, rand4k, 4096, 32, seconds)
    out["randwrite_4k_qd1"] = await _measure(write, rand4k, 4096, 1, seconds)
    out["randwrite_4k_qd32"] = await _measure(write, rand4k, 4096, 32, seconds)
    out["randread_64k_qd1"] = await _measure(read, rand64k, 65536, 1, seconds)
    out["randwrite_64k_qd1"] = await _measure(write, rand64k, 65536, 1, seconds)
    out["read_1m_qd1"] = await _measure(read, seq1m, MiB, 1, seconds)
    out["write_1m_qd1"] = await _measure(write, seq1m, MiB, 1, seconds)
    await disk.flush()
    os.posix_fadvise(disk.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(disk.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
    out["randread_4k_cold_qd32"] = await _measure(read, rand4k, 4096, 32, seconds)
    return out


async def _measure(
    op: Callable[[int, memoryview], Awaitable[None]],
    next_offset: Callable[[], int],
    size: int,
    depth: int,
    seconds: float,
) -> dict[str, float]:
    count = 0
    busy = 0.0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count, busy
        buf = memoryview(bytearray(random.randbytes(size)))
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await op(next_offset(), buf)
            busy += time.perf_counter() - start
            count += 1

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    return {
        "iops": count / elapsed,
        "mbps": count * size / elapsed / 1e6,
        "lat_us": busy / max(count, 1) * 1e6,
    }
