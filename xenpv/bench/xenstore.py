"""`xenpv bench xenstore`: xenstored round trips, watch fan-out and behaviour at scale.

1. Round trips/s of READ, WRITE and an empty transaction (START + END) through the client
   library, with 1 and 32 concurrent clients (one connection each), against `xenpv
   xenstored` and, in the same run, against a do-nothing server on the same socket type
   (this module run as `python -m xenpv.bench.xenstore --null-server PATH`: the same
   reader / batched-writer structure, a canned reply per request, no store, no journal).
   ratio = xenstored per-op time / do-nothing per-op time (goal ≤ 1.5). Both servers are
   separate processes; the load generator is this process (2 cores shared). The server
   processes' CPU time per op (from /proc) is reported too: unlike wall time it barely
   moves when other work shares the machine.
2. Watch fan-out: 1000 watches on one path (20 per connection over 50 connections); latency
   from a WRITE to the moment the last of the 1000 events has reached its iterator.
3. Scale: per-op time of READ and WRITE (a) on the sans-IO Store in process and (b) through a
   real xenstored, with 100k nodes and 10k watches vs an empty store (goal ≤ 1.5).
`--quick` shrinks durations and the scale test (10k nodes / 1k watches) for CI.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from xenpv.bench.cli import Bench, option
from xenpv.bench.cli import child_env as child_env  # also imported from here
from xenpv.bench.report import emit
from xenpv.commands import args as types
from xenpv.errors import XenpvError
from xenpv.toolstack import supervisor
from xenpv.toolstack.supervisor import Supervisor
from xenpv.xenstore.client import Transaction, XenstoreClient, connect
from xenpv.xenstore.store import Store
from xenpv.xenstore.wire import FrameReader, Message, XsType, join_strings

CLIENT_COUNTS = (1, 32)
_PIDS: dict[str, int] = {}  # server address -> pid, for its CPU time
FANOUT_WATCHERS = 1000
FANOUT_PER_CONNECTION = 20


BENCH = Bench(
    "xenstore",
    help="xenstored round trips vs a do-nothing server, watch fan-out, scale",
    options=(
        option("--dir", type=types.existing_dir, default=None, help="directory for the data dir"),
    ),
)


def run(args: argparse.Namespace) -> int:
    seconds = 0.4 if args.quick else 1.0
    rounds = 1 if args.quick else 3
    nodes, watches = (10_000, 1_000) if args.quick else (100_000, 10_000)
    fanout_rounds = 5 if args.quick else 30
    measured: dict[str, Any] = {}

    async def main(sup: Supervisor, workdir: Path) -> int:
        measured.update(
            await _bench_all(sup, workdir, seconds, rounds, nodes, watches, fanout_rounds)
        )
        return 0

    code = supervisor.run_in_temp_dir("xsbench", main, Supervisor(), parent=args.dir)
    if code != 0:
        return code
    result = measured
    rows: list[list[Any]] = []
    for op, by_clients in result["round_trips"].items():
        for clients, r in by_clients.items():
            rows.append(
                [
                    f"{op} x{clients}",
                    r["xenstored_ops"],
                    r["null_ops"],
                    r["us_per_op"],
                    r["ratio"],
                    r["xenstored_cpu_us"],
                    r["null_cpu_us"],
                    r["cpu_ratio"],
                ]
            )
    fan = result["watch_fanout"]
    scale = result["scale"]
    notes = [
        f"fdatasync in the data dir: median {result['fsync_us']:.0f} µs (a 1-client WRITE "
        "waits for one; concurrent writes share one per group commit)",
        f"watch fan-out to {fan['watchers']} watchers: median {fan['median_ms']:.2f} ms, "
        f"p90 {fan['p90_ms']:.2f} ms, max {fan['max_ms']:.2f} ms",
    ]
    for level in ("store", "server"):
        s = scale[level]
        notes.append(
            f"{level} at {s['nodes']} nodes / {s['watches']} watches vs empty: "
            f"read {s['read_us_empty']:.1f} → {s['read_us_big']:.1f} µs (x{s['read_ratio']:.2f}), "
            f"write {s['write_us_empty']:.1f} → {s['write_us_big']:.1f} µs "
            f"(x{s['write_ratio']:.2f})"
        )
    emit(
        result,
        title="xenstored round trips/s (ratio = per-op time vs do-nothing server; goal ≤ 1.5)",
        columns=[
            "op x clients",
            "xenstored ops/s",
            "do-nothing ops/s",
            "µs/op",
            "ratio",
            "server CPU µs/op",
            "do-nothing CPU µs/op",
            "CPU ratio",
        ],
        rows=rows,
        notes=notes,
    )
    return 0


# -- servers ---------------------------------------------------------------------------------


@contextmanager
def _spawn(
    args: list[str], ready_fd_flag: str = "--ready-fd", *, sup: Supervisor | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A server child until the block ends; with `sup`, recorded by it (which stops it on a
    Ctrl-C) and started in its own session, as the supervisor's children are."""
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", *args, ready_fd_flag, str(write_fd)],
        pass_fds=(write_fd,),
        stderr=subprocess.DEVNULL,
        env=child_env(),
        start_new_session=sup is not None,
    )
    recorded = None if sup is None else sup.record(args[0], "xenstored", proc.pid, Path(os.devnull))
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], 60)
        line = os.read(read_fd, 4096) if ready else b""
        os.close(read_fd)
        if not line.startswith(b"READY"):
            raise RuntimeError(f"server {args[0]} did not start")
        yield proc
    finally:
        supervisor.stop_popen(proc, 30)
        if recorded is not None and sup is not None:
            sup.forget(recorded)


