"""`xenpv domain`: run one domain process (its frontends and backends), see
`xenpv.runtime.domain_process`.

    xenpv domain --xenstore tcp:127.0.0.1:PORT --key-file d1.key [--transport auto|shm|socket]
                 [--listen unix:PATH|tcp:HOST:PORT] [--ready-fd N]

`--also-key-file` (repeatable) runs more domains in the same process (a topology's `group`:
each domain keeps its own xenstore connection, hypervisor slice and devices; the process ends
when the last one does).

Readiness: `/local/domain/<id>/xenpv/ready` is written (the launcher watches it); with
`--ready-fd N` a line `READY <domid> <endpoint>` is also written to fd N. SIGTERM/SIGINT stop
it: frontends close through xenbus (bounded), links close, the process exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

import structlog
import trio

from xenpv.commands import args as types
from xenpv.errors import UsageError
from xenpv.identity import DomainKey
from xenpv.metrics.files import write_periodically
from xenpv.runtime.domain_process import DomainRuntime, run_domain
from xenpv.xenstore.client import connect

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
    parser.add_argument(
        "--also-key-file",
        action="append",
        default=[],
        type=types.existing_file,
        metavar="KEY_FILE",
        help="another domain to run in this process (repeatable: a group of guests)",
    )
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto")
    parser.add_argument(
        "--listen",
        type=types.link_endpoint,
        default=None,
        metavar="EP",
        help="link endpoint, unix:PATH or tcp:HOST:PORT (default: the published one)",
    )
    types.add_metrics(parser)
    parser.add_argument(
        "--metrics-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the counters as JSON to PATH every second (xenpv top reads them)",
    )
    types.add_ready_fd(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    keys = [DomainKey.load(path) for path in (args.key_file, *args.also_key_file)]
    if len(keys) > 1 and args.listen is not None:
        raise UsageError("--listen names one domain's endpoint: give one --key-file with it")
    types.start_metrics(args.metrics)
    trio.run(
        _main, args.xenstore, keys, args.transport, args.listen, args.ready_fd, args.metrics_file
    )
    return 0


async def _main(
    address: str,
    keys: list[DomainKey],
    transport: str,
    listen: str | None,
    ready_fd: int | None,
    metrics_file: Path | None = None,
) -> None:
    async with trio.open_nursery() as nursery:
        if metrics_file is not None:
            nursery.start_soon(write_periodically, metrics_file)
        running = _Running(len(keys), nursery.cancel_scope)
        rts: list[DomainRuntime] = []
        for key in keys:
            rts.append(await nursery.start(_domain, address, key, transport, listen, running))
        nursery.start_soon(_stop_on_signal, rts, nursery.cancel_scope)
        nursery.start_soon(_watchdog, rts)
        rt = rts[0]
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"READY {rt.info.domid} {rt.dom.endpoint}\n".encode())
                os.close(ready_fd)
            except OSError as exc:
                log.warning("cannot write readiness line", fd=ready_fd, error=exc.strerror)


async def _watchdog(rts: list[DomainRuntime]) -> None:
    """Once stopping, the process ends within STOP_GRACE seconds whatever happens: drivers
    close devices in shielded scopes, and a xenstore call made after xenstored dropped a
    destroyed domain would wait for the client's reconnect timeout. In a group, once all
    its domains are stopping (one destroyed domain leaves the others running)."""
    for each in rts:
        await each.stopping.wait()

    def expire() -> None:
        log.warning("stop took too long; exiting", seconds=STOP_GRACE)
        os._exit(0 if all(r.destroyed for r in rts) else 1)

    timer = threading.Timer(STOP_GRACE, expire)
    timer.daemon = True
    timer.start()
    # Without xenstored nothing can close through xenbus: every such step would wait for
    # the client's reconnect timeout, then the timer. Its memory is a memfd and its link
    # sockets are the launcher's to remove: nothing is left behind by leaving now.
    while any(r.xs.connected for r in rts):  # noqa: ASYNC110 - no event for a lost link
        await trio.sleep(XENSTORE_POLL)
    log.warning("xenstore is unreachable while stopping; exiting now")
    os._exit(0 if all(r.destroyed for r in rts) else 1)


async def _stop_on_signal(rts: list[DomainRuntime], scope: trio.CancelScope) -> None:
    """First signal: graceful stop (devices close through xenbus, bounded by the watchdog);
    a second signal: cancel everything."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("domain stopping", signal=signal.Signals(signum).name)
            for rt in rts:
                rt.stop()
            break
        async for _signum in signals:
            break  # a second signal: stop at once
    scope.cancel()


class _Running:
    """How many of the process's domains still run; the process ends with the last."""

    def __init__(self, count: int, scope: trio.CancelScope) -> None:
        self.count = count
        self.scope = scope

    def ended(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.scope.cancel()


async def _domain(
    address: str,
    key: DomainKey,
    transport: str,
    listen: str | None,
    running: _Running,
    task_status: trio.TaskStatus[DomainRuntime] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        async with connect(address, key=key) as xs:
            await run_domain(xs, key, transport=transport, listen=listen, task_status=task_status)
    finally:
        running.ended()  # stopped or destroyed
