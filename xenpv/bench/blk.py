"""`xenpv bench blk`: blkfront ↔ blkback throughput, against fio + nbdkit on the same image.

For each guest page size and domain-link transport, a backend domain runs in a child process
(blkback.serve on a raw image file) and this process is the guest (blkfront.attach, the
public API: `io_queue()`, which keeps the depth from one task as fio's async engines do).
Workloads, each for a fixed time: 4 KiB random read and write at queue depth 1 and 32,
64 KiB and 1 MiB sequential read and write at queue depth 4. The image is filled with data
first, so reads come from the page cache in both stacks, and every workload of both stacks
starts with nothing dirty (`sync` before each: the previous writes' writeback would otherwise
land in the next workload's time). Besides IOPS and latency, each
result has the CPU time per I/O of the guest process and of the backend process
(`guest_cpu_us`, `backend_cpu_us`): on a shared machine they vary much less than IOPS.

In the same run, fio with its nbd engine drives nbdkit's file plugin serving the same image
(same block sizes and depths), and, next to it, the PV path through an NBD export
(`xenpv nbd`, docs/nbd.md: fio → NBD → the guest's blkfront → ring → blkback → image) for
4 KiB and 64 KiB guests, on the NBD_WORKLOADS; `ratio_nbd_vs_nbdkit` = that / nbdkit for
the 4 KiB guest: the same client, the same protocol, only the server's path differs.
`ratio_vs_nbdkit` = xenpv / nbdkit for the shared-memory transport with 4 KiB guest pages
(the block drivers' goals: 4k QD32 IOPS at least half of nbdkit's, 1 MiB sequential read at
least half). The bench installs nothing: without fio/nbdkit it says which Debian packages to
add and records the comparison as unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from xenpv.bench.cli import SCRATCH_DIR, Bench, option
from xenpv.bench.report import emit
from xenpv.bench.xenstore import child_env, supervised_xenstored
from xenpv.commands import args as types
from xenpv.metrics.counts import workload_counts
from xenpv.metrics.registry import snapshot
from xenpv.toolstack import supervisor
from xenpv.toolstack.supervisor import SUPERVISOR, Supervisor

CLEANUP_TIMEOUT = 5.0
MiB = 1 << 20
GUEST, BACKEND, DEVID = 1, 0, 51712


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    rw: str  # fio's rw= value: randread randwrite read write
    bs: int
    depth: int


WORKLOADS = [
    Workload("randread_4k_qd1", "randread", 4096, 1),
    Workload("randread_4k_qd32", "randread", 4096, 32),
    Workload("randwrite_4k_qd1", "randwrite", 4096, 1),
    Workload("randwrite_4k_qd32", "randwrite", 4096, 32),
    Workload("read_64k", "read", 65536, 4),
    Workload("write_64k", "write", 65536, 4),
    Workload("read_1m", "read", MiB, 4),
    Workload("write_1m", "write", MiB, 4),
]
RATIOS = ("randread_4k_qd32", "randread_4k_qd1", "read_1m")
NBD_WORKLOADS = [
    w
    for w in WORKLOADS
    if w.name in ("randread_4k_qd1", "randread_4k_qd32", "randwrite_4k_qd32", "read_1m", "write_1m")
]
NBD_PAGE_SIZES = (4096, 65536)
NBD_RATIOS = ("randread_4k_qd1", "randread_4k_qd32", "read_1m")
NBD_HEADLINE = "nbd/4k"
NBD_START_TIMEOUT = 90.0
INSTALL_HINT = "apt-get install fio nbdkit"


BENCH = Bench(
    "blk",
    help="blkfront/blkback IOPS and throughput vs fio+nbdkit on the same image",
    quick_help="short runs, fewer configurations",
    options=(
        SCRATCH_DIR,
        option("--seconds", type=types.positive_float, default=None, help="time per workload"),
    ),
)


def run(args: argparse.Namespace) -> int:
    seconds = args.seconds or (0.4 if args.quick else 2.0)
    image_mib = 64 if args.quick else 256
    page_sizes = (4096, 65536) if args.quick else (4096, 16384, 65536)
    transports = ("shm", "socket")
    measured: dict[str, Any] = {}

    async def main(sup: Supervisor, workdir: Path) -> int:
        (workdir / "logs").mkdir()
        image = workdir / "disk.img"
        _fill_image(image, image_mib * MiB)
        xs_address = await supervised_xenstored(sup, workdir, "xs")
        measured["xenpv"] = await _bench_xenpv(
            sup, workdir, xs_address, image, page_sizes, transports, seconds
        )
        await sup.stop()  # xenstored: the NBD runs below start their own
        # The fio runs are synchronous: in a thread, their processes recorded by `sup`, which
        # stops them on a Ctrl-C (and so ends the thread's waits).
        measured["via_nbd"] = await trio.to_thread.run_sync(
            _bench_xenpv_nbd, sup, workdir, image, seconds, abandon_on_cancel=True
        )
        measured["nbdkit"] = await trio.to_thread.run_sync(
            _bench_nbdkit, sup, workdir, image, seconds, abandon_on_cancel=True
        )
        return 0

    code = supervisor.run_in_temp_dir("xb", main, Supervisor(), parent=args.dir)
    if code != 0:
        return code
    return _report(measured["xenpv"], measured["nbdkit"], seconds, image_mib, measured["via_nbd"])


def _report(
    xenpv: dict[str, dict[str, dict[str, float]]],
    nbdkit: dict[str, dict[str, float]] | None,
    seconds: float,
    image_mib: int,
    via_nbd: dict[str, dict[str, dict[str, float]]] | None = None,
) -> int:
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for config, results in xenpv.items():
        for name, r in results.items():
            ref = nbdkit.get(name) if nbdkit else None
            ratio = r["iops"] / ref["iops"] if ref and ref["iops"] else None
            rows.append(
                [
                    config,
                    name,
                    r["iops"],
                    r["mbps"],
                    r["lat_us"],
                    r["guest_cpu_us"],
                    r.get("backend_cpu_us", "-"),
                    ratio or "-",
                ]
            )
            summary.setdefault(name, {})[config] = round(r["iops"], 1)
    for config, results in (via_nbd or {}).items():
        for name, r in results.items():
            ref = nbdkit.get(name) if nbdkit else None
            ratio = r["iops"] / ref["iops"] if ref and ref["iops"] else None
            rows.append([config, name, r["iops"], r["mbps"], r["lat_us"], "-", "-"])
            rows[-1].append(ratio or "-")
    if nbdkit:
        for name, r in nbdkit.items():
            rows.append(["fio+nbdkit", name, r["iops"], r["mbps"], r["lat_us"], "-", "-", 1.0])
    nbd_ratios: dict[str, float | None] = {}
    for name in NBD_RATIOS:
        ours = (via_nbd or {}).get(NBD_HEADLINE, {}).get(name)
        ref = nbdkit.get(name) if nbdkit else None
        nbd_ratios[name] = (
            round(ours["iops"] / ref["iops"], 3) if ours and ref and ref["iops"] else None
        )
    headline = "4k/shm"
    ratios: dict[str, float | None] = {}
    for name in RATIOS:
        ours = xenpv.get(headline, {}).get(name)
        ref = nbdkit.get(name) if nbdkit else None
        ratios[name] = (
            round(ours["iops"] / ref["iops"], 3) if ours and ref and ref["iops"] else None
        )
    notes = [
        f"image {image_mib} MiB (filled), {seconds:.1f} s per workload; guest / backend µs = "
        "CPU time of the guest (bench) / backend process per I/O, warm-up included for the "
        "backend; /nbdkit = xenpv IOPS / fio+nbdkit IOPS; nbd/<page> = fio through "
        "`xenpv nbd` (NBD → blkfront → blkback) with that guest page size"
    ]
    if nbdkit is None:
        notes.append(f"fio+nbdkit comparison unavailable: install them with `{INSTALL_HINT}`")
    emit(
        {
            "summary": summary,
            "xenpv": xenpv,
            "nbdkit": nbdkit
            if nbdkit is not None
            else {"available": False, "install": INSTALL_HINT},
            "ratio_vs_nbdkit": ratios,
            "ratio_config": headline,
            "xenpv_nbd": via_nbd
            if via_nbd is not None
            else {"available": False, "install": INSTALL_HINT},
            "ratio_nbd_vs_nbdkit": nbd_ratios,
            "ratio_nbd_config": NBD_HEADLINE,
            "seconds": seconds,
        },
        title="blkfront ↔ blkback (IOPS; MB/s; mean latency µs)",
        columns=[
            "config",
            "workload",
            "IOPS",
            "MB/s",
            "lat µs",
            "guest µs",
            "backend µs",
            "/nbdkit",
        ],
        rows=rows,
        notes=notes,
    )
    return 0


def _fill_image(path: Path, size: int) -> None:
    chunk = random.Random(1).randbytes(MiB)
    with open(path, "wb") as f:
        for i in range(size // MiB):
            f.write(chunk[i % 997 :] + chunk[: i % 997])


# -- xenpv ---------------------------------------------------------------------------------------


async def _bench_xenpv(
    sup: Supervisor,
    workdir: Path,
    xs_address: str,
    image: Path,
    page_sizes: tuple[int, ...],
    transports: tuple[str, ...],
    seconds: float,
) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for transport in transports:
        for page_size in page_sizes:
            config = f"{page_size // 1024}k/{transport}"
            async with _guest(sup, workdir, xs_address, image, transport, page_size) as (
                front,
                pid,
            ):
                out[config] = {}
                for w in WORKLOADS:
                    os.sync()  # blocks the loop briefly: between workloads, nothing runs
                    before = _process_cpu(pid)
                    result = await _measure(front, w, seconds)
                    ops = result.pop("ops")
                    spent = _process_cpu(pid) - before
                    if ops and math.isfinite(spent):
                        result["backend_cpu_us"] = round(spent / ops * 1e6, 1)
                    out[config][w.name] = result
    return out


@asynccontextmanager
async def _guest(
    sup: Supervisor, workdir: Path, xs_address: str, image: Path, transport: str, page_size: int
) -> AsyncIterator[tuple[Any, int]]:
    """The attached frontend, and the backend child's pid (for its CPU time)."""
    from frontends.blkfront import attach
    from xenpv.hv import StaticDirectory, open_domain
    from xenpv.identity import DomainKey
    from xenpv.toolstack.devices import VbdConfig, create_vbd, destroy_device
    from xenpv.xenbus.core import DeviceId
    from xenpv.xenstore.client import connect

    device = DeviceId("vbd", GUEST, BACKEND, DEVID)
    keys = {d: DomainKey.generate(d) for d in (GUEST, BACKEND)}
    tag = f"{transport}{page_size}"
    backend_endpoint = f"unix:{workdir}/b{tag}.sock"
    directory = StaticDirectory()
    directory.register(BACKEND, backend_endpoint, keys[BACKEND].public_hex())
    async with (
        connect(xs_address) as xs,
        open_domain(
            domid=GUEST,
            key=keys[GUEST],
            directory=directory,
            endpoint=f"unix:{workdir}/g{tag}.sock",
            transport=transport,
            page_size=page_size,
            memory_bytes=128 * MiB,
        ) as dom,
    ):
        size = os.path.getsize(image)  # noqa: ASYNC240 - one stat of a local file
        await create_vbd(xs, device, VbdConfig(image=str(image), size=size))
        command = [sys.executable, "-m", "xenpv.bench.blk", "--backend-child", xs_address]
        command += [keys[BACKEND].seed_hex(), backend_endpoint, transport, str(GUEST)]
        command += [dom.endpoint, keys[GUEST].public_hex(), str(DEVID)]
        log_path = workdir / "logs" / f"backend-{tag}.log"
        child = await sup.spawn(
            f"backend-{tag}", "backend", command, log_path, env=child_env(), stdout=subprocess.PIPE
        )
        assert isinstance(child.proc, trio.Process)  # spawned, not forked: it has a stdout
        process = child.proc
        try:
            assert process.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("blk backend child exited early")
                line += chunk
            async with attach(dom, xs, device, queue_depth=32) as front:
                with trio.fail_after(30):
                    await front.wait_connected()
                yield front, process.pid
        finally:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
                # Bounded: after a Ctrl-C the store client's own reader is cancelled too.
                with trio.move_on_after(CLEANUP_TIMEOUT):
                    await destroy_device(xs, device)


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (-inf where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("-inf")


def _per_mib(counts: dict[str, Any]) -> dict[str, float]:
    """The guest's counts per MiB and per request, flat (JSON figures of each workload)."""
    return {
        key: float(value)
        for key, value in counts.items()
        if key.endswith(("_per_mib", "_per_request")) and isinstance(value, int | float)
    }


async def _measure(front: Any, w: Workload, seconds: float) -> dict[str, float]:
    """Keep `w.depth` I/Os in flight from one task through the frontend's submission /
    completion queue (`Blkfront.io_queue()`), as fio keeps its iodepth with an async
    engine; at depth 1 this is one I/O at a time, like `await read()`. Reads go into a
    buffer per slot, reused, as fio allocates its `iodepth` buffers once."""
    capacity = front.capacity
    blocks = capacity // w.bs
    data = random.Random(w.bs).randbytes(w.bs)
    write = "write" in w.rw
    sequential = not w.rw.startswith("rand")
    rng = random.Random(w.depth)
    position = 0
    queue = front.io_queue()
    free = [bytearray(w.bs) for _ in range(w.depth)]

    def submit() -> None:
        nonlocal position
        if sequential:
            block = position
            position = (position + 1) % blocks
        else:
            block = rng.randrange(blocks)
        if write:
            queue.write(block * w.bs, data, tag=(time.perf_counter(), None))
        else:
            buffer = free.pop()
            queue.readinto(block * w.bs, buffer, tag=(time.perf_counter(), buffer))

    total_ops = 0
    # a short warm-up (grants, persistent pool, page cache), then the measured run
    for span, measured in ((min(0.2, seconds / 4), False), (seconds, True)):
        ops, latency = 0, 0.0
        counted = snapshot()  # the guest's operation counts (docs/metrics.md)
        cpu = time.process_time()
        began = time.perf_counter()
        deadline = began + span
        for _ in range(w.depth):
            submit()
        while queue.in_flight:
            completions = await queue.wait()
            now = time.perf_counter()
            for done in completions:
                if done.error is not None:
                    raise done.error
                started, buffer = done.tag
                latency += now - started
                if buffer is not None:
                    free.append(buffer)
            ops += len(completions)
            if now < deadline:
                for _ in completions:
                    submit()
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu
        total_ops += ops
        if measured:
            iops = ops / elapsed
            return {
                "iops": round(iops, 1),
                "mbps": round(iops * w.bs / 1e6, 1),
                "lat_us": round(latency / max(ops, 1) * 1e6, 1),
                # the guest process's CPU per I/O (blkfront + its share of the hypervisor)
                "guest_cpu_us": round(cpu / max(ops, 1) * 1e6, 1),
                "ops": total_ops,
                **_per_mib(workload_counts(counted, snapshot(), GUEST, ops * w.bs)),
            }
    raise AssertionError("unreachable")


# -- fio through `xenpv nbd` -----------------------------------------------------------------------


def _bench_xenpv_nbd(
    sup: Supervisor, workdir: Path, image: Path, seconds: float
) -> dict[str, dict[str, dict[str, float]]] | None:
    """fio's nbd engine against `xenpv nbd IMAGE` (a guest exporting its vbd), per page size."""
    fio = shutil.which("fio")
    if fio is None:
        print(f"fio not found: `{INSTALL_HINT}` to drive the NBD export", file=sys.stderr)
        return None
    out: dict[str, dict[str, dict[str, float]]] = {}
    for page_size in NBD_PAGE_SIZES:
        config = f"nbd/{page_size // 1024}k"
        with _xenpv_nbd(sup, workdir, image, page_size) as sock:
            if sock is None:
                return None
            out[config] = {}
            for w in NBD_WORKLOADS:
                os.sync()
                result = _fio(sup, fio, sock, w, seconds)
                if result is None:
                    return None
                out[config][w.name] = result
    return out


@contextmanager
def _xenpv_nbd(
    sup: Supervisor, workdir: Path, image: Path, page_size: int
) -> Iterator[Path | None]:
    """`xenpv nbd` serving `image` from a guest of `page_size`; its socket once ready."""
    sock = workdir / f"pv{page_size // 1024}k.sock"
    read_fd, write_fd = os.pipe()
    args = [sys.executable, "-m", "xenpv", "--log-level", "warning", "nbd", str(image)]
    args += ["--page-size", str(page_size), "--socket", str(sock), "--ready-fd", str(write_fd)]
    args += ["--state-dir", str(workdir / f"nbd{page_size // 1024}k")]
    proc = subprocess.Popen(
        args,
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,
    )
    # `xenpv nbd` supervises its own guest: a SIGTERM lets it stop that first.
    log_path = workdir / "logs" / "nbd.log"
    recorded = sup.record(f"nbd-{page_size // 1024}k", SUPERVISOR, proc.pid, log_path)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], NBD_START_TIMEOUT)
        line = os.read(read_fd, 4096) if ready else b""
        if not line.startswith(b"READY"):
            proc.kill()
            _, err = proc.communicate()
            if not sup.interrupted:  # else the supervisor stopped it
                print(f"xenpv nbd did not start: {err.decode()[-300:]}", file=sys.stderr)
            yield None
            return
        yield sock
    finally:
        os.close(read_fd)
        supervisor.stop_popen(proc, 30)
        sup.forget(recorded)