@contextmanager
def spawned_xenstored(workdir: Path, name: str, *, sup: Supervisor | None = None) -> Iterator[str]:
    """`xenpv xenstored` on `workdir/NAME.sock` (data in `workdir/NAME.data`) until the block
    ends; its address once it reports ready."""
    sock = str(workdir / f"{name}.sock")
    data = workdir / f"{name}.data"
    with _spawn(
        ["xenpv", "--log-level", "warning", "xenstored", "--socket", sock, "--data-dir", str(data)],
        sup=sup,
    ) as proc:
        _PIDS[f"unix:{sock}"] = proc.pid
        yield f"unix:{sock}"


async def supervised_xenstored(sup: Supervisor, workdir: Path, name: str) -> str:
    """`spawned_xenstored` for an async bench: the supervisor starts and records it (and
    stops it with the rest); its address once it reports ready."""
    sock = str(workdir / f"{name}.sock")
    data = workdir / f"{name}.data"
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    args = [sys.executable, "-m", "xenpv", "--log-level", "warning", "xenstored"]
    args += ["--socket", sock, "--data-dir", str(data), "--ready-fd", str(write_fd)]
    (workdir / "logs").mkdir(exist_ok=True)
    log_path = workdir / "logs" / f"{name}.log"
    try:
        child = await sup.spawn(
            name, "xenstored", args, log_path, pass_fds=(write_fd,), env=child_env()
        )
    finally:
        os.close(write_fd)
    line = b""
    async with trio.lowlevel.FdStream(read_fd) as stream:
        with trio.move_on_after(60):
            while not line.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                line += chunk
    if not line.startswith(b"READY"):
        raise XenpvError(f"xenstored did not start: {child.tail()[-300:]}")
    _PIDS[f"unix:{sock}"] = child.pid
    return f"unix:{sock}"


@contextmanager
def _null_server(workdir: Path, sup: Supervisor) -> Iterator[str]:
    sock = str(workdir / "null.sock")
    with _spawn(["xenpv.bench.xenstore", "--null-server", sock], sup=sup) as proc:
        _PIDS[f"unix:{sock}"] = proc.pid
        yield f"unix:{sock}"


def _null_reply(msg: Message) -> Message:
    if msg.type == XsType.XS_READ:
        return msg.reply(b"value")
    if msg.type == XsType.XS_TRANSACTION_START:
        return msg.reply(b"1\0")
    return msg.ok()


