"""`xenpv nbd IMAGE`: export a guest's vbd over NBD, like `qemu-nbd` or `nbdkit file`.

    xenpv nbd disk.img --page-size 64K --socket /tmp/disk.sock
    nbd+unix:///?socket=/tmp/disk.sock          ← printed once the export is up
    qemu-img info 'nbd+unix:///?socket=/tmp/disk.sock'

It starts a minimal cluster (`xenpv.toolstack.cluster.launch`): xenstored, a backend domain
serving IMAGE (blkback), and one guest of the chosen page size whose blkfront the NBD
server runs on (`xenpv.runtime.nbd_export`), so every NBD request goes blkfront → ring →
blkback → image. `--ready-fd FD` gets `READY <uri>` once clients may connect, `--pid-file`
the pid; Ctrl-C or SIGTERM stops everything. See docs/nbd.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import stat
from pathlib import Path
from typing import Any

import trio

from xenpv.errors import EXIT_FAILURE, UsageError, XenpvError
from xenpv.nbd.server import parse_address, uri_of
from xenpv.runtime.nbd_export import status_path
from xenpv.toolstack import cluster, supervisor
from xenpv.toolstack.supervisor import Supervisor
from xenpv.toolstack.topology import (
    PAGE_SIZES,
    DomainSpec,
    Topology,
    TopologyError,
    VbdFeatures,
    VbdSpec,
    parse_size,
)
from xenpv.xenstore.client import XenstoreClient

GUEST_MEMORY = 128 << 20
BACKEND_MEMORY = 64 << 20
SECTOR = 512


class NbdCommandError(XenpvError):
    """The export could not be started."""


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "nbd", help="export IMAGE over NBD through a guest's blkfront (like qemu-nbd)"
    )
    parser.add_argument("image", type=Path, metavar="IMAGE", help="raw image file to serve")
    parser.add_argument(
        "--page-size", default="4K", help="the guest's page size: 4K, 16K or 64K (default 4K)"
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, default=None, help="listen on this Unix socket")
    where.add_argument("--tcp", default=None, metavar="HOST:PORT", help="listen on TCP")
    parser.add_argument(
        "--granule",
        choices=("on", "off"),
        default="on",
        help="offer the grant granule extension (docs/granule-extension.md; default on)",
    )
    parser.add_argument("--read-only", action="store_true", help="export read-only")
    parser.add_argument("--transport", choices=("shm", "socket"), default="shm")
    parser.add_argument("--ready-fd", type=int, default=None, metavar="FD")
    parser.add_argument("--pid-file", type=Path, default=None, metavar="FILE")
    parser.add_argument(
        "--state-dir", type=Path, default=None, help="keep sockets, keys and logs here"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to start")
    parser.set_defaults(run=run)


def build_topology(
    image: Path,
    size: int,
    *,
    page_size: int,
    address: str,
    granule: bool,
    read_only: bool,
    transport: str,
) -> Topology:
    """One backend serving `image`, one guest exporting it at `address`."""
    if transport not in ("shm", "socket"):
        raise UsageError(f"transport {transport!r}: expected shm or socket")
    return Topology(
        domains=(
            DomainSpec("backend", "backend", 4096, BACKEND_MEMORY),
            DomainSpec("guest", "guest", page_size, GUEST_MEMORY),
        ),
        vbds=(
            VbdSpec(
                frontend="guest",
                backend="backend",
                image=str(image),
                size=size,
                read_only=read_only,
                features=VbdFeatures(max_granule_order=4 if granule else 0),
                nbd=address,
            ),
        ),
        transport="shm" if transport == "shm" else "socket",
    )


def _image_size(image: Path) -> int:
    try:
        info = image.stat()
    except OSError as exc:
        raise UsageError(f"{image}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{image}: not a regular file (a raw image is expected)")
    if info.st_size == 0 or info.st_size % SECTOR:
        raise UsageError(f"{image}: size {info.st_size} is not a positive multiple of {SECTOR}")
    return info.st_size


def run(args: argparse.Namespace) -> int:
    image = args.image.resolve()
    size = _image_size(image)
    try:
        page_size = parse_size(args.page_size, "--page-size")
    except TopologyError as exc:
        raise UsageError(str(exc)) from None
    if page_size not in PAGE_SIZES:
        raise UsageError(f"--page-size {args.page_size}: expected 4K, 16K or 64K")
    address: str | None = None  # None: the state directory's nbd.sock, once there is one
    if args.tcp is not None:
        address = f"tcp:{args.tcp}"
        parse_address(address)  # a bad --tcp value is a usage error before anything starts
    elif args.socket is not None:
        address = f"unix:{args.socket.resolve()}"

    async def main(sup: Supervisor, state_dir: Path) -> int:
        topo = build_topology(
            image,
            size,
            page_size=page_size,
            address=address or f"unix:{state_dir / 'nbd.sock'}",
            granule=args.granule == "on",
            read_only=args.read_only,
            transport=args.transport,
        )
        await _serve(topo, state_dir, args, sup)
        return EXIT_FAILURE  # _serve returns only if the cluster ended on its own

    try:
        if args.state_dir is not None:
            return supervisor.run(
                functools.partial(main, state_dir=args.state_dir.resolve()), Supervisor()
            )
        return supervisor.run_in_temp_dir("xenpv-nbd-", main, Supervisor())
    finally:
        if args.pid_file is not None:
            args.pid_file.unlink(missing_ok=True)


async def _serve(
    topo: Topology, state_dir: Path, args: argparse.Namespace, sup: Supervisor
) -> None:
    async with cluster.launch(
        topo, state_dir, sup=sup, ready_timeout_s=args.timeout, log_level=args.log_level
    ) as running:
        device = running.devices[0]
        with trio.move_on_after(args.timeout) as scope:
            bound = await _wait_export(running.xs, status_path(device))
        if scope.cancelled_caught:
            raise NbdCommandError(
                f"the guest did not start the NBD export within {args.timeout:.0f} s "
                f"(see {state_dir / 'logs' / 'guest.log'})"
            )
        if bound.startswith("error:"):
            raise NbdCommandError(f"the guest cannot export the disk: {bound[6:].strip()}")
        uri = uri_of(bound)
        sup.signal_is_normal_stop = True  # from now on Ctrl-C or SIGTERM is how it ends: 0
        print(uri, flush=True)
        if args.pid_file is not None:
            args.pid_file.write_text(f"{os.getpid()}\n")
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, f"READY {uri}\n".encode())
                os.close(args.ready_fd)
            except OSError as exc:
                raise NbdCommandError(f"--ready-fd {args.ready_fd}: {exc.strerror}") from None
        await trio.sleep_forever()  # until a signal, or a process of the cluster exits


async def _wait_export(xs: XenstoreClient, path: str) -> str:
    """The address the guest reported at `path` (a watch, no polling)."""
    async with xs.watch(path) as events:
        async for _ in events:
            raw = await xs.try_read(path)
            if raw:
                return raw.decode("utf-8", "replace")
    raise NbdCommandError("xenstore closed the watch")
