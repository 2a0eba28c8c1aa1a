"""`xenpv cluster up|status|down`: the local launcher for any topology file
(`xenpv.toolstack.cluster`).

    xenpv cluster up FILE [--state-dir DIR] [--detach] [--timeout S] [--json]
    xenpv cluster status [--state-dir DIR] [--json]
    xenpv cluster down [--state-dir DIR]
    xenpv cluster logs [DOMAIN] [-f] [-n N] [--level LEVEL] [--state-dir DIR]

`up` prints the status once every device is Connected; in the foreground it then runs until
Ctrl-C or SIGTERM (exit 0; or until a domain process dies: exit 1) and stops everything it
started. With `--detach` it starts a supervisor process that owns the cluster (it notices a
domain's death, see `xenpv.toolstack.cluster`) and returns once the cluster is ready.
`status` reads everything from xenstore and exits 1 if a domain died; `down` stops a
foreground or detached cluster. Exit codes: 0 ok, 1 failure, 2 usage, 130 interrupted.
Human output goes to stderr (rich tables), `--json` prints one JSON object on stdout.
`logs` turns the JSON logs in DIR/logs into readable lines (`xenpv.toolstack.logs`), merged
in time order; `-f` follows them until Ctrl-C (exit 130).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from xenpv.commands import args as types
from xenpv.errors import EXIT_FAILURE, EXIT_OK, UsageError
from xenpv.metrics.files import read_all
from xenpv.toolstack import cluster, supervisor, topology
from xenpv.toolstack import logs as cluster_logs
from xenpv.toolstack.cluster import ClusterError
from xenpv.toolstack.progress import Progress
from xenpv.toolstack.status import ClusterStatus, read_status, render
from xenpv.toolstack.supervisor import Supervisor
from xenpv.xenstore.client import connect

DEFAULT_STATE_DIR = ".xenpv"


def state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=types.directory,
        # a string, so that argparse validates $XENPV_STATE_DIR like a value given here
        default=os.environ.get("XENPV_STATE_DIR") or DEFAULT_STATE_DIR,
        metavar="DIR",
        help="sockets, keys, logs, images, pids (default: $XENPV_STATE_DIR or ./.xenpv)",
    )


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "cluster", help="start, inspect and stop a local cluster from a topology file"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start xenstored, the domains and their devices")
    up.add_argument("file", type=types.existing_file, help="topology file (TOML)")
    state_dir_arg(up)
    up.add_argument("--detach", action="store_true", help="leave the cluster running")
    up.add_argument(
        "--timeout",
        type=types.positive_float,
        default=cluster.DEFAULT_TIMEOUT,
        help="seconds to get ready",
    )
    up.add_argument("--json", action="store_true", help="print the status as JSON on stdout")
    # Internal: this process is a detached cluster's supervisor (see cluster.start_detached).
    up.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    up.set_defaults(run=run_up)
    status = actions.add_parser("status", help="show domains and devices (from xenstore)")
    state_dir_arg(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=run_status)
    down = actions.add_parser("down", help="stop a cluster (detached or in the foreground)")
    state_dir_arg(down)
    down.set_defaults(run=run_down)
    logs = actions.add_parser(
        "logs", help="show the logs of xenstored and the domains as readable lines"
    )
    logs.add_argument(
        "domain", nargs="?", default=None, metavar="DOMAIN", help="one log (or xenstored)"
    )
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C"
    )
    logs.add_argument(
        "-n", "--lines", type=types.positive_int, default=None, metavar="N", help="the last N only"
    )
    logs.add_argument(
        "--level", choices=cluster_logs.LEVELS, default="debug", help="the least severe shown"
    )
    state_dir_arg(logs)
    logs.set_defaults(run=run_logs)


def print_status(
    status: ClusterStatus, *, as_json: bool, extra: dict[str, Any] | None = None
) -> None:
    if as_json:
        sys.stdout.write(json.dumps(status.to_json() | (extra or {}), sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    from rich.console import Console

    # A terminal gives its own width; anything else (a pipe, a log file) gets 80 columns,
    # which every table is made to fit.
    console = Console(file=sys.stderr, width=None if sys.stderr.isatty() else 80)
    for table in render(status):
        console.print(table)


def run_up(args: argparse.Namespace) -> int:
    topo = topology.load(args.file)
    state_dir = args.state_dir.resolve()
    if args.detach:
        main = functools.partial(_up_detached, args.file.resolve(), state_dir, args)
        return supervisor.run(main, Supervisor())
    code = supervisor.run(functools.partial(_up, topo, state_dir, args), Supervisor())
    if code == EXIT_OK and args.ready_fd is None:
        print("xenpv: cluster stopped", file=sys.stderr)
    return code


def launch(
    topo: topology.Topology,
    state_dir: Path,
    args: argparse.Namespace,
    sup: Supervisor,
    *,
    progress: Progress,
    on_exit: cluster.OnExit = "fail",
) -> AbstractAsyncContextManager[cluster.Cluster]:
    """`cluster.launch` as `--timeout` and `--log-level` ask (`cluster up`, `demo`)."""
    return cluster.launch(
        topo,
        state_dir,
        sup=sup,
        ready_timeout_s=args.timeout,
        log_level=args.log_level,
        on_exit=on_exit,
        progress=progress,
    )


async def _up(
    topo: topology.Topology, state_dir: Path, args: argparse.Namespace, sup: Supervisor
) -> int:
    # The supervisor receives SIGINT/SIGTERM from the start: a signal during start-up or
    # after it stops the cluster through `launch`'s exit (guests, backends, xenstored).
    detached = args.ready_fd is not None  # this process is a detached cluster's supervisor
    async with launch(
        topo,
        state_dir,
        args,
        sup,
        progress=Progress.for_terminal(quiet=args.json or detached),
        on_exit="record" if detached else "fail",
    ) as running:
        sup.signal_is_normal_stop = True  # from now on a signal is how it ends
        if detached:
            cluster.report_ready(args.ready_fd)
        else:
            status = await read_status(running.xs)
            print_status(status, as_json=args.json, extra={"state_dir": str(state_dir)})
            print("xenpv: cluster running; Ctrl-C stops it", file=sys.stderr)
        await trio.sleep_forever()
    return EXIT_OK  # pragma: no cover - only a signal ends the block


async def _up_detached(
    topology_file: Path, state_dir: Path, args: argparse.Namespace, sup: Supervisor
) -> int:
    await cluster.start_detached(
        sup,
        topology_file,
        state_dir,
        ready_timeout_s=args.timeout,
        log_level=args.log_level,
        progress=Progress.for_terminal(quiet=args.json),
    )
    async with connect(cluster.xenstore_address(state_dir), reconnect_timeout=1.0) as xs:
        status = await read_status(xs)
    print_status(status, as_json=args.json, extra={"state_dir": str(state_dir)})
    down = f"xenpv cluster down --state-dir {state_dir}"
    print(f"xenpv: cluster running; stop it with: {down}", file=sys.stderr)
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    address = cluster.xenstore_address(args.state_dir)

    async def main() -> tuple[ClusterStatus, dict[str, Any]]:
        try:
            async with connect(address, reconnect_timeout=1.0) as xs:
                return await read_status(xs), await cluster.read_dead(xs)
        except OSError as exc:
            raise ClusterError(f"cannot reach xenstored at {address}: {exc}") from None

    status, dead = trio.run(main)
    extra: dict[str, Any] = {"dead": dead} if dead else {}
    if args.json:  # each domain process's last counter snapshot (docs/metrics.md)
        extra["counters"] = read_all(args.state_dir)
    print_status(status, as_json=args.json, extra=extra or None)
    for name, record in sorted(dead.items()):
        print(f"xenpv: domain {name} is dead: {record.get('reason')}", file=sys.stderr)
    return EXIT_FAILURE if dead else EXIT_OK


def run_down(args: argparse.Namespace) -> int:
    stopped = trio.run(cluster.down, args.state_dir.resolve())
    print(
        f"xenpv: stopped {', '.join(stopped) or 'nothing (no process was running)'}",
        file=sys.stderr,
    )
    return 0


FOLLOW_POLL_S = 0.25  # how often `logs -f` looks for new lines


def run_logs(args: argparse.Namespace) -> int:
    logs_dir = args.state_dir / "logs"
    files = cluster_logs.log_files(logs_dir)
    if args.domain is not None:
        if args.domain not in files:
            have = ", ".join(files) or "none"
            raise UsageError(f"no log named {args.domain!r} in {logs_dir} (logs: {have})")
        files = {args.domain: files[args.domain]}
    elif not files and not args.follow:
        raise UsageError(f"no logs in {logs_dir} (is --state-dir the cluster's?)")
    followers = {name: cluster_logs.LogFollower(path) for name, path in files.items()}
    lines = cluster_logs.render(
        {name: f.read() for name, f in followers.items()}, min_level=args.level, last=args.lines
    )
    try:
        _write_lines(lines)
        if args.follow:
            _follow(args, logs_dir, followers)
    except KeyboardInterrupt:
        return 130  # Ctrl-C is how -f ends: no message
    except BrokenPipeError:  # `| head`: the reader has gone
        sys.stderr.close()
        return 0
    return 0


def _write_lines(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def _follow(
    args: argparse.Namespace, logs_dir: Path, followers: dict[str, cluster_logs.LogFollower]
) -> None:
    while True:
        if args.domain is None:  # a domain started after us gets its log followed too
            for name, path in cluster_logs.log_files(logs_dir).items():
                followers.setdefault(name, cluster_logs.LogFollower(path))
        width = max((len(name) for name in followers), default=0)
        _write_lines(
            list(cluster_logs.follow_lines(followers, min_level=args.level, name_width=width))
        )
        time.sleep(FOLLOW_POLL_S)