async def _null_conn(stream: trio.SocketStream) -> None:
    """Same shape as xenstored's connection: reader + single batched writer."""
    queue: list[bytes] = []
    wake = trio.Event()

    async def writer() -> None:
        nonlocal wake
        while True:
            if not queue:
                wake = trio.Event()
                await wake.wait()
                continue
            data = b"".join(queue)
            queue.clear()
            await stream.send_all(data)

    frames = FrameReader()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while data := await stream.receive_some(65536):
                for msg in frames.feed(data):
                    queue.append(_null_reply(msg).encode())
                wake.set()
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _null_main(path: str, ready_fd: int) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    os.write(ready_fd, b"READY\n")
    os.close(ready_fd)
    await trio.serve_listeners(_null_conn, [trio.SocketListener(sock)])


# -- measurements ----------------------------------------------------------------------------


async def _bench_all(
    sup: Supervisor,
    workdir: Path,
    seconds: float,
    rounds: int,
    nodes: int,
    watches: int,
    fanout_rounds: int,
) -> dict[str, Any]:
    round_trips: dict[str, dict[str, dict[str, float]]] = {}
    with (
        spawned_xenstored(workdir, "main", sup=sup) as real,
        _null_server(workdir, sup) as null,
    ):
        for op in ("read", "write", "transaction"):
            round_trips[op] = {}
            for clients in CLIENT_COUNTS:
                # Alternate the two servers and keep each one's best run: the machine is
                # shared, and interference only ever makes a run slower.
                ours = theirs = 0.0
                ours_cpu = theirs_cpu = float("inf")
                for _ in range(rounds):
                    rate, cpu = await _throughput_cpu(real, op, clients, seconds)
                    ours, ours_cpu = max(ours, rate), min(ours_cpu, cpu)
                    rate, cpu = await _throughput_cpu(null, op, clients, seconds)
                    theirs, theirs_cpu = max(theirs, rate), min(theirs_cpu, cpu)
                round_trips[op][str(clients)] = {
                    "xenstored_ops": ours,
                    "null_ops": theirs,
                    "us_per_op": 1e6 / ours,
                    "ratio": theirs / ours,
                    # Server CPU per op: robust to a busy machine, unlike wall time.
                    "xenstored_cpu_us": ours_cpu,
                    "null_cpu_us": theirs_cpu,
                    "cpu_ratio": ours_cpu / theirs_cpu if theirs_cpu else 0.0,
                }
        fanout = await _fanout(real, fanout_rounds)
    store_scale = _store_scale(nodes, watches)
    with (
        spawned_xenstored(workdir, "empty", sup=sup) as empty,
        spawned_xenstored(workdir, "big", sup=sup) as big,
    ):
        times = await _populate_and_compare(empty, big, nodes, watches, seconds, rounds)
    ratios = [r["ratio"] for by in round_trips.values() for r in by.values()]
    fsync_us = _fsync_latency_us(workdir)
    return {
        "round_trips": round_trips,
        "watch_fanout": fanout,
        "scale": {
            "store": store_scale["store"],
            "server": _scale_row(nodes, watches, times[0], times[1]),
        },
        "goals": {
            "max_ratio_vs_null": max(ratios),
            "store_scale_ratio": max(
                store_scale["store"]["read_ratio"], store_scale["store"]["write_ratio"]
            ),
        },
        "fsync_us": fsync_us,
        "quick": nodes < 100_000,
    }


