"""The demo's guest self-test: verified block I/O on every vbd and an echo with every peer.

The launcher asks for a round by writing JSON to `/local/domain/<id>/xenpv/control/selftest`:

    {"round": 1, "peers": [{"name": "guest16k", "mac": "00:16:3e:00:00:02"}, ...],
     "block_bytes": 4194304, "frames": 24, "timeout": 20}

and `SelftestWorkload` answers with one JSON result per check in `xenpv/checks/<name>`
(`{"name", "ok", "detail", ...figures}`), then `xenpv/selftest-done`.

Block check (one per vbd, `block-<guest>-<devid>`): `xenpv.runtime.blockcheck` with a tag
naming the guest, device and round, 128 KiB bulk chunks, discard required. Reports write/read
throughput of the bulk run.

Net check (one per peer, `net-<guest>-to-<peer>`; check names are xenstore path elements): the
`EchoResponder` workload (`xenpv.runtime.echo`) answers echo requests on every vif of a guest;
the check sends `frames` requests of several sizes (60..1514 bytes) to the peer's MAC, one at
a time, and requires every reply to be the request echoed byte for byte. A lost frame (the
switch tail-drops when a queue is full) is re-sent up to `RETRIES` times before the check fails.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.errors import XenpvError
from xenpv.runtime.blockcheck import BlockCheckPlan, BlockCheckResult, check_block
from xenpv.runtime.echo import OPAQUE_HEADER, EchoPort, EchoRequest, EchoResponder, parse_mac
from xenpv.runtime.workload import Workload, WorkloadContext
from xenpv.xenbus.core import DeviceId, domain_path
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront

log = structlog.get_logger()

CONTROL_SELFTEST = "xenpv/control/selftest"
CHECKS = "xenpv/checks"
SELFTEST_DONE = "xenpv/selftest-done"
FRAME_SIZES = (60, 590, 1514)
RETRIES = 3
BULK_CHUNK = 128 << 10


def _check(name: str, ok: bool, detail: str, **figures: Any) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, **figures}


async def block_check(
    name: str, disk: Blkfront, tag: str, bulk_bytes: int, limit_s: float
) -> dict[str, Any]:
    """One vbd's check as a result record; never raises a driver error."""
    with trio.move_on_after(limit_s) as scope:
        try:
            plan = BlockCheckPlan(tag, bulk_bytes, BULK_CHUNK)
            return _block_report(name, await check_block(disk, plan))
        except XenpvError as exc:
            return _check(name, False, f"{type(exc).__name__}: {exc}")
    assert scope.cancelled_caught
    return _check(name, False, f"timed out after {limit_s:.0f} s")


def _block_report(name: str, result: BlockCheckResult) -> dict[str, Any]:
    info = result.info
    if result.error == "the backend did not offer discard":
        return _check(name, False, result.error, **info)
    if result.error is not None:
        return _check(name, False, result.error)
    mib = result.bulk_bytes / (1 << 20)
    return _check(
        name,
        True,
        f"wrote, read back and verified {result.extents} extents "
        f"({mib:.1f} MiB bulk), flushed, discarded",
        write_mib_s=round(mib / result.write_s, 2) if result.write_s else None,
        read_mib_s=round(mib / result.read_s, 2) if result.read_s else None,
        bulk_bytes=result.bulk_bytes,
        **{k: info.get(k) for k in ("ring_page_order", "queues", "indirect_segments")},
    )


