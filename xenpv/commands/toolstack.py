"""`xenpv toolstack apply|check`: dom0's one-shot jobs for a cluster whose domain processes
run elsewhere (docker compose, one container or host per domain; see docs/compose.md).

    xenpv toolstack apply [FILE] --xenstore unix:PATH --keys-dir DIR [--image-dir DIR]
                          [--endpoint tcp:{name}:7100]
    xenpv toolstack check --xenstore unix:PATH [--timeout S] [--json]

`apply` creates the topology's domains and devices (`xenpv.toolstack.provision.apply_topology`; FILE
defaults to the embedded demo topology) and writes each domain's key file
`DIR/<name>.key` (0600) for its domain process. It is idempotent: against a store that
already holds the same topology (and matching key files) it changes nothing and exits 0;
against a store holding anything else it exits 1 naming the differences. `--endpoint` is the
link endpoint every domain publishes, `{name}` replaced by the domain's name: with one
container per domain, named after it, `tcp:{name}:7100` is where its peers dial it.

`check` runs one self-test round in every guest (what `xenpv demo` does: verified block I/O
on each vbd, a verified echo with every other guest over the vifs), waits for every guest to
report through xenstore, prints the status and the checks, and exits 0 only if every
expected check passed. Both speak to xenstored as dom0, i.e. over its Unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

from xenpv.commands import args as types
from xenpv.commands.cluster import print_status
from xenpv.errors import XenpvError
from xenpv.runtime.domain_process import CONTROL_SELFTEST, SELFTEST_DONE
from xenpv.toolstack import provision, topology
from xenpv.toolstack.status import ClusterStatus, read_status
from xenpv.toolstack.topology import DomainSpec
from xenpv.xenstore.client import XenstoreClient, connect

DEFAULT_ENDPOINT = "tcp:{name}:7100"


class CheckError(XenpvError):
    """The self-test round could not be run or did not finish."""


def register(sub: Any) -> None:
    actions = types.add_actions(
        sub, "toolstack", help="dom0 jobs: create a topology's domains and devices, run checks"
    )
    apply = actions.add_parser("apply", help="create the domains and devices of a topology")
    apply.add_argument(
        "file",
        type=types.existing_file,
        nargs="?",
        default=None,
        help="topology (default: the demo's)",
    )
    types.add_xenstore(apply, help="unix:PATH (dom0)")
    apply.add_argument("--keys-dir", required=True, type=types.directory, help="where key files go")
    apply.add_argument(
        "--image-dir", type=types.directory, default=Path("."), help="base of relative image paths"
    )
    apply.add_argument(
        "--endpoint",
        type=types.endpoint_template,
        default=DEFAULT_ENDPOINT,
        metavar="TEMPLATE",
        help=f"link endpoint per domain, {{name}} = domain name (default {DEFAULT_ENDPOINT})",
    )
    apply.add_argument("--json", action="store_true", help="print the domids as JSON")
    apply.set_defaults(run=run_apply)
    check = actions.add_parser("check", help="run a self-test round in every guest")
    types.add_xenstore(check, help="unix:PATH (dom0)")
    types.add_round_options(check, timeout_help="seconds for the round", block_help="per vbd")
    check.add_argument("--json", action="store_true", help="JSON summary on stdout")
    check.set_defaults(run=run_check)


def endpoint_for(template: str) -> Any:
    def endpoint(spec: DomainSpec) -> str:
        return template.replace("{name}", spec.name)

    return endpoint


def run_apply(args: argparse.Namespace) -> int:
    topo = topology.load(args.file) if args.file is not None else topology.default_topology()

    async def main() -> provision.Provisioned:
        async with connect(args.xenstore, reconnect_timeout=5.0) as xs:
            return await provision.apply_topology(
                xs,
                topo,
                endpoint=endpoint_for(args.endpoint),
                keys_dir=args.keys_dir,
                image_dir=args.image_dir,
            )

    args.keys_dir.mkdir(parents=True, exist_ok=True)
    done = trio.run(main)
    if args.json:
        sys.stdout.write(
            json.dumps({"domains": done.domids, "created": done.created}, sort_keys=True) + "\n"
        )
    names = ", ".join(f"{n} ({d})" for n, d in done.domids.items())
    verb = "created" if done.created else "unchanged (the store already holds this topology):"
    print(
        f"xenpv: {verb} {names}; {len(done.devices)} devices; keys in {args.keys_dir}",
        file=sys.stderr,
    )
    return 0


def guest_plan(status: ClusterStatus, macs: dict[int, str]) -> tuple[list[int], list[Any]]:
    """Guests (domains with a frontend) and echo peers (name, mac) from a status snapshot."""
    guests = sorted({d.frontend_domid for d in status.devices})
    names = {d.domid: d.name for d in status.domains}
    peers = [{"name": names.get(domid, str(domid)), "mac": mac} for domid, mac in macs.items()]
    return guests, peers


def expected_checks(status: ClusterStatus) -> int:
    """One block check per vbd, one echo per ordered pair of guests that have a vif."""
    vbds = sum(1 for d in status.devices if d.cls == "vbd")
    with_vif = len({d.frontend_domid for d in status.devices if d.cls == "vif"})
    return vbds + with_vif * (with_vif - 1)


async def _vif_macs(xs: XenstoreClient, status: ClusterStatus) -> dict[int, str]:
    macs: dict[int, str] = {}
    for device in sorted(status.devices, key=lambda d: (d.frontend_domid, d.devid)):
        if device.cls != "vif" or device.frontend_domid in macs:
            continue
        path = f"/local/domain/{device.frontend_domid}/device/vif/{device.devid}/mac"
        raw = await xs.try_read(path)
        if raw is not None:
            macs[device.frontend_domid] = raw.decode("ascii", "replace")
    return macs


async def selftest_round(
    xs: XenstoreClient, *, limit_s: float, block_bytes: int, frames: int
) -> ClusterStatus:
    """Ask every guest for one self-test round and return the status once all reported."""
    before = await read_status(xs)
    guests, peers = guest_plan(before, await _vif_macs(xs, before))
    if not guests:
        raise CheckError("no guest has a device: nothing to check")
    previous = [await xs.try_read(f"/local/domain/{d}/{SELFTEST_DONE}") for d in guests]
    round_id = 1 + max((int(v) for v in previous if v is not None and v.isdigit()), default=0)
    request = {
        "round": round_id,
        "peers": peers,
        "block_bytes": block_bytes,
        "frames": frames,
        "timeout": limit_s,
    }
    pending = await request_round(xs, guests, request, limit_s + 10)
    if pending:
        names = {d.domid: d.name for d in before.domains}
        raise CheckError(
            f"self-test round {round_id} not reported after {limit_s + 10:.0f} s by "
            + ", ".join(names.get(d, str(d)) for d in pending)
        )
    return await read_status(xs)


async def request_round(
    xs: XenstoreClient, guests: list[int], request: dict[str, Any], limit_s: float
) -> list[int]:
    """Write a self-test `request` to every guest and wait (up to `limit_s`) until each has
    reported its round; returns the guests that did not."""
    round_id = str(request["round"]).encode()
    send, recv = trio.open_memory_channel[None](1)

    async def watch(path: str, task_status: trio.TaskStatus[None]) -> None:
        async with xs.watch(path) as events:
            task_status.started()
            async for _event in events:
                with contextlib.suppress(trio.WouldBlock):
                    send.send_nowait(None)

    pending = guests
    with trio.move_on_after(limit_s):
        async with trio.open_nursery() as nursery:
            for domid in guests:
                await nursery.start(watch, f"/local/domain/{domid}/{SELFTEST_DONE}")
            for domid in guests:
                await xs.write(f"/local/domain/{domid}/{CONTROL_SELFTEST}", json.dumps(request))
            while True:
                done = [await xs.try_read(f"/local/domain/{d}/{SELFTEST_DONE}") for d in guests]
                pending = [d for d, v in zip(guests, done, strict=True) if v != round_id]
                if not pending:
                    break
                await recv.receive()
            nursery.cancel_scope.cancel()
    return pending


def summarize(status: ClusterStatus, elapsed: float) -> dict[str, Any]:
    """The checks of a finished round, plus a completeness check; `ok` iff all passed."""
    checks = list(status.checks)
    expected = expected_checks(status)
    checks.append(
        {
            "name": "selftest-complete",
            "ok": len(status.checks) >= expected,
            "detail": f"{len(status.checks)} of {expected} guest checks reported",
        }
    )
    stuck = [f"{d.frontend}/{d.cls}{d.devid}" for d in status.devices if not d.connected]
    checks.append(
        {"name": "devices-connected", "ok": not stuck, "detail": f"not connected: {stuck}"}
    )
    guests = {d.frontend_domid for d in status.devices}
    return {
        "guests": [
            {"name": d.name, "page_size": d.page_size, "domid": d.domid}
            for d in status.domains
            if d.domid in guests
        ],
        "checks": checks,
        "elapsed_s": round(elapsed, 2),
        "ok": all(c.get("ok") is True for c in checks),
    }


def run_check(args: argparse.Namespace) -> int:
    async def main() -> tuple[ClusterStatus, float]:
        start = time.monotonic()
        async with connect(args.xenstore, reconnect_timeout=5.0) as xs:
            status = await selftest_round(
                xs, limit_s=args.timeout, block_bytes=args.block_bytes, frames=args.frames
            )
        return status, time.monotonic() - start

    status, elapsed = trio.run(main)
    summary = summarize(status, elapsed)
    print_status(status, as_json=False)
    failed = [c for c in summary["checks"] if c.get("ok") is not True]
    for c in failed:
        print(f"xenpv: check {c['name']} FAILED: {c.get('detail')}", file=sys.stderr)
    if not failed:
        print(f"xenpv: check passed: {len(summary['checks'])} checks", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
        sys.stdout.flush()
    return 0 if summary["ok"] else 1
