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

vbd workload: tagged writes (`xenpv.runtime.selftest.tagged`: every sector names the cell and
offset)
at awkward offsets, then a bulk run of 256 KiB writes (4 in flight), a flush, and everything
read back and compared. Throughput: bulk bytes written + read over the time it took (MB/s).
vif workload: two vifs of the same cell on the same backend switch; B echoes every frame back
to A with the addresses swapped; A sends frames (lean: 60..1514 bytes; full: 1514, 9000 and
64 KiB TCPv4 GSO frames), 4 in flight, and compares each echo with what it sent.
Throughput: echoed bytes one way over the elapsed time (Mbit/s).
"""

from __future__ import annotations

import contextlib
import json
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import trio

from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.errors import XenpvError
from xenpv.granule import BACKEND_MAX_KEY, FRONTEND_KEY
from xenpv.identity import DomainKey
from xenpv.runtime.domain_process import read_domain_info
from xenpv.runtime.lifecycle import open_published_domain
from xenpv.runtime.selftest import tagged
from xenpv.xenbus.core import Closed, Closing, DeviceId, domain_path, parse_state
from xenpv.xenstore.client import XenstoreClient, connect
from xenpv.xenstore.wire import XsError

log = structlog.get_logger()

BULK_CHUNK = 256 << 10
BULK_CONCURRENCY = 4
NET_WINDOW = 4
ETH_P_TEST = 0x88B5
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
    for field, key in names.items():
        raw = await xs.try_read(f"{directory}/{key}")
        if raw is None:
            out[field] = None
            continue
        text = raw.decode("ascii", "replace").strip()
        out[field] = int(text) if text.isdigit() else text
    return out


async def negotiated(xs: XenstoreClient, device: DeviceId, info: dict[str, Any]) -> dict[str, Any]:
    vbd = device.cls == "vbd"
    front = await read_keys(xs, device.frontend, FRONTEND_VBD_KEYS if vbd else FRONTEND_VIF_KEYS)
    back = await read_keys(xs, device.backend, BACKEND_VBD_KEYS if vbd else BACKEND_VIF_KEYS)
    # What the frontend driver itself says it uses (its `.info`), next to its keys.
    for field in ("grant_size", "granule_order", "indirect_segments", "persistent", "queues"):
        if field in info:
            front[f"info_{field}"] = info[field]
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


async def connected(xs: XenstoreClient, pairs: list[tuple[Any, DeviceId]], limit_s: float) -> None:
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


async def run_vbd(dom: Any, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
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
        assert disk.info is not None  # connected
        info = disk.info.summary()
        seen = await negotiated(xs, device, info)
        sector = disk.info.sector_size
        capacity = int(disk.capacity)
        seed = random.getrandbits(32)
        tag = cell["key"]
        small = [(0, sector), (3 * sector, 12 << 10), ((64 << 10) - sector, 2 * sector)]
        small += [((128 << 10) + 7 * sector, 65 << 10)]
        small = [(o, n) for o, n in small if o + n <= capacity]
        base = 1 << 20
        bulk = min(int(cell["bytes"]), capacity - base)
        bulk -= bulk % BULK_CHUNK
        chunks = [(base + at, BULK_CHUNK) for at in range(0, bulk, BULK_CHUNK)]
        data = {o: tagged(tag, o, n, sector, seed) for o, n in small + chunks}
        for o, _n in small:
            await disk.write(o, data[o])
        limit = trio.CapacityLimiter(BULK_CONCURRENCY)
        bad: list[int] = []

        async def write(o: int) -> None:
            async with limit:
                await disk.write(o, data[o])

        async def verify(o: int, n: int) -> None:
            async with limit:
                if await disk.read(o, n) != data[o]:
                    bad.append(o)

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for o, _n in chunks:
                nursery.start_soon(write, o)
        await disk.flush()
        t1 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for o, n in small + chunks:
                nursery.start_soon(verify, o, n)
        t2 = time.perf_counter()
        figures = {
            "negotiated": seen,
            "info": _jsonable(info),
            "bytes": 2 * bulk,
            "seconds": round(t2 - t0, 4),
            "write_mbps": round(bulk / (t1 - t0) / 1e6, 2) if t1 > t0 else None,
            "read_mbps": round(bulk / (t2 - t1) / 1e6, 2) if t2 > t1 else None,
            "unit": "MB/s",
        }
        mbps = round(2 * bulk / (t2 - t0) / 1e6, 2) if t2 > t0 and bulk else None
        if bad:
            return _result(
                cell, False, f"read back differs at offsets {sorted(bad)[:4]}", mbps=None, **figures
            )
        return _result(
            cell,
            True,
            f"{len(small) + len(chunks)} tagged extents ({bulk >> 10} KiB bulk) written, "
            "flushed, read back, identical",
            mbps=mbps,
            **figures,
        )


# -- vif ------------------------------------------------------------------------------------


def opaque_frame(dst: bytes, src: bytes, seq: int, size: int, rng: random.Random) -> bytes:
    head = dst + src + struct.pack("!HI", ETH_P_TEST, seq)
    return (head + rng.randbytes(max(size - len(head), 0)))[:size]


def tcp_frame(dst: bytes, src: bytes, seq: int, size: int, rng: random.Random) -> bytes:
    """A well-formed IPv4/TCP frame of `size` bytes whose payload starts with `seq`."""
    payload = seq.to_bytes(4, "big") + rng.randbytes(size - 58)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0,
        bytes([10, 8, 0, src[-1]]), bytes([10, 8, 0, dst[-1]]),
    )  # fmt: skip
    return dst + src + b"\x08\x00" + ip + tcp + payload


def frame_seq(frame: bytes) -> int | None:
    """The sequence number a worker frame carries, or None for anybody else's frame."""
    ethertype = frame[12:14]
    if ethertype == struct.pack("!H", ETH_P_TEST) and len(frame) >= 18:
        seq: int = struct.unpack_from("!I", frame, 14)[0]
        return seq
    if ethertype == b"\x08\x00" and len(frame) >= 58:
        return int.from_bytes(frame[54:58], "big")
    return None


