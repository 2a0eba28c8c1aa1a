"""The guest side of `xenpv interop`: one process per guest domain, one cell at a time.

    python -m xenpv.interop.worker PLAN.json

The plan (written by `xenpv.interop.runner`) names the guest's xenstore address, key file,
transport, result file and its cells. For each cell, in order, the worker attaches the cell's
frontend(s) with the cell's granule order and feature maxima, waits until Connected, reads what
both ends wrote in xenstore (the negotiated values as each end states them), runs the verified
workload, measures its throughput and detaches; then appends one JSON line to the result file
and counts the cell in `/local/domain/<id>/xenpv/interop-done` (the runner then removes the
cell's devices):

    {"key": "vbd-f64k-b4k-on-full", "ok": true, "detail": "...", "mbps": 123.4,
     "unit": "MB/s", "negotiated": {"frontend": {...}, "backend": {...}}, "info": {...}}

A cell that fails (attach refused, never connects, data differs, timeout) is reported with
ok=false and the reason; it never stops the next cell. Judging agreement is the runner's job
(`xenpv.interop.verdict`): the worker reports what it saw.

Each cell's workload plugs in through `xenpv.runtime.workload` like every guest workload:
vbd: the shared verified block check (`xenpv.runtime.blockcheck`: tagged sectors at awkward
offsets, a bulk run of 256 KiB writes with 4 in flight, a flush, everything read back and
compared, then a discard if the backend offers one). Throughput: bulk bytes written + read
over the time it took (MB/s).
vif: the shared echo (`xenpv.runtime.echo`) between two vifs of the same cell on the same
backend switch; B answers, A sends frames (lean: 60..1514 bytes; full: 1514, 9000 and 64 KiB
TCPv4 GSO frames), 4 in flight, and requires each echo to be its frame echoed byte for byte.
Throughput: echoed bytes one way over the elapsed time (Mbit/s).

Each cell's `counts` (docs/metrics.md) are the guest's own counters around the workload and,
as `counts["backend"]`, the backend process's grant operations towards this guest, from fresh
snapshots of its metrics file (`backend_metrics` in the plan) taken just before and after.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.errors import XenpvError
from xenpv.granule import BACKEND_MAX_KEY, FRONTEND_KEY
from xenpv.identity import DomainKey
from xenpv.metrics.counts import backend_counts, workload_counts
from xenpv.metrics.files import fresh_snapshot
from xenpv.metrics.registry import snapshot
from xenpv.runtime.blockcheck import BlockCheckPlan, awkward_extents, check_block
from xenpv.runtime.domain_process import read_domain_info
from xenpv.runtime.echo import OPAQUE_HEADER, TCP_HEADER, EchoPort, EchoRequest
from xenpv.runtime.lifecycle import open_published_domain
from xenpv.runtime.workload import WorkloadContext, pump_frames
from xenpv.xenbus.core import Closed, Closing, DeviceId, domain_path, parse_state
from xenpv.xenstore.client import XenstoreClient, connect
from xenpv.xenstore.wire import XsError

if TYPE_CHECKING:
    from frontends.blkfront import Blkfront
    from frontends.netfront import Netfront
    from xenpv.hv import Domain

log = structlog.get_logger()

BULK_CHUNK = 256 << 10
NET_WINDOW = 4
LEAN_SIZES = (60, 590, 1514)
FULL_SIZES = (1514, 9000, 65535)
MSS = 1448
DONE_KEY = "xenpv/interop-done"  # how many cells this worker finished (the runner watches it)

FRONTEND_VBD_KEYS = {
    "granule_order": FRONTEND_KEY,
    "ring_page_order": "ring-page-order",
    "queues": "multi-queue-num-queues",
    "persistent": "feature-persistent",
    "protocol": "protocol",
}
BACKEND_VBD_KEYS = {
    "granule_order": FRONTEND_KEY,
    "max_granule_order": BACKEND_MAX_KEY,
    "max_ring_page_order": "max-ring-page-order",
    "max_queues": "multi-queue-max-queues",
    "indirect_segments": "feature-max-indirect-segments",
    "persistent": "feature-persistent",
    "sector_size": "sector-size",
}
FRONTEND_VIF_KEYS = {
    "granule_order": FRONTEND_KEY,
    "queues": "multi-queue-num-queues",
    "sg": "feature-sg",
    "gso_tcpv4": "feature-gso-tcpv4",
    "rx_copy": "request-rx-copy",
}
BACKEND_VIF_KEYS = {
    "granule_order": FRONTEND_KEY,
    "max_granule_order": BACKEND_MAX_KEY,
    "max_queues": "multi-queue-max-queues",
    "sg": "feature-sg",
    "gso_tcpv4": "feature-gso-tcpv4",
}


async def read_keys(xs: XenstoreClient, directory: str, names: dict[str, str]) -> dict[str, Any]:
    """The keys `names` (field → key) of `directory`: an int where numeric, None if absent."""
    out: dict[str, Any] = {}
    for name, key in names.items():
        raw = await xs.try_read(f"{directory}/{key}")
        if raw is None:
            out[name] = None
            continue
        text = raw.decode("ascii", "replace").strip()
        out[name] = int(text) if text.isdigit() else text
    return out


async def negotiated(xs: XenstoreClient, device: DeviceId, info: dict[str, Any]) -> dict[str, Any]:
    vbd = device.cls == "vbd"
    front = await read_keys(xs, device.frontend, FRONTEND_VBD_KEYS if vbd else FRONTEND_VIF_KEYS)
    back = await read_keys(xs, device.backend, BACKEND_VBD_KEYS if vbd else BACKEND_VIF_KEYS)
    # What the frontend driver itself says it uses (its `.info`), next to its keys.
    for name in ("grant_size", "granule_order", "indirect_segments", "persistent", "queues"):
        if name in info:
            front[f"info_{name}"] = info[name]
    return {"frontend": front, "backend": back}


class CellError(XenpvError):
    """A cell cannot run (its backend refused the device, ...)."""


def backend_error_path(device: DeviceId) -> str:
    """Where a backend records `xenbus_dev_fatal` reasons (Linux: error/<backend path>)."""
    domain = domain_path(device.backend_domid)
    return f"{domain}/error/{device.backend.removeprefix(domain + '/')}/error"


async def _fail_on_backend_close(xs: XenstoreClient, device: DeviceId) -> None:
    """Raise CellError as soon as the backend gives the device up before it connected
    (xenbus_dev_fatal: Closing), instead of waiting for the attach timeout."""
    path = f"{device.backend}/state"
    async with xs.watch(path) as events:
        async for _event in events:
            if parse_state(await xs.try_read(path)) in (Closing, Closed):
                reason = None
                with contextlib.suppress(XsError):
                    reason = await xs.try_read(backend_error_path(device))
                why = reason.decode("utf-8", "replace") if reason else "no reason readable"
                raise CellError(f"backend {device} switched to Closing before connecting: {why}")


async def connected(
    xs: XenstoreClient, pairs: list[tuple[Blkfront | Netfront, DeviceId]], limit_s: float
) -> None:
    """Wait until every frontend in `pairs` is Connected (or fail fast, see above)."""
    with trio.fail_after(limit_s):
        try:
            async with trio.open_nursery() as nursery:
                for _front, device in pairs:
                    nursery.start_soon(_fail_on_backend_close, xs, device)
                for front, _device in pairs:
                    await front.wait_connected()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            refused = [e for e in group.exceptions if isinstance(e, CellError)]
            if refused:
                raise refused[0] from None
            raise


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _result(cell: dict[str, Any], ok: bool, detail: str, **extra: Any) -> dict[str, Any]:
    return {"key": cell["key"], "ok": ok, "detail": detail, **extra}


# -- vbd ------------------------------------------------------------------------------------


def interop_extents(sector: int) -> list[tuple[int, int]]:
    """The shared awkward extents plus 65 KiB, unaligned, from 7 sectors past 128 KiB: more
    than 11 segments of 4 KiB (indirect descriptors, or a split request without them)."""
    return [*awkward_extents(sector), ((128 << 10) + 7 * sector, 65 << 10)]


@dataclass(eq=False)
class VbdCellWorkload:
    """A vbd cell: the shared block check on the cell's one disk, timed, with what both ends
    negotiated. The record is in `result` once `run` returns."""

    cell: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"interop-{self.cell['key']}"

    async def run(self, ctx: WorkloadContext) -> None:
        cell = self.cell
        ((device, disk),) = ctx.blk.items()
        plan = BlockCheckPlan(
            cell["key"], int(cell["bytes"]), BULK_CHUNK, interop_extents, discard="if-offered"
        )
        check = await check_block(disk, plan)
        info = dict(disk.info)
        bulk = check.bulk_bytes
        written_s = check.write_s + check.flush_s
        seconds = written_s + check.read_s
        figures = {
            "negotiated": await negotiated(ctx.xs, device, info),
            "info": _jsonable(info),
            "bytes": 2 * bulk,
            "seconds": round(seconds, 4),
            "write_mbps": round(bulk / written_s / 1e6, 2) if written_s > 0 else None,
            "read_mbps": round(bulk / check.read_s / 1e6, 2) if check.read_s > 0 else None,
            "discarded": check.discarded,
            "unit": "MB/s",
        }
        if check.error is not None:
            self.result = _result(cell, False, check.error, mbps=None, **figures)
            return
        self.result = _result(
            cell,
            True,
            f"{check.extents} tagged extents ({bulk >> 10} KiB bulk) written, "
            f"flushed, read back, identical{', discarded' if check.discarded else ''}",
            mbps=round(2 * bulk / seconds / 1e6, 2) if seconds > 0 and bulk else None,
            **figures,
        )


BACKEND_SNAPSHOT_WAIT = 5.0  # seconds for the backend's process to write a fresh snapshot


@dataclass(slots=True)
class Before:
    """The counters before a cell's workload: the guest's, and the backend process's
    (None: the plan names no metrics file, or none came)."""

    guest: dict[str, Any]
    backend: dict[str, Any] | None


async def backend_snapshot(cell: dict[str, Any]) -> dict[str, Any] | None:
    """A snapshot of the cell's backend process holding every count up to now (the
    metrics file the runner names in the plan, written on request; docs/metrics.md)."""
    path = cell.get("backend_metrics")
    if not path:
        return None
    with trio.move_on_after(BACKEND_SNAPSHOT_WAIT):
        return await fresh_snapshot(Path(path))
    log.warning("no fresh backend counters", path=path)
    return None


async def counters_before(cell: dict[str, Any]) -> Before:
    backend = await backend_snapshot(cell)
    return Before(snapshot(), backend)


async def with_counts(
    result: dict[str, Any], before: Before, domid: int, cell: dict[str, Any]
) -> dict[str, Any]:
    """The cell's result with the operation counts of its workload (docs/metrics.md): the
    guest's, and the backend's towards this guest as `counts["backend"]`."""
    moved = result.get("bytes")
    if isinstance(moved, int) and moved > 0:
        counts = workload_counts(before.guest, snapshot(), domid, moved)
        if before.backend is not None:
            after = await backend_snapshot(cell)
            if after is not None:
                backend = int(cell["backend_domid"])
                counts["backend"] = backend_counts(before.backend, after, backend, domid, moved)
        result["counts"] = counts
    return result


async def run_vbd(dom: Domain, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
    from frontends import blkfront

    device = DeviceId("vbd", dom.domid, int(cell["backend_domid"]), int(cell["devids"][0]))
    f = cell["features"]
    async with blkfront.attach(
        dom,
        xs,
        device,
        granule_order=cell["granule_order"],
        max_ring_page_order=int(f["ring_page_order"]),
        max_queues=int(f["queues"]),
        max_indirect_segments=int(f["indirect_segments"]),
        persistent=bool(f["persistent"]),
    ) as disk:
        await connected(xs, [(disk, device)], float(cell["attach_timeout"]))
        ctx = WorkloadContext(dom, xs, str(cell["key"]), blk={device: disk})
        workload = VbdCellWorkload(cell)
        before = await counters_before(cell)
        await workload.run(ctx)
        return await with_counts(workload.result, before, dom.domid, cell)


# -- vif ------------------------------------------------------------------------------------


@dataclass(eq=False)
class VifCellWorkload:
    """A vif cell: vif B answers echoes, vif A sends the cell's frames to B and verifies
    them (the shared echo). The record is in `result` once `run` returns."""

    cell: dict[str, Any]
    a: DeviceId
    b: DeviceId
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"interop-{self.cell['key']}"

    def requests(self) -> list[EchoRequest]:
        sg_gso = bool(self.cell["features"]["sg_gso"])
        sizes = FULL_SIZES if sg_gso else LEAN_SIZES
        rng = random.Random(self.cell["key"])
        out = []
        for seq in range(int(self.cell["frames"])):
            size = sizes[seq % len(sizes)]
            if sg_gso:
                gso = NetifGsoExtra(MSS, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
                out.append(EchoRequest(rng.randbytes(size - TCP_HEADER), tcp=True, gso=gso))
            else:
                out.append(EchoRequest(rng.randbytes(size - OPAQUE_HEADER)))
        return out

    async def run(self, ctx: WorkloadContext) -> None:
        cell = self.cell
        a, b = ctx.net[self.a], ctx.net[self.b]
        figures: dict[str, Any] = {
            "negotiated": await negotiated(ctx.xs, self.a, a.info.summary()),
            "negotiated_peer": await negotiated(ctx.xs, self.b, b.info.summary()),
            "info": _jsonable(a.info.summary()),
        }
        sender, answerer = EchoPort(a), EchoPort(b)
        requests = self.requests()
        count = len(requests)
        timeout = float(cell["cell_timeout"])
        with (
            ctx.frames.registered(self.a, sender.take),
            ctx.frames.registered(self.b, answerer.take),
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answerer.run)
                nursery.start_soon(sender.run)
                await answerer.announce()  # the switch learns B: A's frames are not flooded
                stats = await sender.round_trips(
                    b.mac, requests, window=NET_WINDOW, wait_s=timeout, limit_s=timeout
                )
                nursery.cancel_scope.cancel()
        figures.update(bytes=stats.frame_bytes, seconds=round(stats.seconds, 4), unit="Mbit/s")
        if stats.timed_out or stats.echoed + len(stats.differing) < count:
            lost = count - stats.echoed - len(stats.differing)
            self.result = _result(
                cell, False, f"{lost} of {count} frames never came back", mbps=None, **figures
            )
        elif stats.differing:
            self.result = _result(
                cell,
                False,
                f"echoes differ from frames {stats.differing[:4]}",
                mbps=None,
                **figures,
            )
        else:
            shown = FULL_SIZES if cell["features"]["sg_gso"] else LEAN_SIZES
            self.result = _result(
                cell,
                True,
                f"{count} frames ({stats.frame_bytes >> 10} KiB, sizes {list(shown)}) "
                "echoed and identical",
                mbps=round(stats.frame_bytes * 8 / stats.seconds / 1e6, 2)
                if stats.seconds
                else None,
                **figures,
            )


async def run_vif(dom: Domain, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
    from frontends import netfront

    be = int(cell["backend_domid"])
    a_id, b_id = (DeviceId("vif", dom.domid, be, int(d)) for d in cell["devids"])
    queues = int(cell["features"]["queues"])
    go = cell["granule_order"]
    async with (
        netfront.attach(dom, xs, a_id, granule_order=go, max_queues=queues) as a,
        netfront.attach(dom, xs, b_id, granule_order=go, max_queues=queues) as b,
        trio.open_nursery() as nursery,
    ):
        await connected(xs, [(a, a_id), (b, b_id)], float(cell["attach_timeout"]))
        ctx = WorkloadContext(dom, xs, str(cell["key"]), net={a_id: a, b_id: b})
        nursery.start_soon(pump_frames, a, ctx.frames)
        nursery.start_soon(pump_frames, b, ctx.frames)
        workload = VifCellWorkload(cell, a_id, b_id)
        before = await counters_before(cell)
        await workload.run(ctx)
        result = await with_counts(workload.result, before, dom.domid, cell)
        nursery.cancel_scope.cancel()
    return result


# -- the process ----------------------------------------------------------------------------


async def run_cell(dom: Domain, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
    """One cell: never raises (a failure is a result with ok=false)."""
    runner = run_vbd if cell["device"] == "vbd" else run_vif
    try:
        with trio.fail_after(float(cell["attach_timeout"]) + float(cell["cell_timeout"])):
            return await runner(dom, xs, cell)
    except trio.TooSlowError:
        return _result(cell, False, "timed out (the device never connected or I/O hung)")
    except Exception as exc:
        log.warning("interop cell failed", key=cell["key"], exc_info=True)
        text = "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc)[:3])
        return _result(cell, False, text)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The innermost exceptions of (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def main(plan: dict[str, Any]) -> None:
    key = DomainKey.load(Path(plan["key_file"]))
    out = Path(plan["out"])
    async with connect(plan["xenstore"], key=key) as xs:
        info = await read_domain_info(xs, key.domid)
        async with open_published_domain(
            xs,
            domid=info.domid,
            key=key,
            endpoint=info.endpoint,
            name=info.name,
            page_size=info.page_size,
            memory_bytes=info.memory,
            transport=plan["transport"],
        ) as dom:
            for done, cell in enumerate(plan["cells"], 1):
                result = await run_cell(dom, xs, cell)
                # The toolstack (the runner) removes a finished cell's devices, as xl detach
                # does, so the guest's xenstore node quota holds any number of cells.
                await xs.write(f"/local/domain/{dom.domid}/{DONE_KEY}", str(done))
                log.info("interop cell", **{k: v for k, v in result.items() if k != "negotiated"})
                _append(out, json.dumps(result, sort_keys=True))


def _append(path: Path, line: str) -> None:
    with path.open("a") as f:  # a few hundred bytes per cell: not worth a thread
        f.write(line + "\n")


def entry(argv: list[str]) -> int:
    from xenpv import log as xlog

    xlog.configure("info", json=True)
    plan = json.loads(Path(argv[0]).read_text())
    trio.run(main, plan)
    return 0


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
