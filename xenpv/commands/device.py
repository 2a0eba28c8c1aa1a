"""`xenpv device attach|detach|list`: devices that come and go in a running cluster, like
`xl block-attach/block-detach` and `xl network-attach/network-detach`.

    xenpv device attach --state-dir DIR vbd GUEST [--backend DOMAIN] [--vdev xvdb]
                        [--image FILE] [--size 64M] [--read-only] [--sector-size 512|4096]
                        [--ring-page-order N] [--queues N] [--indirect-segments N]
                        [--no-persistent] [--no-flush] [--no-barrier] [--no-discard]
    xenpv device attach --state-dir DIR vif GUEST [--backend DOMAIN] [--devid N]
                        [--mac 00:16:3e:..] [--tap IFNAME]
    xenpv device detach --state-dir DIR GUEST DEVICE [--force] [--timeout S]
    xenpv device list --state-dir DIR [--json]

The options are those of a topology file's [[vbd]] / [[vif]] entry; a relative image path is
under the state directory, as in `xenpv cluster up`. DEVICE is `xvdb`, `vif0`, `vbd/51728`
or `vif/0`. Detach follows the xenbus close handshake (`xenpv.toolstack.hotplug`): it returns
once both ends are Closed and the directories are removed; `--force` removes them after
`--timeout` whatever the frontend did. `list` shows every device with both xenbus states.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from xenpv.commands import args as types
from xenpv.commands.cluster import state_dir_arg
from xenpv.errors import EXIT_OK, UsageError
from xenpv.toolstack import cluster, hotplug
from xenpv.toolstack.devices import VbdConfig
from xenpv.toolstack.provision import image_path
from xenpv.toolstack.status import device_label, read_status
from xenpv.toolstack.topology import SECTOR_SIZES, VbdFeatures
from xenpv.xenbus import keys
from xenpv.xenbus.core import DeviceClass, DeviceId, xvd_name, xvd_number
from xenpv.xenstore.client import XenstoreClient, connect

T = TypeVar("T")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_TAP_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")  # IFNAMSIZ - 1
_XVD_RE = re.compile(r"^xvd([a-p])$")
_DEVICE_RE = re.compile(r"^(?:(xvd[a-p])|vif(\d+)|(vbd|vif)/(\d+))$")


def mac_address(text: str) -> str:
    """A unicast MAC such as 00:16:3e:00:00:01."""
    mac = text.lower()
    if not _MAC_RE.match(mac):
        raise argparse.ArgumentTypeError(f"expected a MAC like 00:16:3e:00:00:01, got {text!r}")
    if int(mac[:2], 16) & 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not unicast (low bit of the first byte)")
    return mac


def tap_name(text: str) -> str:
    if not _TAP_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"interface names are 1-15 of [A-Za-z0-9_.-], got {text!r}"
        )
    return text


def xvd(text: str) -> int:
    """`xvda`..`xvdp`: the disk index."""
    match = _XVD_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected xvda..xvdp, got {text!r}")
    return ord(match.group(1)) - ord("a")


def device_name(text: str) -> tuple[DeviceClass, int]:
    """`xvdb`, `vif0`, `vbd/51728` or `vif/0`: the class and devid."""
    match = _DEVICE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a device such as xvdb, vif0, vbd/51728 or vif/0, got {text!r}"
        )
    if match.group(1):
        return "vbd", xvd_number(ord(match.group(1)[-1]) - ord("a"))
    if match.group(2):
        return "vif", int(match.group(2))
    cls: DeviceClass = "vbd" if match.group(3) == "vbd" else "vif"
    return cls, int(match.group(4))


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "device", help="attach, detach and list devices of a running cluster (like xl)"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    attach = actions.add_parser("attach", help="attach a vbd or a vif to a running guest")
    kinds = attach.add_subparsers(dest="kind", metavar="vbd|vif", required=True)
    vbd = kinds.add_parser("vbd", help="a virtual disk (xl block-attach)")
    vif = kinds.add_parser("vif", help="a virtual network interface (xl network-attach)")
    d = VbdFeatures()
    for p in (vbd, vif):
        state_dir_arg(p)
        p.add_argument("guest", type=types.non_empty, metavar="GUEST", help="the guest's name")
        p.add_argument(
            "--backend",
            type=types.non_empty,
            default=None,
            metavar="DOMAIN",
            help="the backend domain's name (default: the cluster's backend, if it has one)",
        )
    vbd.add_argument("--vdev", type=xvd, default=None, help="xvda..xvdp (default: first free)")
    vbd.add_argument("--image", default=None, help="raw image (default: an in-memory disk)")
    vbd.add_argument("--size", type=types.byte_size, default=64 << 20, help="default 64M")
    vbd.add_argument("--read-only", action="store_true")
    vbd.add_argument("--sector-size", type=int, choices=SECTOR_SIZES, default=512)
    vbd.add_argument(
        "--ring-page-order",
        type=types.int_range(0, keys.MAX_RING_PAGE_ORDER),
        default=d.ring_page_order,
    )
    vbd.add_argument("--queues", type=types.int_range(1, keys.BLK_MAX_QUEUES), default=d.queues)
    vbd.add_argument(
        "--indirect-segments", type=types.int_range(0, 512), default=d.indirect_segments
    )
    for feature in ("persistent", "flush", "barrier", "discard"):
        vbd.add_argument(f"--no-{feature}", action="store_true", help=f"switch {feature} off")
    vbd.set_defaults(run=run_attach)
    vif.add_argument("--devid", type=types.non_negative_int, default=None)
    vif.add_argument("--mac", type=mac_address, default=None, help="default: 00:16:3e:random")
    vif.add_argument("--tap", type=tap_name, default=None, help="attach this host TAP device")
    vif.set_defaults(run=run_attach)

    detach = actions.add_parser("detach", help="detach a device through the xenbus close")
    state_dir_arg(detach)
    detach.add_argument("guest", type=types.non_empty, metavar="GUEST")
    detach.add_argument("device", type=device_name, metavar="DEVICE", help="xvdb, vif0, ...")
    detach.add_argument(
        "--force", action="store_true", help="remove the device after the timeout anyway"
    )
    detach.add_argument(
        "--timeout",
        type=types.non_negative_float,
        default=hotplug.DETACH_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for both ends to close (default {hotplug.DETACH_TIMEOUT:g})",
    )
    detach.set_defaults(run=run_detach)

    listing = actions.add_parser("list", help="every device with both xenbus states")
    state_dir_arg(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_list)


def _with_xenstore(state_dir: Path, job: Callable[[XenstoreClient], Awaitable[T]]) -> T:
    address = cluster.xenstore_address(state_dir)

    async def main() -> T:
        try:
            async with connect(address, reconnect_timeout=1.0) as xs:
                return await job(xs)
        except OSError as exc:
            raise cluster.ClusterError(f"cannot reach xenstored at {address}: {exc}") from None

    return trio.run(main)


async def existing_names(xs: XenstoreClient) -> dict[str, int]:
    """The running domains by name (dom0 excluded), from `/local/domain/<id>/name`."""
    names: dict[str, int] = {}
    for entry in await xs.try_directory("/local/domain"):
        if entry.isdigit() and entry != "0":
            raw = await xs.try_read(f"/local/domain/{entry}/name")
            if raw is not None:
                names[raw.decode("utf-8", "replace")] = int(entry)
    return names


async def _domid(names: dict[str, int], name: str) -> int:
    if name not in names:
        known = ", ".join(sorted(names)) or "none"
        raise UsageError(f"no domain named {name!r} (domains: {known})")
    return names[name]


def _cluster_backends(state_dir: Path) -> list[str]:
    """The names of the cluster's backend domains, as `cluster.json` records their processes."""
    state = cluster.read_state(state_dir) or {}
    processes = state.get("processes", [])
    return [
        p["name"]
        for p in processes
        if isinstance(p, dict) and p.get("kind") == "backend" and isinstance(p.get("name"), str)
    ]


