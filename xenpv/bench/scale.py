"""`xenpv bench scale --guests N`: N guests (a vbd and a vif each) on one backend domain.

Measures, through the real launcher (`xenpv.toolstack.cluster.launch`, domain processes from
the fork server unless `--start spawn`):
- seconds from the launch to every domain ready and every device Connected on both ends;
- a verified I/O on each device: one self-test round in which every guest writes and reads
  back its disk (`block-*` check) and echoes frames with the next guest through the
  backend's switch (`net-*` check, which exercises both guests' vifs);
- seconds to tear everything down (the launcher's ordered stop), and that no process and no
  socket is left;
- memory: RSS and USS (private pages, /proc/PID/smaps_rollup) per guest process and of the
  backend, xenstored's RSS and its node count (a walk of the tree).

The last line of stdout is JSON with at least `guests`, `connected`, `verified`,
`seconds_to_connected`, `seconds_to_teardown` and `guest_uss_mib`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import trio

from xenpv.bench.cli import Bench, option
from xenpv.bench.report import emit
from xenpv.commands import args as types
from xenpv.errors import UsageError
from xenpv.runtime.selftest import CHECKS, CONTROL_SELFTEST, SELFTEST_DONE
from xenpv.toolstack import cluster, supervisor
from xenpv.toolstack.supervisor import Child, Supervisor
from xenpv.toolstack.topology import (
    DomainSpec,
    Topology,
    VbdFeatures,
    VbdSpec,
    VifSpec,
    parse_size,
)
from xenpv.xenstore.client import XenstoreClient

PAGE_SIZES = (4096, 16384, 65536)
MiB = 1 << 20


BENCH = Bench(
    "scale",
    help="N guests (vbd + vif each) on one backend: start, verify, stop",
    quick_help="accepted (the size is --guests)",
    options=(
        option("--guests", type=types.positive_int, default=32, help="default 32"),
        option("--start", choices=("fork", "spawn"), default="fork", help="how domains start"),
        option("--timeout", type=types.positive_float, default=120.0, help="seconds to Connected"),
        option(
            "--page-sizes",
            default="4K,16K,64K",
            help="guest page sizes, used in turn (default 4K,16K,64K; a guest's drivers touch "
            "buffers in proportion: 4K alone for the largest runs)",
        ),
        option(
            "--small-rings",
            action="store_true",
            help="one queue, one-page rings, no indirect or persistent grants: less guest memory",
        ),
        option(
            "--group-size",
            type=types.positive_int,
            default=1,
            metavar="K",
            help="guests per process (topology `group`; default 1: one process per guest)",
        ),
    ),
)


def scale_topology(
    guests: int,
    start: str = "fork",
    group_size: int = 1,
    small_rings: bool = False,
    page_sizes: tuple[int, ...] = PAGE_SIZES,
) -> Topology:
    """One backend, `guests` guests with 4K/16K/64K pages in turn, a vbd and a vif each;
    with `group_size` > 1, that many guests per process; `small_rings`: vbds with the least
    the frontend must allocate (its buffers are guest memory the process touches)."""
    features = (
        VbdFeatures(ring_page_order=0, queues=1, indirect_segments=0, persistent=False)
        if small_rings
        else VbdFeatures()
    )
    domains = [DomainSpec("backend", "backend", 4096, 64 * MiB)]
    vbds, vifs = [], []
    for i in range(guests):
        name = f"guest{i}"
        group = f"g{i // group_size}" if group_size > 1 else None
        domains.append(
            DomainSpec(name, "guest", page_sizes[i % len(page_sizes)], 64 * MiB, group=group)
        )
        # in the backend's memory: keep it small
        vbds.append(VbdSpec(name, "backend", None, 1 * MiB, features=features))
        vifs.append(
            VifSpec(
                name, "backend", f"02:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            )
        )
    return Topology(tuple(domains), tuple(vbds), tuple(vifs), start=start)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    sizes = tuple(parse_size(v, "--page-sizes") for v in args.page_sizes.split(","))
    if any(size not in PAGE_SIZES for size in sizes):
        raise UsageError(f"--page-sizes: each one of 4K, 16K, 64K, got {args.page_sizes!r}")
    topo = scale_topology(args.guests, args.start, args.group_size, args.small_rings, sizes)
    result: dict[str, Any] = {}
    main = functools.partial(_bench, topo, args.timeout, result)
    code = supervisor.run_in_temp_dir("xenpv-scale-", main, Supervisor())
    rows = [[k, v] for k, v in result.items() if not isinstance(v, (dict, list))]
    emit(
        result,
        title=f"xenpv bench scale: {args.guests} guests",
        columns=("figure", "value"),
        rows=rows,
    )
    return code if result.get("ok") else 1


async def _bench(
    topo: Topology, limit_s: float, result: dict[str, Any], sup: Supervisor, state_dir: Path
) -> int:
    guests = [d.name for d in topo.guests]
    processes = len({d.group or d.name for d in topo.guests})
    result.update(guests=len(guests), guest_processes=processes, connected=0, verified=0)
    result["start"] = topo.start
    started = time.monotonic()
    async with cluster.launch(topo, state_dir, sup=sup, ready_timeout_s=limit_s) as running:
        result["seconds_to_connected"] = round(time.monotonic() - started, 2)
        result["connected"] = len(running.devices)
        result["verified"] = await _verify(running, guests, limit_s)
        result.update(_memory(running.children, len(guests)))
        result["xenstore_nodes"] = await _count_nodes(running.xs, "/")
        children = list(running.children)
        stopping = time.monotonic()
    result["seconds_to_teardown"] = round(time.monotonic() - stopping, 2)
    left = [c.name for c in children if c.running]
    files = _sockets(state_dir)
    result["left_processes"], result["left_sockets"] = left, files
    devices = 2 * len(guests)
    result["ok"] = result["verified"] == devices and not left and not files
    return 0


def _sockets(state_dir: Path) -> list[str]:
    return [p.name for p in state_dir.rglob("*.sock")]


async def _verify(running: cluster.Cluster, guests: list[str], limit_s: float) -> int:
    """One self-test round: each guest checks its disk and echoes with the next guest.
    Returns how many devices (vbds + vifs) were verified. One watch, O(guests) reads."""
    xs, domids = running.xs, running.domids
    mac = {vif.frontend: vif.mac for vif in running.topology.vifs}
    pending = {domids[g] for g in guests}
    async with xs.watch("/local/domain") as events:
        for i, name in enumerate(guests):
            peer = guests[(i + 1) % len(guests)]
            peers = [{"name": peer, "mac": mac[peer]}] if peer != name else []
            request = {"round": 1, "peers": peers, "block_bytes": 256 << 10, "frames": 4}
            request["timeout"] = max(10, int(limit_s / 2))
            await xs.write(f"/local/domain/{domids[name]}/{CONTROL_SELFTEST}", json.dumps(request))
        with trio.move_on_after(limit_s):
            async for path, _token in events:
                if not path.endswith(SELFTEST_DONE):
                    continue
                domid = int(path.split("/")[3])
                if domid in pending and await xs.try_read(path) == b"1":
                    pending.discard(domid)
                if not pending:
                    break
    block_ok: set[str] = set()
    net_ok: set[str] = set()
    for name in guests:
        base = f"/local/domain/{domids[name]}/{CHECKS}"
        for check in await xs.try_directory(base):
            raw = await xs.try_read(f"{base}/{check}")
            if raw is None or not json.loads(raw).get("ok"):
                continue
            if check.startswith("block-"):
                block_ok.add(name)
            elif check.startswith("net-"):
                net_ok.add(name)  # this guest's vif sent and received
    return len(block_ok) + len(net_ok)


def _smaps(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB from /proc/PID/smaps_rollup (0, 0 if it is gone)."""
    fields: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0, 0.0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            fields[parts[0].rstrip(":")] = int(parts[1])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return round(fields.get("Rss", 0) / 1024, 1), round(uss / 1024, 1)


def _memory(children: list[Child], guest_count: int) -> dict[str, Any]:
    """Per guest: the guest processes' memory shared out over the guests they run."""
    per_process = [_smaps(c.pid) for c in children if c.kind == "guest"]
    share = len(per_process) / guest_count if guest_count else 1.0
    guests = [(r * share, u * share) for r, u in per_process]
    backend = [_smaps(c.pid) for c in children if c.kind == "backend"]
    store = [_smaps(c.pid) for c in children if c.kind == "xenstored"]
    return {
        "guest_rss_mib": round(statistics.mean(r for r, _ in guests), 1) if guests else 0,
        "guest_uss_mib": round(statistics.mean(u for _, u in guests), 1) if guests else 0,
        "guest_uss_max_mib": round(max((u for _, u in guests), default=0), 1),
        "backend_rss_mib": backend[0][0] if backend else 0,
        "backend_uss_mib": backend[0][1] if backend else 0,
        "xenstored_rss_mib": store[0][0] if store else 0,
    }


async def _count_nodes(xs: XenstoreClient, path: str) -> int:
    count = 1
    for child in await xs.try_directory(path):
        count += await _count_nodes(xs, f"{path.rstrip('/')}/{child}")
    return count
