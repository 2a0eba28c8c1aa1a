"""`xenpv cluster up|status|down`: the local launcher for any topology file
(`xenpv.toolstack.cluster`).

    xenpv cluster up FILE [--state-dir DIR] [--detach] [--timeout S] [--json]
    xenpv cluster status [--state-dir DIR] [--json]
    xenpv cluster down [--state-dir DIR]

`up` prints the status once every device is Connected; in the foreground it then runs until
Ctrl-C or SIGTERM (or until a domain process dies: exit 1) and stops everything it started;
with `--detach` it returns and leaves the processes running (pids in DIR/cluster.json).
`status` reads everything from xenstore. Human output goes to stderr (rich tables), `--json`
prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from xenpv.commands.xenstored import _first_xenpv_error
from xenpv.toolstack import cluster, topology
from xenpv.toolstack.cluster import ClusterError
from xenpv.toolstack.status import ClusterStatus, read_status, render
from xenpv.xenstore.client import connect

DEFAULT_STATE_DIR = ".xenpv"


def state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("XENPV_STATE_DIR", DEFAULT_STATE_DIR)),
        help="sockets, keys, logs, images, pids (default: $XENPV_STATE_DIR or ./.xenpv)",
    )


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "cluster", help="start, inspect and stop a local cluster from a topology file"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start xenstored, the domains and their devices")
    up.add_argument("file", type=Path, help="topology file (TOML)")
    state_dir_arg(up)
    up.add_argument("--detach", action="store_true", help="leave the cluster running")
    up.add_argument(
        "--timeout", type=float, default=cluster.DEFAULT_TIMEOUT, help="seconds to get ready"
    )
    up.add_argument("--json", action="store_true", help="print the status as JSON on stdout")
    up.set_defaults(run=run_up)
    status = actions.add_parser("status", help="show domains and devices (from xenstore)")
    state_dir_arg(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=run_status)
    down = actions.add_parser("down", help="stop a detached cluster")
    state_dir_arg(down)
    down.set_defaults(run=run_down)


def print_status(
    status: ClusterStatus, *, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    if as_json:
        sys.stdout.write(json.dumps(status.to_json() | (extra or {}), sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    console = Console(file=sys.stderr, width=None if sys.stderr.isatty() else 132)
    for table in render(status):
        console.print(table)


def run_up(args: argparse.Namespace) -> int:
    topo = topology.load(args.file)
    try:
        return trio.run(_up, topo, args.state_dir.resolve(), args)
    except BaseExceptionGroup as group:
        first = _first_xenpv_error(group)
        if first is None:
            raise
        raise first from None


async def _up(topo: topology.Topology, state_dir: Path, args: argparse.Namespace) -> int:
    # The receiver is open from the start: a signal during start-up or after it stops the
    # cluster through `launch`'s exit (guests, backends, xenstored), never half-way.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _signum in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with cluster.launch(
                topo,
                state_dir,
                detach=args.detach,
                ready_timeout_s=args.timeout,
                log_level=args.log_level,
            ) as running:
                status = await read_status(running.xs)
                print_status(status, as_json=args.json, extra={"state_dir": str(state_dir)})
                if args.detach:
                    down = f"xenpv cluster down --state-dir {state_dir}"
                    print(f"xenpv: cluster running; stop it with: {down}", file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return 0
                print("xenpv: cluster running; Ctrl-C stops it", file=sys.stderr)
                await trio.sleep_forever()
    print("xenpv: cluster stopped", file=sys.stderr)
    return 0


def run_status(args: argparse.Namespace) -> int:
    address = cluster.xenstore_address(args.state_dir)

    async def main() -> ClusterStatus:
        try:
            async with connect(address, reconnect_timeout=1.0) as xs:
                return await read_status(xs)
        except OSError as exc:
            raise ClusterError(f"cannot reach xenstored at {address}: {exc}") from None

    print_status(trio.run(main), as_json=args.json)
    return 0


def run_down(args: argparse.Namespace) -> int:
    stopped = trio.run(cluster.down, args.state_dir.resolve())
    print(
        f"xenpv: stopped {', '.join(stopped) or 'nothing (no process was running)'}",
        file=sys.stderr,
    )
    return 0