async def _echo(front: Any) -> None:
    """Send every frame addressed to this vif back to its sender."""
    while True:
        rx = await front.receive()
        frame = bytes(rx.frame)
        if frame[:6] != front.mac or frame_seq(frame) is None:
            continue
        await front.send(frame[6:12] + frame[:6] + frame[12:], gso=rx.gso, csum_blank=rx.csum_blank)


async def run_vif(dom: Any, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
    from frontends import netfront

    be = int(cell["backend_domid"])
    a_id, b_id = (DeviceId("vif", dom.domid, be, int(d)) for d in cell["devids"])
    f = cell["features"]
    queues, sg_gso = int(f["queues"]), bool(f["sg_gso"])
    go = cell["granule_order"]
    async with (
        netfront.attach(dom, xs, a_id, granule_order=go, max_queues=queues) as a,
        netfront.attach(dom, xs, b_id, granule_order=go, max_queues=queues) as b,
        trio.open_nursery() as nursery,
    ):
        await connected(xs, [(a, a_id), (b, b_id)], float(cell["attach_timeout"]))
        assert a.info is not None and b.info is not None  # connected
        info = a.info.summary()
        seen = await negotiated(xs, a_id, info)
        seen_b = await negotiated(xs, b_id, b.info.summary())
        nursery.start_soon(_echo, b)
        rng = random.Random(cell["key"])
        count = int(cell["frames"])
        sizes = FULL_SIZES if sg_gso else LEAN_SIZES
        sent: dict[int, bytes] = {}
        got: dict[int, bytes] = {}
        window = trio.Semaphore(NET_WINDOW)
        done = trio.Event()
        wrong: list[int] = []

        async def receiver() -> None:
            while len(got) < count:
                rx = await a.receive()
                frame = bytes(rx.frame)
                seq = frame_seq(frame)
                if frame[:6] != a.mac or frame[6:12] != b.mac or seq not in sent or seq in got:
                    continue
                want = sent[seq]
                if frame != want[6:12] + want[:6] + want[12:]:
                    wrong.append(seq)
                got[seq] = frame
                window.release()
            done.set()

        # The switch learns B's address from this broadcast, so A's frames are not flooded.
        await b.send(opaque_frame(b"\xff" * 6, b.mac, 0xFFFFFFFF, 60, rng))
        nursery.start_soon(receiver)
        total = 0
        t0 = time.perf_counter()
        with trio.move_on_after(float(cell["cell_timeout"])) as scope:
            for seq in range(count):
                size = sizes[seq % len(sizes)]
                await window.acquire()
                if sg_gso:
                    frame = tcp_frame(b.mac, a.mac, seq, size, rng)
                    gso = NetifGsoExtra(MSS, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
                    sent[seq] = frame
                    await a.send(frame, gso=gso, csum_blank=True)
                else:
                    frame = opaque_frame(b.mac, a.mac, seq, size, rng)
                    sent[seq] = frame
                    await a.send(frame)
                total += size
            await done.wait()
        elapsed = time.perf_counter() - t0
        nursery.cancel_scope.cancel()
    figures = {
        "negotiated": seen,
        "negotiated_peer": seen_b,
        "info": _jsonable(info),
        "bytes": total,
        "seconds": round(elapsed, 4),
        "unit": "Mbit/s",
    }
    if scope.cancelled_caught:
        lost = count - len(got)
        return _result(
            cell, False, f"{lost} of {count} frames never came back", mbps=None, **figures
        )
    if wrong:
        return _result(cell, False, f"echoes differ from frames {wrong[:4]}", mbps=None, **figures)
    return _result(
        cell,
        True,
        f"{count} frames ({total >> 10} KiB, sizes {list(sizes)}) echoed and identical",
        mbps=round(total * 8 / elapsed / 1e6, 2) if elapsed else None,
        **figures,
    )


# -- the process ----------------------------------------------------------------------------


async def run_cell(dom: Any, xs: XenstoreClient, cell: dict[str, Any]) -> dict[str, Any]:
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