async def net_check(
    name: str, port: EchoPort, peer_mac: bytes, frames: int, limit_s: float
) -> dict[str, Any]:
    """Echo `frames` frames off the peer with MAC `peer_mac`, one at a time."""
    if frames <= 0:  # the CLI refuses these; a request written by hand must not divide by 0
        return _check(name, False, f"asked for {frames} frames; expected at least 1")
    with trio.move_on_after(limit_s) as scope:
        try:
            await port.front.wait_connected()
            requests = [
                EchoRequest(secrets.token_bytes(FRAME_SIZES[i % len(FRAME_SIZES)] - OPAQUE_HEADER))
                for i in range(frames)
            ]
            stats = await port.round_trips(
                peer_mac, requests, window=1, wait_s=limit_s / 2, attempts=RETRIES
            )
            if stats.failures:
                index, why = stats.failures[0]
                if why == "lost":
                    size = len(requests[index].payload)
                    return _check(name, False, f"no reply to frame {index} ({size} bytes)")
                return _check(name, False, f"reply to frame {index} differs from the request")
            return _check(
                name,
                True,
                f"{frames} frames echoed and verified",
                frames=frames,
                bytes=stats.frame_bytes,
                rtt_ms=round(1000 * stats.seconds / frames, 3),
            )
        except XenpvError as exc:
            return _check(name, False, f"{type(exc).__name__}: {exc}")
    assert scope.cancelled_caught
    return _check(name, False, f"timed out after {limit_s:.0f} s")


async def run_round(
    ctx: WorkloadContext, ports: dict[DeviceId, EchoPort], request: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every check of one self-test round, run concurrently; one result per check."""
    me = ctx.name
    timeout = float(request.get("timeout", 20))
    bulk = int(request.get("block_bytes", 4 << 20))
    frames = int(request.get("frames", 24))
    round_id = int(request["round"])
    results: list[dict[str, Any]] = []

    async def collect(coro: Any) -> None:
        results.append(await coro)

    async with trio.open_nursery() as nursery:
        for device, disk in sorted(ctx.blk.items(), key=lambda kv: kv[0].devid):
            name = f"block-{me}-{device.devid}"
            tag = f"{me}/{device.devid}/r{round_id}"
            nursery.start_soon(collect, block_check(name, disk, tag, bulk, timeout))
        vifs = [port for _d, port in sorted(ports.items(), key=lambda kv: kv[0].devid)]
        for peer in request.get("peers", []):
            if peer.get("name") == me:
                continue
            if not vifs:
                results.append(_check(f"net-{me}-to-{peer['name']}", False, "no vif attached"))
                continue
            name = f"net-{me}-to-{peer['name']}"
            nursery.start_soon(
                collect, net_check(name, vifs[0], parse_mac(peer["mac"]), frames, timeout)
            )
    for result in results:
        log.info("check", **result) if result["ok"] else log.error("check", **result)
    return sorted(results, key=lambda r: str(r["name"]))


@dataclass(eq=False)
class SelftestWorkload:
    """Runs the rounds the launcher asks for, for the domain's life; pings peers through
    `echo`'s ports."""

    echo: EchoResponder
    name: str = "selftest"
    rounds: int = 0  # rounds answered so far

    async def run(self, ctx: WorkloadContext) -> None:
        base = domain_path(ctx.dom.domid)
        path = f"{base}/{CONTROL_SELFTEST}"
        # A round is answered once: a restarted domain whose records survived (compose's
        # restart policy keeps them) must not run the last round again over its disk.
        answered = await ctx.xs.try_read(f"{base}/{SELFTEST_DONE}")
        done = int(answered) if answered is not None and answered.isdigit() else -1
        async with ctx.xs.watch(path) as events:
            async for _event in events:
                try:
                    raw = await ctx.xs.try_read(path)
                except XsError:
                    continue
                if raw is None:
                    continue
                try:
                    request = json.loads(raw)
                    round_id = int(request["round"])
                except (ValueError, KeyError, TypeError):
                    log.warning("malformed self-test request", value=raw[:200])
                    continue
                if round_id == done:
                    continue
                done = round_id
                results = await run_round(ctx, self.echo.ports, request)
                self.rounds += 1
                try:
                    for result in results:
                        await ctx.xs.write(f"{base}/{CHECKS}/{result['name']}", json.dumps(result))
                    await ctx.xs.write(f"{base}/{SELFTEST_DONE}", str(round_id))
                except XsError as exc:
                    log.error("cannot report self-test results", error=str(exc))


def demo_workloads() -> list[Workload]:
    """What every guest of `xenpv demo` runs: the echo responder and the self-test."""
    echo = EchoResponder()
    return [echo, SelftestWorkload(echo)]