async def _backend_domid(names: dict[str, int], name: str | None, backends: list[str]) -> int:
    if name is not None:
        return await _domid(names, name)
    if len(backends) == 1:
        return await _domid(names, backends[0])
    found = ", ".join(backends) or "none"
    raise UsageError(
        f"the cluster has {len(backends)} backend domains ({found}): give --backend DOMAIN"
    )


async def _free_devid(xs: XenstoreClient, guest: int, cls: DeviceClass) -> int:
    used = {
        int(d) for d in await xs.try_directory(f"/local/domain/{guest}/device/{cls}") if d.isdigit()
    }
    if cls == "vif":
        return min(set(range(len(used) + 1)) - used)
    for index in range(16):
        if xvd_number(index) not in used:
            return xvd_number(index)
    raise UsageError(f"guest {guest} has no free xvd name (xvda..xvdp all used)")


def run_attach(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    cls: DeviceClass = args.kind
    backends = _cluster_backends(state_dir)

    async def job(xs: XenstoreClient) -> DeviceId:
        names = await existing_names(xs)
        guest = await _domid(names, args.guest)
        backend = await _backend_domid(names, args.backend, backends)
        if cls == "vbd":
            devid = xvd_number(args.vdev) if args.vdev is not None else None
        else:
            devid = args.devid
        if devid is None:
            devid = await _free_devid(xs, guest, cls)
        device = DeviceId(cls, guest, backend, devid)
        try:
            if cls == "vbd":
                if args.size % args.sector_size:
                    raise UsageError(
                        f"--size must be a multiple of --sector-size {args.sector_size}"
                    )
                features = VbdFeatures(
                    ring_page_order=args.ring_page_order,
                    queues=args.queues,
                    indirect_segments=args.indirect_segments,
                    persistent=not args.no_persistent,
                    flush=not args.no_flush,
                    barrier=not args.no_barrier,
                    discard=not args.no_discard,
                )
                config = VbdConfig(
                    image=image_path(args.image, state_dir),
                    size=args.size,
                    read_only=args.read_only,
                    sector_size=args.sector_size,
                    features=features,
                )
                await hotplug.attach_vbd(xs, device, config)
            else:
                mac = args.mac or "00:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
                await hotplug.attach_vif(xs, device, mac=mac, tap=args.tap)
        except hotplug.HotplugError as exc:
            raise UsageError(str(exc)) from None
        return device

    device = _with_xenstore(state_dir, job)
    print(f"attached {_label(device)} to {args.guest} ({device})")
    return EXIT_OK


def _label(device: DeviceId) -> str:
    if device.cls == "vbd" and device.devid >> 8 == 202 and device.devid & 0xF == 0:
        return xvd_name((device.devid >> 4) & 0xF)
    return f"{device.cls}{device.devid}" if device.cls == "vif" else str(device)


def run_detach(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir.resolve()
    cls, devid = args.device

    async def job(xs: XenstoreClient) -> hotplug.DetachResult:
        names = await existing_names(xs)
        guest = await _domid(names, args.guest)
        raw = await xs.try_read(f"/local/domain/{guest}/device/{cls}/{devid}/backend-id")
        if raw is None or not raw.strip().isdigit():
            raise UsageError(f"{args.guest} has no device {_label(DeviceId(cls, guest, 0, devid))}")
        device = DeviceId(cls, guest, int(raw), devid)
        return await hotplug.detach(xs, device, grace=args.timeout, force=args.force)

    result = _with_xenstore(state_dir, job)
    how = "closed through xenbus" if result.outcome == "closed" else "removed by force"
    print(
        f"detached {_label(result.device)} from {args.guest}: {how} (frontend "
        f"{result.frontend_state.short}, backend {result.backend_state.short})"
    )
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    status = _with_xenstore(args.state_dir.resolve(), read_status)
    rows = [
        {
            "device": device_label(d.cls, d.devid),
            "id": f"{d.cls}/{d.frontend_domid}/{d.devid}",
            "frontend": d.frontend,
            "backend": d.backend,
            "frontend_state": d.frontend_state,
            "backend_state": d.backend_state,
        }
        for d in status.devices
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    columns = ("device", "id", "frontend", "backend", "frontend_state", "backend_state")
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())
    return EXIT_OK