# -- fio + nbdkit --------------------------------------------------------------------------------


def _bench_nbdkit(
    sup: Supervisor, workdir: Path, image: Path, seconds: float
) -> dict[str, dict[str, float]] | None:
    fio, nbdkit = shutil.which("fio"), shutil.which("nbdkit")
    if fio is None or nbdkit is None:
        print(
            f"fio and/or nbdkit not found: `{INSTALL_HINT}` to compare with them",
            file=sys.stderr,
        )
        return None
    sock = workdir / "nbd.sock"
    server = subprocess.Popen(
        [nbdkit, "--foreground", "--unix", str(sock), "file", f"file={image}"],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    recorded = sup.record("nbdkit", "backend", server.pid, workdir / "logs" / "nbdkit.log")
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)  # polling a child's socket file: no readiness line to wait on
        else:
            print("nbdkit did not create its socket", file=sys.stderr)
            return None
        out = {}
        for w in WORKLOADS:
            os.sync()
            result = _fio(sup, fio, sock, w, seconds)
            if result is None:
                return None
            out[w.name] = result
        return out
    finally:
        supervisor.stop_popen(server, 10)
        sup.forget(recorded)


def _fio(
    sup: Supervisor, fio: str, sock: Path, w: Workload, seconds: float
) -> dict[str, float] | None:
    command = [
        fio,
        "--name=bench",
        "--ioengine=nbd",
        f"--uri=nbd+unix:///?socket={sock}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.depth}",
        "--time_based",
        f"--runtime={max(1, round(seconds))}",
        f"--ramp_time={0.2 if seconds < 1 else 0.5}",
        "--output-format=json",
    ]
    if sup.interrupted:  # this thread outlived the bench's cancellation: start nothing
        return None
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    recorded = sup.record(f"fio-{w.name}", "guest", proc.pid, Path(os.devnull))
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        print(f"fio timed out ({w.name})", file=sys.stderr)
        return None
    finally:
        sup.forget(recorded)
    if proc.returncode != 0:
        if sup.interrupted:  # the supervisor stopped it
            return None
        print(f"fio failed ({w.name}): {stderr.strip()[:300]}", file=sys.stderr)
        return None
    job = json.loads(stdout[stdout.index("{") :])["jobs"][0]
    side = job["write"] if "write" in w.rw else job["read"]
    iops = float(side["iops"])
    return {
        "iops": round(iops, 1),
        "mbps": round(iops * w.bs / 1e6, 1),
        "lat_us": round(float(side["lat_ns"]["mean"]) / 1000, 1),
    }


# -- the backend child ---------------------------------------------------------------------------


async def _backend_child(argv: list[str]) -> None:
    from backends.blkback import serve
    from xenpv.hv import StaticDirectory, open_domain
    from xenpv.identity import DomainKey
    from xenpv.xenbus.core import DeviceId
    from xenpv.xenstore.client import connect

    xs_address, seed, endpoint, transport, guest, guest_endpoint, guest_pubkey, devid = argv
    directory = StaticDirectory()
    directory.register(int(guest), guest_endpoint, guest_pubkey)
    async with (
        open_domain(
            domid=BACKEND,
            key=DomainKey.from_seed_hex(BACKEND, seed),
            directory=directory,
            endpoint=endpoint,
            transport=transport,
            memory_bytes=64 * MiB,
        ) as dom,
        connect(xs_address) as xs,
    ):
        sys.stdout.write(json.dumps({"ready": dom.endpoint}) + "\n")
        sys.stdout.flush()
        await serve(dom, xs, DeviceId("vbd", int(guest), BACKEND, int(devid)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--backend-child"]:
        from xenpv import log

        log.configure("warning", json=True)
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(_backend_child, sys.argv[2:])