def _fsync_latency_us(workdir: Path, n: int = 200) -> float:
    """Median fdatasync of a small append in the data directory's file system."""
    samples = []
    fd = os.open(workdir / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            os.write(fd, b"x" * 64)
            start = time.perf_counter()
            os.fdatasync(fd)
            samples.append((time.perf_counter() - start) * 1e6)
    finally:
        os.close(fd)
    return statistics.median(samples)


async def _run_op(xs: XenstoreClient, op: str, path: str) -> None:
    if op == "read":
        await xs.read(path)
    elif op == "write":
        await xs.write(path, "value")
    else:

        async def empty(tx: Transaction) -> None:
            return None

        await xs.transact(empty)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput_cpu(
    address: str, op: str, clients: int, seconds: float
) -> tuple[float, float]:
    """(ops/s, server CPU µs per op)."""
    pid = _PIDS[address]
    before = _cpu_seconds(pid)
    ops_before = _OPS[0]
    rate = await _throughput(address, op, clients, seconds)
    ops = _OPS[0] - ops_before
    return rate, (_cpu_seconds(pid) - before) / max(ops, 1) * 1e6


_OPS = [0]  # operations completed by _throughput, setup writes included


async def _throughput(address: str, op: str, clients: int, seconds: float) -> float:
    count = 0
    async with _clients(address, clients) as conns:
        for i, xs in enumerate(conns):
            await xs.write(f"/bench/{i}", "value")
            _OPS[0] += 1
        deadline = trio.current_time() + seconds

        async def loop(i: int, xs: XenstoreClient) -> None:
            nonlocal count
            path = f"/bench/{i}"
            while trio.current_time() < deadline:
                await _run_op(xs, op, path)
                count += 1
                _OPS[0] += 1

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, xs in enumerate(conns):
                nursery.start_soon(loop, i, xs)
        elapsed = time.perf_counter() - start
    return count / elapsed


class _clients:
    """`async with _clients(address, n) as [client, ...]`."""

    def __init__(self, address: str, n: int) -> None:
        self.address = address
        self.n = n
        self._stack: Any = None

    async def __aenter__(self) -> list[XenstoreClient]:
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()
        await self._stack.__aenter__()
        return [await self._stack.enter_async_context(connect(self.address)) for _ in range(self.n)]

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)


async def _fanout(address: str, rounds: int) -> dict[str, float]:
    latencies: list[float] = []
    connections = FANOUT_WATCHERS // FANOUT_PER_CONNECTION
    async with _clients(address, connections + 1) as conns:
        writer, watchers = conns[0], conns[1:]
        await writer.write("/fan", "0")
        received = 0
        all_in = trio.Event()
        registered = 0
        all_registered = trio.Event()

        async def watcher(xs: XenstoreClient, token: str) -> None:
            nonlocal received, registered, all_in
            async with xs.watch("/fan", token) as events:
                await events.__anext__()  # the initial event
                registered += 1
                if registered == FANOUT_WATCHERS:
                    all_registered.set()
                async for _ in events:
                    received += 1
                    if received == FANOUT_WATCHERS:
                        all_in.set()

        async with trio.open_nursery() as nursery:
            for c, xs in enumerate(watchers):
                for w in range(FANOUT_PER_CONNECTION):
                    nursery.start_soon(watcher, xs, f"t{c}-{w}")
            await all_registered.wait()
            for r in range(rounds):
                received = 0
                all_in = trio.Event()
                start = time.perf_counter()
                await writer.write("/fan", str(r))
                await all_in.wait()
                latencies.append((time.perf_counter() - start) * 1e3)
            nursery.cancel_scope.cancel()
    latencies.sort()
    return {
        "watchers": FANOUT_WATCHERS,
        "connections": connections,
        "rounds": rounds,
        "median_ms": statistics.median(latencies),
        "p90_ms": latencies[int(0.9 * (len(latencies) - 1))],
        "max_ms": latencies[-1],
    }


