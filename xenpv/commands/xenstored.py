"""`xenpv xenstored`: run the xenstore daemon in the foreground.

Readiness: once every listener is bound the daemon logs the event "xenstored ready" (with
`socket` and, with --tcp, the bound `tcp` address: asking for port 0 picks a free one). With
`--ready-fd N` it also writes one line `READY unix:<path>[ tcp:<host>:<port>]\\n` to file
descriptor N and closes it, so a parent process can wait on a pipe instead of parsing logs.
SIGTERM and SIGINT stop it cleanly (everything acknowledged is already durable).
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import structlog
import trio

from xenpv.commands import args as types
from xenpv.errors import UsageError
from xenpv.faults.xsagent import serve_control, unix_client
from xenpv.xenstore.quotas import QUOTA_FIELDS, build_quotas
from xenpv.xenstore.server import (
    DEFAULT_COMPACT_BYTES,
    Bound,
    ServerConfig,
    XenstoreServer,
    default_socket_path,
    open_store,
)
from xenpv.xenstore.store import Quotas

log = structlog.get_logger()


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "xenstored", help="run the xenstore daemon (foreground)"
    )
    parser.add_argument(
        "--socket",
        type=types.socket_path,
        default=None,
        help="Unix socket for dom0 (default: $XENSTORED_PATH, else /var/run/xenstored/socket)",
    )
    parser.add_argument(
        "--data-dir",
        required=True,
        type=types.directory,
        help="directory for the snapshot and journal",
    )
    parser.add_argument(
        "--tcp",
        type=types.host_port,
        metavar="HOST:PORT",
        default=None,
        help="also serve authenticated domains on TCP",
    )
    types.add_ready_fd(parser)
    parser.add_argument(
        "--compact-bytes",
        type=types.positive_int,
        default=DEFAULT_COMPACT_BYTES,
        help=argparse.SUPPRESS,  # testing: journal size that triggers a snapshot
    )
    parser.add_argument(
        "--write-stall-timeout",
        type=types.positive_float,
        default=30.0,
        help=argparse.SUPPRESS,  # testing: seconds a blocked write may last before the close
    )
    defaults = Quotas()
    for name in (
        "nodes_per_domain",
        "node_size",
        "watches_per_domain",
        "transactions_per_domain",
        "perms_per_node",
        "transaction_nodes",
    ):
        parser.add_argument(
            f"--quota-{name.replace('_', '-')}",
            dest=f"quota_{name}",
            type=types.positive_int,
            default=getattr(defaults, name),
            metavar="N",
            help=f"quota for unprivileged domains (default {getattr(defaults, name)})",
        )
    parser.add_argument(
        "-Q",
        "--quota",
        action="append",
        default=[],
        metavar="NAME=N",
        help="global quota by C xenstored's name (nodes, node-size, watches, transactions, "
        "permissions, transaction-nodes), as xenstored -Q / xenstore-control quota set",
    )
    parser.add_argument(
        "--quota-domain",
        action="append",
        default=[],
        metavar="DOMID:NAME=N",
        help="a quota for one domain only (replaces the global one for it)",
    )
    types.add_metrics(parser)
    parser.set_defaults(run=run)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--tcp expects HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    quotas = Quotas()
    for name in QUOTA_FIELDS:
        value = getattr(args, f"quota_{name}", None)
        if value is not None:
            setattr(quotas, name, value)
    try:
        quotas = build_quotas(quotas, args.quota, args.quota_domain)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    config = ServerConfig(
        socket_path=args.socket or default_socket_path(),
        data_dir=args.data_dir,
        tcp=parse_hostport(args.tcp) if args.tcp else None,
        quotas=quotas,
        compact_min_bytes=args.compact_bytes,
        write_stall_timeout=args.write_stall_timeout,
    )
    types.start_metrics(args.metrics)
    trio.run(_main, config, args.ready_fd)
    return 0


async def _main(config: ServerConfig, ready_fd: int | None) -> None:
    store, journal = open_store(config.data_dir, config.quotas)
    server = XenstoreServer(store, journal, config)
    try:
        async with trio.open_nursery() as nursery:
            bound: Bound = await nursery.start(server.serve)
            # The fault-run control node (`xenpv faults run`): idle, one watch, until used.
            nursery.start_soon(serve_control, config, unix_client(bound.socket_path))
            tcp = f"tcp:{bound.tcp[0]}:{bound.tcp[1]}" if bound.tcp else None
            log.info("xenstored ready", socket=bound.socket_path, tcp=tcp, pid=os.getpid())
            if ready_fd is not None:
                line = f"READY unix:{bound.socket_path}" + (f" {tcp}" if tcp else "") + "\n"
                try:
                    os.write(ready_fd, line.encode())
                    os.close(ready_fd)
                except OSError as exc:
                    log.warning("cannot write readiness line", fd=ready_fd, error=exc.strerror)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("xenstored stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        journal.close()
