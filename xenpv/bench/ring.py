"""`xenpv bench ring`: blkif request/response cycles per second through a shared ring.

One cycle is what a 4 KiB read costs the ring layer on both sides, through the public API
drivers use: the front encodes a one-segment BLKIF_OP_READ, puts and pushes it; the back takes
and decodes it, encodes, puts and pushes the response; the front takes and decodes the
response; both sides run their RING_FINAL_CHECK when they find the ring empty. Both ends run in
this one process on one core, on a buffer whose `written` only counts ranges (the cost a
transport's bookkeeping adds is the transport benchmark's business).

Throughput is reported per CPU-second of this process (`time.process_time`), which is what
"on one core" means on a machine other work shares, and per wall-clock second.

"batched" keeps N requests in flight (put N, push once, drain, answer all, push once);
"one-at-a-time" does a single request per push, so every cycle pays the notify checks.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from xenpv.abi.blkif import (
    BLKIF_NATIVE,
    BLKIF_OP_READ,
    BLKIF_RSP_OKAY,
    BlkifProtocol,
    BlkifRequest,
    BlkifResponse,
    BlkifSegment,
)
from xenpv.abi.buffer import XEN_PAGE_SIZE
from xenpv.abi.ring import BackRing, FrontRing
from xenpv.bench.cli import Bench, option
from xenpv.bench.report import emit
from xenpv.commands import args as types

GOAL_CYCLES_PER_S = 250_000


class _CountingBuffer:
    """A SharedBuffer whose `written` just counts (LocalBuffer would keep every range)."""

    __slots__ = ("_view", "writes")

    def __init__(self, size: int) -> None:
        self._view = memoryview(bytearray(size))
        self.writes = 0

    @property
    def view(self) -> memoryview:
        return self._view

    def written(self, offset: int, length: int) -> None:
        self.writes += 1


BENCH = Bench(
    "ring",
    help="blkif 4K read request/response cycles per second through a shared ring",
    seconds=2.0,
    seconds_help="time per scenario",
    options=(
        option(
            "--batch",
            type=types.positive_int,
            default=32,
            help="requests in flight in the batched scenario",
        ),
        option(
            "--pages",
            type=types.int_range(1, 16),
            default=1,
            help="ring size in 4 KiB pages (1 page = 32 slots)",
        ),
    ),
)


def run(args: argparse.Namespace) -> int:
    seconds = 0.2 if args.quick else args.seconds
    results: dict[str, Any] = {}
    rows = []
    for name, batch in (("one-at-a-time", 1), ("batched", args.batch)):
        r = bench_cycles(BLKIF_NATIVE, batch=batch, pages=args.pages, seconds=seconds)
        results[name] = r
        rows.append(
            [
                name,
                batch,
                r["cycles_per_cpu_s"],
                r["cycles_per_s"],
                r["us_per_cycle"],
                r["notifies_per_cycle"],
            ]
        )
    best = max(r["cycles_per_cpu_s"] for r in results.values())
    emit(
        {
            "ring": results,
            "cycles_per_s": {name: r["cycles_per_s"] for name, r in results.items()},
            "cycles_per_cpu_s": {name: r["cycles_per_cpu_s"] for name, r in results.items()},
            "goal_cycles_per_s": GOAL_CYCLES_PER_S,
            "goal_met": best >= GOAL_CYCLES_PER_S,
        },
        title="blkif ring: 4 KiB read request/response cycles (one core)",
        columns=[
            "scenario",
            "in flight",
            "cycles/CPU s",
            "cycles/wall s",
            "CPU µs/cycle",
            "notifies/cycle",
        ],
        rows=rows,
        notes=[
            f"{args.pages}-page ring, {seconds:.1f} s per scenario, goal "
            f"{GOAL_CYCLES_PER_S:,} cycles per CPU-second (process time: a shared machine's "
            "other load does not count against the ring; wall-clock rate shown too)"
        ],
    )
    return 0


def bench_cycles(
    protocol: BlkifProtocol, *, batch: int, pages: int, seconds: float
) -> dict[str, Any]:
    """Run full cycles for about `seconds`; return throughput and notify counts."""
    buffer = _CountingBuffer(pages * XEN_PAGE_SIZE)
    front = FrontRing(buffer, protocol.ring_layout)
    back = BackRing(buffer, protocol.ring_layout)
    batch = max(1, min(batch, front.nr_ents))
    encode_req, decode_req = protocol.encode_request, protocol.decode_request
    encode_rsp, decode_rsp = protocol.encode_response, protocol.decode_response
    segment = (BlkifSegment(gref=8, first_sect=0, last_sect=7),)
    cycles = notifies = 0
    next_id = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    cpu_start = time.process_time()
    while True:
        # front: queue a batch of 4 KiB reads, one push
        for _ in range(batch):
            front.put_request(
                encode_req(BlkifRequest(BLKIF_OP_READ, next_id, next_id * 8, segment))
            )
            next_id += 1
        notifies += front.push_requests()
        # back: drain, decode, answer, one push, re-arm
        while True:
            for data in back.take_requests():
                request = decode_req(data)
                back.put_response(
                    encode_rsp(BlkifResponse(request.id, BLKIF_OP_READ, BLKIF_RSP_OKAY))
                )
            if not back.final_check_for_requests():
                break
        notifies += back.push_responses()
        # front: drain responses, re-arm
        while True:
            for data in front.take_responses():
                decode_rsp(data)
                cycles += 1
            if not front.final_check_for_responses():
                break
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return {
        "cycles": cycles,
        "seconds": round(elapsed, 3),
        "cpu_seconds": round(cpu, 3),
        "cycles_per_s": round(cycles / elapsed),
        "cycles_per_cpu_s": round(cycles / cpu),
        "us_per_cycle": round(cpu / cycles * 1e6, 3),
        "notifies_per_cycle": round(notifies / cycles, 3),
        "in_flight": batch,
        "ring_pages": pages,
        "written_ranges_per_cycle": round(buffer.writes / cycles, 2),
    }
