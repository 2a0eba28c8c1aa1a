"""`xenpv domain`: run one domain process (its frontends and backends), see
`xenpv.runtime.domain_process`.

    xenpv domain --xenstore tcp:127.0.0.1:PORT --key-file d1.key [--transport auto|shm|socket]
                 [--listen unix:PATH|tcp:HOST:PORT] [--ready-fd N]

Readiness: `/local/domain/<id>/xenpv/ready` is written (the launcher watches it); with
`--ready-fd N` a line `READY <domid> <endpoint>` is also written to fd N. SIGTERM/SIGINT stop
it: frontends close through xenbus (bounded), links close, the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import structlog
import trio

from xenpv.commands import args as types
from xenpv.identity import DomainKey
from xenpv.runtime.domain_process import DomainRuntime, run_domain
from xenpv.xenstore.client import XenstoreClient, connect

log = structlog.get_logger()
TRANSPORTS = ("auto", "shm", "socket")
STOP_GRACE = 8.0  # seconds a graceful stop may take (the launcher kills after 10)
XENSTORE_POLL = 0.05  # seconds between checks that xenstore is still there while stopping


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "domain", help="run one domain process (serves its backends, attaches its frontends)"
    )
    types.add_xenstore(parser, help="tcp:HOST:PORT (or unix:PATH)")
    parser.add_argument(
        "--key-file", required=True, type=types.existing_file, help="the domain's key file"
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto")
    parser.add_argument(
        "--listen",
        type=types.link_endpoint,
        default=None,
        metavar="EP",
        help="link endpoint, unix:PATH or tcp:HOST:PORT (default: the published one)",
    )
    types.add_ready_fd(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    key = DomainKey.load(args.key_file)
    trio.run(_main, args.xenstore, key, args.transport, args.listen, args.ready_fd)
    return 0


async def _main(
    address: str, key: DomainKey, transport: str, listen: str | None, ready_fd: int | None
) -> None:
    async with connect(address, key=key) as xs, trio.open_nursery() as nursery:
        rt: DomainRuntime = await nursery.start(_domain, xs, key, transport, listen, nursery)
        nursery.start_soon(_stop_on_signal, rt, nursery.cancel_scope)
        nursery.start_soon(_watchdog, rt)
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"READY {rt.info.domid} {rt.dom.endpoint}\n".encode())
                os.close(ready_fd)
            except OSError as exc:
                log.warning("cannot write readiness line", fd=ready_fd, error=exc.strerror)


async def _watchdog(rt: DomainRuntime) -> None:
    """Once stopping, the process ends within STOP_GRACE seconds whatever happens: drivers
    close devices in shielded scopes, and a xenstore call made after xenstored dropped a
    destroyed domain would wait for the client's reconnect timeout."""
    await rt.stopping.wait()

    def expire() -> None:
        log.warning("stop took too long; exiting", seconds=STOP_GRACE)
        os._exit(0 if rt.destroyed else 1)

    timer = threading.Timer(STOP_GRACE, expire)
    timer.daemon = True
    timer.start()
    # Without xenstored nothing can close through xenbus: every such step would wait for
    # the client's reconnect timeout, then the timer. Its memory is a memfd and its link
    # sockets are the launcher's to remove: nothing is left behind by leaving now.
    while rt.xs.connected:  # noqa: ASYNC110 - the client has no event for a lost link
        await trio.sleep(XENSTORE_POLL)
    log.warning("xenstore is unreachable while stopping; exiting now")
    os._exit(0 if rt.destroyed else 1)


async def _stop_on_signal(rt: DomainRuntime, scope: trio.CancelScope) -> None:
    """First signal: graceful stop (devices close through xenbus, bounded by the watchdog);
    a second signal: cancel everything."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("domain stopping", signal=signal.Signals(signum).name)
            rt.stop()
            break
        async for _signum in signals:
            break  # a second signal: stop at once
    scope.cancel()


async def _domain(
    xs: XenstoreClient,
    key: DomainKey,
    transport: str,
    listen: str | None,
    nursery: trio.Nursery,
    task_status: trio.TaskStatus[DomainRuntime] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_domain(xs, key, transport=transport, listen=listen, task_status=task_status)
    nursery.cancel_scope.cancel()  # stopped or destroyed: the process ends
