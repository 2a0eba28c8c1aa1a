"""`xenpv probe xenstored|domain`: health checks (docker compose `healthcheck`), exit 0 = healthy.

    xenpv probe xenstored --xenstore unix:PATH [--xenstore tcp:HOST:PORT ...]
    xenpv probe domain NAME --xenstore ADDR [--key-file FILE] [--connected]

`xenstored`: every address given answers. A Unix socket (dom0) must answer a DIRECTORY of
`/`; a TCP listener must send the authentication HELLO (`xenpv.xenstore.auth`), which is all
an unauthenticated peer can get from it (with `--key-file` the probe authenticates and reads
instead).
`domain NAME`: the domain exists with that name (a domain the cluster's supervisor recorded
as dead is reported so) and its process wrote `xenpv/ready`; with
`--connected`, every device it is an end of is Connected on both ends. Over TCP the probe
proves the domain's own identity (`--key-file`, the key its process uses: a domain can read
its own device directories and, by xl's permissions, the other end's); over the Unix socket
it looks the domain up by name as dom0.

Each probe is bounded by `--timeout` (default 5 s) and prints one line; a failure is one
line on stderr and exit status 1 (XenpvError), never a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import trio

from xenpv.commands import args as types
from xenpv.errors import XenpvError
from xenpv.identity import DomainKey
from xenpv.toolstack.cluster import DEAD_ROOT
from xenpv.xenbus.core import DEVICE_CLASSES, DeviceId, parse_state
from xenpv.xenstore import auth
from xenpv.xenstore.client import UNREADABLE, XenstoreClient, connect, parse_address
from xenpv.xenstore.wire import XsError

READY = "xenpv/ready"


class ProbeError(XenpvError):
    """The probed service is not healthy (the message says why)."""


def register(sub: Any) -> None:
    kinds = types.add_actions(
        sub,
        "probe",
        help="health checks: is xenstored answering, is a domain ready and connected",
        dest="kind",
        metavar="WHAT",
    )
    xsd = kinds.add_parser("xenstored", help="xenstored answers on every address given")
    types.add_xenstore(xsd, help="unix:PATH or tcp:HOST:PORT (repeatable)", repeatable=True)
    xsd.add_argument(
        "--key-file", type=types.existing_file, default=None, help="authenticate on TCP"
    )
    xsd.add_argument("--timeout", type=types.positive_float, default=5.0, help="seconds")
    xsd.set_defaults(run=run_xenstored)
    dom = kinds.add_parser("domain", help="the domain's process is ready (and connected)")
    dom.add_argument("name", help="the domain's name")
    types.add_xenstore(dom)
    dom.add_argument(
        "--key-file", type=types.existing_file, default=None, help="the domain's key (TCP)"
    )
    dom.add_argument(
        "--connected", action="store_true", help="also require every device to be Connected"
    )
    dom.add_argument("--timeout", type=types.positive_float, default=5.0, help="seconds")
    dom.set_defaults(run=run_domain)


def _key(path: Path | None) -> DomainKey | None:
    return DomainKey.load(path) if path is not None else None


def _bounded(timeout: float, what: str, fn: Any, *args: Any) -> Any:
    async def main() -> Any:
        with trio.move_on_after(timeout):
            return await fn(*args)
        raise ProbeError(f"{what}: no answer within {timeout:g} s")

    try:
        return trio.run(main)
    except ProbeError:
        raise
    except OSError as exc:
        raise ProbeError(f"{what}: {exc.strerror or exc}") from None
    except XenpvError as exc:  # cannot connect, refused key, XsError...: name the target
        raise ProbeError(f"{what}: {exc}") from None


async def _tcp_hello(address: str) -> None:
    addr = parse_address(address)
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    async with stream:
        buf = bytearray()
        data = await auth.receive_exactly(stream, auth.HELLO_SIZE, buf)
        auth.parse_hello(data)


async def _xenstored(address: str, key: DomainKey | None) -> str:
    kind = parse_address(address).kind
    if kind == "tcp" and key is None:
        await _tcp_hello(address)
        return "answers the authentication hello"
    async with connect(address, key=key, reconnect_timeout=0.5) as xs:
        path = "/" if key is None else f"/local/domain/{key.domid}"
        await xs.directory(path)
    return f"answers DIRECTORY {path}"


def run_xenstored(args: argparse.Namespace) -> int:
    key = _key(args.key_file)
    for address in args.xenstore:
        what = f"xenstored at {address}"
        result = _bounded(args.timeout, what, _xenstored, address, key)
        print(f"{what}: {result}")
    return 0


async def _domid_by_name(xs: XenstoreClient, name: str) -> int:
    with contextlib.suppress(XsError):
        for entry in await xs.directory("/local/domain"):
            if entry.isdigit() and entry != "0":
                raw = await xs.try_read(f"/local/domain/{entry}/name")
                if raw is not None and raw.decode("utf-8", "replace") == name:
                    return int(entry)
    raise ProbeError(f"domain {name}: not in xenstore")


def _dead_reason(raw: bytes) -> str:
    try:
        record = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
    return str(record.get("reason")) if isinstance(record, dict) else str(record)


async def domain_devices(xs: XenstoreClient, domid: int) -> list[DeviceId]:
    """Every device `domid` is the frontend or the backend of, as seen from its own dirs."""
    found: list[DeviceId] = []
    base = f"/local/domain/{domid}"
    for cls in DEVICE_CLASSES:
        for devid in await xs.try_directory(f"{base}/device/{cls}", ignore=UNREADABLE):
            raw = await xs.try_read(f"{base}/device/{cls}/{devid}/backend-id")
            if devid.isdigit() and raw is not None and raw.strip().isdigit():
                found.append(DeviceId(cls, domid, int(raw), int(devid)))
        for fe in await xs.try_directory(f"{base}/backend/{cls}", ignore=UNREADABLE):
            for devid in await xs.try_directory(f"{base}/backend/{cls}/{fe}", ignore=UNREADABLE):
                if fe.isdigit() and devid.isdigit():
                    found.append(DeviceId(cls, int(fe), domid, int(devid)))
    return found


async def _domain(address: str, name: str, key: DomainKey | None, connected: bool) -> str:
    async with connect(address, key=key, reconnect_timeout=0.5) as xs:
        if key is not None:
            domid = key.domid
            raw = await xs.try_read(f"/local/domain/{domid}/name")
            actual = raw.decode("utf-8", "replace") if raw is not None else None
            if actual != name:
                raise ProbeError(f"domain {name}: the key is domain {domid}'s, named {actual!r}")
        else:
            dead = await xs.try_read(f"{DEAD_ROOT}/{name}")
            if dead is not None:  # its launcher's supervisor recorded its process's death
                raise ProbeError(f"domain {name} is dead: {_dead_reason(dead)}")
            domid = await _domid_by_name(xs, name)
        if await xs.try_read(f"/local/domain/{domid}/{READY}") is None:
            raise ProbeError(f"domain {name} ({domid}): its process is not ready")
        if not connected:
            return f"domain {name} ({domid}): ready"
        found = await domain_devices(xs, domid)
        stuck: list[str] = []
        for device in found:
            fe = parse_state(await xs.try_read(f"{device.frontend}/state")).short
            be = parse_state(await xs.try_read(f"{device.backend}/state")).short
            if fe != "Connected" or be != "Connected":
                stuck.append(f"{device}: frontend {fe}, backend {be}")
        if stuck:
            raise ProbeError(f"domain {name} ({domid}): " + "; ".join(stuck))
        return f"domain {name} ({domid}): ready, {len(found)} devices Connected"


def run_domain(args: argparse.Namespace) -> int:
    what = f"domain {args.name}"
    try:
        line = _bounded(
            args.timeout,
            what,
            _domain,
            args.xenstore,
            args.name,
            _key(args.key_file),
            args.connected,
        )
    except XsError as exc:
        raise ProbeError(f"{what}: {exc}") from None
    print(line)
    sys.stdout.flush()
    return 0
