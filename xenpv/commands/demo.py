"""`xenpv demo`: the whole system in one go (DEFAULT_TOPOLOGY).

xenstored, one backend domain and three guests with 4 KiB, 16 KiB and 64 KiB pages, each a
separate process with a vbd and a vif. Once every device is Connected, the launcher asks every
guest for a self-test round (`xenpv.runtime.selftest`: verified block I/O on its vbd; an echo with
every other guest over the vifs) and reads the results back from xenstore, like everything
else it prints. Exit status 0 only if every check passed; any failure or Ctrl-C stops every
process it started. `--json`: one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

from xenpv.commands import args as types
from xenpv.commands.cluster import launch, print_status
from xenpv.commands.toolstack import request_round, summarize
from xenpv.toolstack import cluster, supervisor, topology
from xenpv.toolstack.progress import Progress
from xenpv.toolstack.status import ClusterStatus, read_status
from xenpv.toolstack.supervisor import Supervisor
from xenpv.xenstore.client import XenstoreClient

EXPECTED_PAGE_SIZES = (4096, 16384, 65536)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "demo", help="run the default cluster (4K/16K/64K guests) and check it end to end"
    )
    parser.add_argument("--json", action="store_true", help="JSON summary on stdout")
    types.add_state_dir(
        parser, help="keep sockets, logs, images here (default: a temporary directory)"
    )
    types.add_round_options(
        parser,
        timeout_help="seconds for each phase",
        block_help="bulk bytes each guest writes (4194304, 4M, ...)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    topo = topology.default_topology()
    main = functools.partial(_demo, topo, args)
    if args.state_dir is not None:
        state_dir = args.state_dir.resolve()
        return supervisor.run(functools.partial(main, state_dir=state_dir), Supervisor())
    return supervisor.run_in_temp_dir("xenpv-demo-", main, Supervisor())


async def _selftest(
    xs: XenstoreClient, running: cluster.Cluster, round_id: int, args: argparse.Namespace
) -> None:
    topo = running.topology
    peers = [{"name": vif.frontend, "mac": vif.mac} for vif in topo.vifs]
    request = {
        "round": round_id,
        "peers": peers,
        "block_bytes": args.block_bytes,
        "frames": args.frames,
        "timeout": args.timeout,
    }
    guests = [running.domids[g.name] for g in topo.guests]
    # A guest that does not report shows in the summary (selftest-<name>), not as an error.
    await request_round(xs, guests, request, args.timeout + 10)


def _summary(status: ClusterStatus, elapsed: float, topo: topology.Topology) -> dict[str, Any]:
    """`xenpv toolstack check`'s summary (toolstack.summarize), plus what the demo topology
    promises: the three guest page sizes, every device it declares, a report from each guest,
    and the round's throughput."""
    summary = summarize(status, elapsed)
    guests = [d for d in status.domains if d.name in {g.name for g in topo.guests}]
    sizes = sorted(d.page_size or 0 for d in guests)
    declared = len(topo.vbds) + len(topo.vifs)
    reported = {c.get("domain") for c in status.checks}
    checks: list[dict[str, Any]] = [
        {
            "name": "page-sizes",
            "ok": tuple(sizes) == EXPECTED_PAGE_SIZES,
            "detail": f"guest page sizes {sizes}",
        },
        {
            "name": "devices-declared",
            "ok": len(status.devices) == declared,
            "detail": f"{len(status.devices)} of {declared} declared devices",
        },
    ]
    checks.extend(
        {"name": f"selftest-{guest.name}", "ok": False, "detail": "no results reported"}
        for guest in guests
        if guest.name not in reported
    )
    checks.extend(summary["checks"])
    block = [c for c in status.checks if str(c.get("name", "")).startswith("block-")]
    net = [c for c in status.checks if str(c.get("name", "")).startswith("net-")]
    rtts = [float(c["rtt_ms"]) for c in net if c.get("rtt_ms") is not None]
    summary.update(
        guests=[{"name": d.name, "page_size": d.page_size, "domid": d.domid} for d in guests],
        checks=checks,
        devices=status.to_json()["devices"],
        throughput={
            "block_write_mib_s": round(sum(float(c.get("write_mib_s") or 0) for c in block), 2),
            "block_read_mib_s": round(sum(float(c.get("read_mib_s") or 0) for c in block), 2),
            "net_frames": sum(int(c.get("frames") or 0) for c in net),
            "net_bytes": sum(int(c.get("bytes") or 0) for c in net),
            "net_rtt_ms_mean": round(sum(rtts) / len(rtts), 3) if rtts else None,
        },
        ok=all(c.get("ok") is True for c in checks),
    )
    return summary


async def _demo(
    topo: topology.Topology, args: argparse.Namespace, sup: Supervisor, state_dir: Path
) -> int:
    start = time.monotonic()
    progress = Progress.for_terminal(quiet=args.json)
    try:
        async with launch(topo, state_dir, args, sup, progress=progress) as running:
            progress.show("self-test round: block I/O on every vbd, echo between the guests")
            await _selftest(running.xs, running, 1, args)
            status = await read_status(running.xs)
            progress.show("stopping the cluster")
    finally:
        progress.close()
    summary = _summary(status, time.monotonic() - start, topo)
    print_status(status, as_json=False)
    t = summary["throughput"]
    print(
        f"throughput: block write {t['block_write_mib_s']} MiB/s, read {t['block_read_mib_s']}"
        f" MiB/s (all guests); net {t['net_frames']} echoed frames, mean round trip"
        f" {t['net_rtt_ms_mean']} ms; {summary['elapsed_s']} s in all",
        file=sys.stderr,
    )
    failed = [c for c in summary["checks"] if c.get("ok") is not True]
    if failed:
        for c in failed:
            print(f"xenpv: check {c['name']} FAILED: {c.get('detail')}", file=sys.stderr)
    else:
        shown = {str(c.get("name")) for c in status.checks}
        more = [str(c["name"]) for c in summary["checks"] if str(c["name"]) not in shown]
        print(
            f"xenpv: demo passed: {len(summary['checks'])} checks (the {len(shown)} above"
            + (f"; {', '.join(more)})" if more else ")"),
            file=sys.stderr,
        )
    if args.json:
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0 if summary["ok"] else 1