def _store_scale(nodes: int, watches: int) -> dict[str, Any]:
    """Per-op time of Store.handle, empty vs populated (sans-IO, no sockets).

    The two stores are measured alternately, 7 short rounds each, keeping each one's best
    round: interference from other processes only ever makes a round slower.
    """

    def measure(store: Store, conn: int, n: int = 5_000) -> tuple[float, float]:
        read = Message(XsType.XS_READ, 1, 0, b"/bench/probe/x\0")
        start = time.perf_counter()
        for i in range(n):
            store.handle(conn, Message(XsType.XS_WRITE, i, 0, b"/bench/probe/x\0value"))
        write_us = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            store.handle(conn, read)
        return (time.perf_counter() - start) / n * 1e6, write_us

    empty = Store()
    empty_conn = empty.connect(0)
    big = Store()
    big_conn = big.connect(0)
    _fill_store(big, big_conn, nodes, watches)
    best_empty = best_big = (float("inf"), float("inf"))
    for _ in range(7):
        e = measure(empty, empty_conn)
        b = measure(big, big_conn)
        best_empty = (min(best_empty[0], e[0]), min(best_empty[1], e[1]))
        best_big = (min(best_big[0], b[0]), min(best_big[1], b[1]))
    return {"store": _scale_row(nodes, watches, best_empty, best_big)}


def _tree_path(i: int) -> str:
    return f"/big/{i % 100}/{(i // 100) % 100}/n{i}"


def _fill_store(store: Store, conn: int, nodes: int, watches: int) -> None:
    for i in range(nodes):
        store.handle(conn, Message(XsType.XS_WRITE, 1, 0, _tree_path(i).encode() + b"\0v"))
    watchers = [store.connect(0) for _ in range(10)]
    for i in range(watches):
        payload = join_strings(_tree_path(i * (nodes // watches)), f"w{i}")
        store.handle(watchers[i % 10], Message(XsType.XS_WATCH, 1, 0, payload))
    assert store.node_count() >= nodes and store.watch_count() >= watches


def _scale_row(
    nodes: int, watches: int, empty: tuple[float, float], big: tuple[float, float]
) -> dict[str, float]:
    return {
        "nodes": nodes,
        "watches": watches,
        "read_us_empty": empty[0],
        "write_us_empty": empty[1],
        "read_us_big": big[0],
        "write_us_big": big[1],
        "read_ratio": big[0] / empty[0] if empty[0] else 0.0,
        "write_ratio": big[1] / empty[1] if empty[1] else 0.0,
    }


async def _server_op_times(address: str, seconds: float) -> tuple[float, float]:
    read = await _throughput(address, "read", 1, seconds)
    write = await _throughput(address, "write", 1, seconds)
    return 1e6 / read, 1e6 / write


async def _populate_and_compare(
    empty: str, big: str, nodes: int, watches: int, seconds: float, rounds: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Fill `big`, then alternate 1-client op timings on both; best (lowest) of each."""
    async with _clients(big, 11) as conns:
        writer, watchers = conns[0], conns[1:]
        batch = 1000

        def fill(start: int) -> Callable[[Transaction], Awaitable[None]]:
            async def body(tx: Transaction) -> None:
                async with trio.open_nursery() as nursery:
                    for i in range(start, min(start + batch, nodes)):
                        nursery.start_soon(tx.write, _tree_path(i), "v")

            return body

        for start in range(0, nodes, batch):
            await writer.transact(fill(start))
        async with trio.open_nursery() as nursery:

            async def watch_forever(xs: XenstoreClient, i: int, ready: trio.Event) -> None:
                async with xs.watch(_tree_path(i * (nodes // watches)), f"w{i}"):
                    ready.set()
                    await trio.sleep_forever()

            for i in range(watches):
                ready = trio.Event()
                nursery.start_soon(watch_forever, watchers[i % 10], i, ready)
                await ready.wait()
            best_empty = best_big = (float("inf"), float("inf"))
            for _ in range(rounds):
                e = await _server_op_times(empty, seconds)
                b = await _server_op_times(big, seconds)
                best_empty = (min(best_empty[0], e[0]), min(best_empty[1], e[1]))
                best_big = (min(best_big[0], b[0]), min(best_big[1], b[1]))
            nursery.cancel_scope.cancel()
    return best_empty, best_big


def _main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--null-server" and sys.argv[3] == "--ready-fd":
        trio.run(_null_main, sys.argv[2], int(sys.argv[4]))
        return
    raise SystemExit("usage: python -m xenpv.bench.xenstore --null-server PATH --ready-fd N")


if __name__ == "__main__":
    _main()
