"""`xenpv bench net`: guest-to-guest frame rates through the PV network path, and TCP over it.

Topology: a backend domain 0 running netback for each vif and the learning switch (in this
process), and two 4 KiB-page guests with netfront (by default together in a second process,
`python -m xenpv.bench.net CONFIG`, so backend and guests use two cores as separate domain
processes would; `--no-processes` puts every domain in this process). For each transport
(socket copy, shared memory):
- guest-to-guest: guest 1 sends frames of 64, 1500 and 9000 bytes and 64 KiB GSO frames
  (65535 bytes, TCPv4, MSS 1448) to guest 2 as fast as `send()` accepts them for a fixed
  time; we count what guest 2 receives (frames the backend drops when guest 2 falls behind
  are not counted: the rate is what is delivered);
- TAP iperf3: each guest's netfront carries a TAP device (`xenpv-tap`) in its own network
  namespace, and iperf3 runs a TCP stream between the namespaces over the PV path
  (TSO/checksum offloads carried through), as in tests/integration/test_net_tap.py.
In the same run, iperf3 over a plain veth pair between two namespaces gives the kernel's
own figure for comparison. TAP and veth need root and iperf3; without them those figures are
reported as "unavailable" with the reason (the bench installs nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from backends import netback
from backends.switch import LiveSwitch
from frontends.netfront import Netfront, attach
from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.bench.cli import Bench, chosen_transports, option, run_supervised
from xenpv.bench.report import emit
from xenpv.bench.xenstore import spawned_xenstored
from xenpv.commands import args as types
from xenpv.hv import XEN_PAGE_SIZE, StaticDirectory, open_domain
from xenpv.identity import DomainKey
from xenpv.metrics.counts import workload_counts
from xenpv.metrics.registry import snapshot
from xenpv.toolstack.devices import create_vif
from xenpv.toolstack.supervisor import Supervisor
from xenpv.xenbus.core import DeviceId
from xenpv.xenstore.client import connect

SIZES = (64, 1500, 9000, 65535)
GUESTS = (1, 2)
IPERF_PACKAGE = "iperf3"


BENCH = Bench(
    "net",
    help="guest-to-guest frames/s and Mbit/s over netfront/netback; iperf3 TAP vs veth",
    seconds=2.0,
    seconds_help="time per frame size",
    transport=True,
    options=(
        option(
            "--iperf-seconds", type=types.positive_float, default=5.0, help="time per iperf3 run"
        ),
        option("--queues", type=types.int_range(1, 4), default=1, help="netfront queues per vif"),
        option(
            "--processes",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="guests in a process of their own, the backend in this one (default); "
            "--no-processes runs every domain in this process",
        ),
    ),
)


def run(args: argparse.Namespace) -> int:
    seconds = 0.3 if args.quick else args.seconds
    iperf_seconds = 1.0 if args.quick else args.iperf_seconds
    transports = chosen_transports(args)
    missing = _iperf_missing()
    results: dict[str, Any] = {"guest_to_guest": {}, "tap_iperf3": {}}
    rows: list[list[Any]] = []
    rtt_by_transport: dict[str, dict[str, float]] = {}
    tap_udp: dict[str, dict[str, Any]] = {}
    tap_rtt: dict[str, dict[str, Any]] = {}

    def measure(
        pair: Callable[..., Awaitable[dict[str, Any]]], transport: str, seconds: float
    ) -> tuple[int, dict[str, Any] | None]:
        """`pair` (a two-guest measurement) under a supervisor, with the bench's options."""
        return run_supervised(
            functools.partial(
                pair,
                transport=transport,
                seconds=seconds,
                queues=args.queues,
                processes=args.processes,
            )
        )

    for transport in transports:
        code, measured = measure(_guest_to_guest, transport, seconds)
        if measured is None:
            return code
        g2g = measured
        rtt_by_transport[transport] = g2g.pop("rtt_us")
        rows.append(
            [
                transport,
                "guest→guest round trip 64 B, µs (median / p99)",
                "",
                f"{rtt_by_transport[transport]['median']} / {rtt_by_transport[transport]['p99']}",
            ]
        )
        results["guest_to_guest"][transport] = g2g
        for size, r in g2g.items():
            rows.append([transport, f"guest→guest {size} B", r["frames_per_s"], r["mbps"]])
        if missing:
            tap = _unavailable(missing)
        else:
            code, measured = measure(_tap_iperf, transport, iperf_seconds)
            if measured is None:
                return code
            tap = measured
        tap_udp[transport] = tap.pop("udp_64", _unavailable(missing))
        tap_rtt[transport] = tap.pop("rtt_us", _unavailable(missing))
        results["tap_iperf3"][transport] = tap
        rows.append([transport, "iperf3 over TAP + PV path", "", tap.get("mbps", tap["status"])])
        udp = tap_udp[transport]
        rows.append([transport, "iperf3 UDP 64 B over TAP + PV path", *_udp_cells(udp)])
        rows.append([transport, "round trip 64 B over TAP, µs", "", _rtt_cell(tap_rtt[transport])])
    veth = _unavailable(missing) if missing else _veth_iperf(iperf_seconds)
    if veth.get("status") == "interrupted":
        return int(veth["code"])
    veth_udp = veth.pop("udp_64", _unavailable(missing))
    veth_rtt = veth.pop("rtt_us", _unavailable(missing))
    rows.append(["kernel", "iperf3 over veth", "", veth.get("mbps", veth["status"])])
    rows.append(["kernel", "iperf3 UDP 64 B over veth", *_udp_cells(veth_udp)])
    rows.append(["kernel", "round trip 64 B over veth, µs", "", _rtt_cell(veth_rtt)])
    best = "shm" if "shm" in results["guest_to_guest"] else transports[0]
    results["guest_to_guest_mbps"] = {
        ("64k_gso" if size == "65535" else size): r["mbps"]
        for size, r in results["guest_to_guest"][best].items()
    }
    results["guest_to_guest_transport"] = best
    results["tap_iperf3_mbps"] = results["tap_iperf3"][best].get("mbps")
    results["veth_iperf3_mbps"] = veth.get("mbps")
    results["veth_iperf3"] = veth
    results["rtt_us"] = {
        "guest_to_guest": rtt_by_transport[best],
        "guest_to_guest_by_transport": rtt_by_transport,
        "tap": tap_rtt[best],
        "tap_by_transport": tap_rtt,
        "veth": veth_rtt,
    }
    results["udp_64_iperf3"] = {"tap": tap_udp[best], "tap_by_transport": tap_udp, "veth": veth_udp}
    where = "guests and backend in two processes" if args.processes else "one process"
    notes = [
        f"top-level figures are for the {best} transport; queues per vif: {args.queues}; {where}"
    ]
    results["processes"] = args.processes
    if missing:
        notes.append(f"iperf3 figures unavailable: {missing}")
    emit(
        results,
        title="xenpv bench net",
        columns=["transport", "scenario", "frames/s", "Mbit/s"],
        rows=rows,
        notes=notes,
    )
    return 0


# --- topology -------------------------------------------------------------------------------


def _mac(domid: int) -> bytes:
    return bytes([0x00, 0x16, 0x3E, 0x00, 0x00, domid])


@asynccontextmanager
async def _backend(
    workdir: Path, address: str, transport: str, taps: dict[int, str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Domain 0 with netback and the switch, vifs for guests 1 and 2; yields what a guest
    process needs to join (keys, endpoints, xenstore address)."""
    directory = StaticDirectory()
    keys = {domid: DomainKey.generate(domid) for domid in (0, *GUESTS)}
    for domid in GUESTS:
        directory.register(domid, f"unix:{workdir}/d{domid}.sock", keys[domid].public_hex())
    async with AsyncExitStack() as stack:
        dom0 = await stack.enter_async_context(
            open_domain(
                domid=0,
                key=keys[0],
                directory=directory,
                endpoint=f"unix:{workdir}/d0.sock",
                transport=transport,
                memory_bytes=32 << 20,
            )
        )
        xs = await stack.enter_async_context(connect(address))
        switch: LiveSwitch[Any] = LiveSwitch(queue_depth=1024)
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for domid in GUESTS:
            device = DeviceId("vif", domid, 0, 0)
            mac = ":".join(f"{b:02x}" for b in _mac(domid))
            await create_vif(xs, device, mac=mac, tap=(taps or {}).get(domid))
            nursery.start_soon(netback.serve, dom0, xs, device, switch)
        yield {
            "xenstore": address,
            "transport": transport,
            "workdir": str(workdir),
            "seeds": {str(domid): keys[domid].seed_hex() for domid in GUESTS},
            "backend": [0, dom0.endpoint, keys[0].public_hex()],
            "pubkeys": {str(domid): keys[domid].public_hex() for domid in GUESTS},
        }


@asynccontextmanager
async def _guests(config: dict[str, Any], queues: int) -> AsyncIterator[list[Netfront]]:
    """Guests 1 and 2 (4 KiB pages) with their netfronts, connected."""
    directory = StaticDirectory()
    directory.register(*config["backend"])
    workdir = config["workdir"]
    for domid in GUESTS:
        directory.register(domid, f"unix:{workdir}/d{domid}.sock", config["pubkeys"][str(domid)])
    async with AsyncExitStack() as stack:
        xs = await stack.enter_async_context(connect(config["xenstore"]))
        fronts = []
        for domid in GUESTS:
            dom = await stack.enter_async_context(
                open_domain(
                    domid=domid,
                    key=DomainKey.from_seed_hex(domid, config["seeds"][str(domid)]),
                    directory=directory,
                    endpoint=f"unix:{workdir}/d{domid}.sock",
                    transport=config["transport"],
                    page_size=XEN_PAGE_SIZE,
                    memory_bytes=64 << 20,
                )
            )
            device = DeviceId("vif", domid, 0, 0)
            fronts.append(
                await stack.enter_async_context(attach(dom, xs, device, max_queues=queues))
            )
        with trio.fail_after(30):
            for front in fronts:
                await front.wait_connected()
        yield fronts


@asynccontextmanager
async def _guest_process(
    sup: Supervisor, tmp: Path, config: dict[str, Any]
) -> AsyncIterator[trio.Process]:
    """`python -m xenpv.bench.net CONFIG`: the guests in a process of their own, recorded
    by `sup`; it prints READY once connected (and, for "g2g", one JSON line of results)."""
    (tmp / "logs").mkdir(exist_ok=True)
    child = await sup.spawn(
        "guests",
        "guest",
        [sys.executable, "-m", "xenpv.bench.net", json.dumps(config)],
        tmp / "logs" / "guests.log",
        stdout=subprocess.PIPE,
    )
    assert isinstance(child.proc, trio.Process)  # spawned, not forked: it has a stdout
    process = child.proc
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def _lines(process: trio.Process) -> AsyncIterator[str]:
    assert process.stdout is not None
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"guest process exited (rc={process.poll()})")
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        yield line.decode()


async def _child(config: dict[str, Any]) -> None:
    async with _guests(config, config["queues"]) as (a, b):
        print("READY", flush=True)
        if config["mode"] == "g2g":
            out: dict[str, Any] = {
                str(size): await _stream(a, b, size, config["seconds"]) for size in SIZES
            }
            out["rtt_us"] = await _ping_pong(a, b, config["seconds"])
            print(json.dumps(out), flush=True)
        await trio.sleep_forever()  # until the parent kills us


def _frame(dst: bytes, src: bytes, size: int) -> bytes:
    """An IPv4/TCP frame of `size` bytes (a 64-byte one is headers plus 10 payload bytes)."""
    payload = bytes(max(0, size - 54))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, 1, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        40 + len(payload),
        0,
        0x4000,
        64,
        6,
        0,
        bytes([10, 9, 0, 1]),
        bytes([10, 9, 0, 2]),
    )
    return (dst + src + b"\x08\x00" + ip + tcp + payload)[:size]


async def _guest_to_guest(
    sup: Supervisor, transport: str, seconds: float, queues: int, processes: bool
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="xnb", dir="/tmp") as tmp,
        spawned_xenstored(Path(tmp), "xs", sup=sup) as address,
    ):
        async with _backend(Path(tmp), address, transport) as config:
            if not processes:
                async with _guests(config, queues) as (a, b):
                    out: dict[str, Any] = {
                        str(size): await _stream(a, b, size, seconds) for size in SIZES
                    }
                    out["rtt_us"] = await _ping_pong(a, b, seconds)
                    return out
            config.update(mode="g2g", seconds=seconds, queues=queues)
            async with _guest_process(sup, Path(tmp), config) as process:
                lines = _lines(process)
                async for line in lines:
                    if line.startswith("{"):
                        result: dict[str, Any] = json.loads(line)
                        return result
            raise RuntimeError("guest process gave no result")


async def _stream(a: Netfront, b: Netfront, size: int, seconds: float) -> dict[str, Any]:
    frame = _frame(b.mac, a.mac, size)
    gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4) if size > 9000 else None
    csum = gso is not None
    received = 0
    last = 0.0
    sent = 0
    target: int | None = None
    tail = trio.Event()
    counted = snapshot()  # the guests' operation counts (docs/metrics.md)
    start = time.perf_counter()
    deadline = start + seconds

    async def receiver() -> None:
        nonlocal received, last
        while True:
            got = await b.receive()
            if len(got.frame) != size:
                continue  # the tail of the previous size's stream
            received += 1
            last = time.perf_counter()
            if target is not None and received >= target:
                tail.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        while time.perf_counter() < deadline:
            for _ in range(32):
                await a.send(frame, gso=gso, csum_blank=csum)
            sent += 32
        target = sent
        if received >= target:
            tail.set()
        with trio.move_on_after(0.5):  # let the tail arrive (dropped frames never will)
            await tail.wait()
        nursery.cancel_scope.cancel()
    elapsed = max(last - start, 1e-9)
    return {
        "frames_per_s": received / elapsed,
        "mbps": received * size * 8 / elapsed / 1e6,
        "sent": sent,
        "received": received,
        # the sending guest's grants and events; ring slots of both guests (one process)
        "counts": workload_counts(counted, snapshot(), GUESTS[0], received * size),
    }


PING_SIZE = 64
PING_MIN_ROUND_TRIPS = 20


async def _ping_pong(a: Netfront, b: Netfront, seconds: float) -> dict[str, float]:
    """Ping-style round trips of one 64-byte frame a -> b -> a, one in flight: median and p99
    in µs (the latency path, nothing amortised over a batch)."""
    there = _frame(b.mac, a.mac, PING_SIZE)
    back = _frame(a.mac, b.mac, PING_SIZE)
    samples: list[float] = []

    async def one() -> None:
        await a.send(there)
        while len((await b.receive()).frame) != PING_SIZE:
            pass  # the tail of the streams before
        await b.send(back)
        while len((await a.receive()).frame) != PING_SIZE:
            pass

    deadline = time.perf_counter() + seconds
    with trio.fail_after(max(10.0, 4 * seconds)):  # a lost frame fails the run, never hangs it
        while time.perf_counter() < deadline or len(samples) < PING_MIN_ROUND_TRIPS:
            started = time.perf_counter()
            await one()
            samples.append((time.perf_counter() - started) * 1e6)
    return _percentiles(samples)


def _rtt_cell(rtt: dict[str, Any]) -> str:
    if "median" not in rtt:
        return str(rtt.get("status"))
    return f"{rtt['median']} / {rtt['p99']} (median / p99)"


def _udp_cells(udp: dict[str, Any]) -> list[Any]:
    if "mbps" not in udp:
        return ["", udp.get("status")]
    return [round(udp["packets_per_s"]), round(udp["mbps"], 1)]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"median": round(statistics.median(ordered), 1), "p99": round(p99, 1)}


# --- iperf3 ---------------------------------------------------------------------------------


def _iperf_missing() -> str:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    for tool in ("ip", IPERF_PACKAGE):
        if shutil.which(tool) is None:
            package = "iproute2" if tool == "ip" else IPERF_PACKAGE
            return f"{tool} not found (apt-get install {package})"
    return ""


def _unavailable(reason: str) -> dict[str, Any]:
    return {"status": "unavailable", "reason": reason, "install": IPERF_PACKAGE}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class _Namespaces:
    def __init__(self, prefix: str) -> None:
        tag = f"{random.getrandbits(20):05x}"
        self.names = (f"{prefix}-{tag}-a", f"{prefix}-{tag}-b")
        self.tag = tag

    def __enter__(self) -> tuple[str, str]:
        for name in self.names:
            _ip("netns", "add", name)
        return self.names

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


def _iperf_result(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        end = data["end"]
        return {
            "status": "ok",
            "mbps": end["sum_received"]["bits_per_second"] / 1e6,
            "retransmits": end["sum_sent"].get("retransmits"),
        }
    except (ValueError, KeyError, TypeError):
        return {"status": "failed", "output": raw[-300:].decode(errors="replace")}


def _iperf_udp_result(raw: bytes) -> dict[str, Any]:
    """A UDP run's figures: what arrived (sent rate less the loss the server reported)."""
    try:
        total = json.loads(raw)["end"]["sum"]
        delivered = 1.0 - float(total.get("lost_percent", 0.0)) / 100.0
        return {
            "status": "ok",
            "mbps": total["bits_per_second"] * delivered / 1e6,
            "packets_per_s": total["packets"] * delivered / max(total["seconds"], 1e-9),
            "lost_percent": total.get("lost_percent"),
        }
    except (ValueError, KeyError, TypeError):
        return {"status": "failed", "output": raw[-300:].decode(errors="replace")}


async def _measure_between(
    sup: Supervisor, ns_server: str, ns_client: str, address: str, seconds: float
) -> dict[str, Any]:
    """iperf3 TCP (its figures at the top level, as before), then iperf3 UDP with 64-byte
    datagrams (`udp_64`), then a ping-style UDP round trip (`rtt_us`), client -> server."""
    result = await _iperf_between(sup, ns_server, ns_client, address, seconds)
    result["udp_64"] = await _iperf_between(sup, ns_server, ns_client, address, seconds, udp=True)
    result["rtt_us"] = await _udp_round_trips(sup, ns_server, ns_client, address, seconds)
    return result


# The round trip between namespaces: a UDP echo, the same Python on both paths (TAP + PV and
# veth), so the two rows differ only by the path. (ping(8) is not on every host.)
_ECHO_PORT = 7007
_ECHO_SERVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], {_ECHO_PORT}))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""
_ECHO_CLIENT = f"""
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], {_ECHO_PORT}))
payload = bytes(64 - 42)  # a 64-byte frame: Ethernet, IPv4 and UDP headers are 42
s.settimeout(0.1)
for _ in range(100):  # until the server answers (it has no readiness signal)
    try:  # not bound yet: an ICMP port unreachable makes send or recv refuse
        s.send(payload)
        s.recv(2048)
        break
    except OSError:
        time.sleep(0.02)  # refused at once: give the server time to bind
s.settimeout(1.0)
samples, lost = [], 0
deadline = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < deadline or len(samples) < {PING_MIN_ROUND_TRIPS}:
    started = time.perf_counter()
    try:
        s.send(payload)
        s.recv(2048)
    except OSError:
        lost += 1
        if lost > 10:
            break
        continue
    samples.append((time.perf_counter() - started) * 1e6)
print(json.dumps({{"samples": samples, "lost": lost}}), flush=True)
"""


async def _udp_round_trips(
    sup: Supervisor, ns_server: str, ns_client: str, address: str, seconds: float
) -> dict[str, Any]:
    server_cmd = ["ip", "netns", "exec", ns_server, sys.executable, "-c", _ECHO_SERVER, address]
    async with _server_child(sup, "udp-echo-server", server_cmd):
        client_cmd = ["ip", "netns", "exec", ns_client, sys.executable, "-c", _ECHO_CLIENT]
        client_cmd += [address, str(seconds)]
        output = await _client_output(sup, "udp-echo-client", client_cmd)
        try:
            measured = json.loads(output)
            samples = [float(x) for x in measured["samples"]]
        except (ValueError, KeyError, TypeError):
            return {"status": "failed", "output": output[-300:].decode(errors="replace")}
        if not samples:
            return {"status": "failed", "output": "no datagram came back"}
        return {"status": "ok", **_percentiles(samples), "lost": measured.get("lost", 0)}


@asynccontextmanager
async def _server_child(sup: Supervisor, name: str, command: list[str]) -> AsyncIterator[None]:
    """A server child (`ip netns exec ...`) for the length of the block, killed at its end."""
    child = await sup.spawn(name, "backend", command, Path(os.devnull))
    assert isinstance(child.proc, trio.Process)  # spawned, not forked
    server = child.proc
    try:
        yield
    finally:
        if server.returncode is None:
            server.kill()
        with trio.CancelScope(shield=True):
            await server.wait()


async def _client_output(sup: Supervisor, name: str, command: list[str]) -> bytes:
    """Run a client child (`ip netns exec ...`) to its end; what it wrote on its stdout."""
    client = await sup.spawn(name, "guest", command, Path(os.devnull), stdout=subprocess.PIPE)
    assert isinstance(client.proc, trio.Process) and client.proc.stdout is not None
    output = bytearray()
    while chunk := await client.proc.stdout.receive_some():
        output += chunk
    await client.proc.wait()
    await client.proc.stdout.aclose()
    return bytes(output)


async def _iperf_between(
    sup: Supervisor,
    ns_server: str,
    ns_client: str,
    address: str,
    seconds: float,
    *,
    udp: bool = False,
) -> dict[str, Any]:
    iperf_server = ["ip", "netns", "exec", ns_server, IPERF_PACKAGE, "-s", "-1", "-B", address]
    async with _server_child(sup, "iperf3-server", iperf_server):
        for _ in range(100):  # wait for the server socket (iperf3 has no readiness signal)
            probe = await trio.run_process(
                ["ip", "netns", "exec", ns_server, "ss", "-ltnH", "sport", "= :5201"],
                capture_stdout=True,
                check=False,
            )
            if probe.stdout.strip():
                break
            await trio.sleep(0.05)
        iperf_client = ["ip", "netns", "exec", ns_client, IPERF_PACKAGE]
        iperf_client += ["-c", address, "-t", str(seconds), "-J"]
        if udp:  # small packets as fast as they go: the per-packet cost, not the bytes
            iperf_client += ["-u", "-l", "64", "-b", "0"]
        output = await _client_output(sup, "iperf3-client", iperf_client)
        return _iperf_udp_result(output) if udp else _iperf_result(output)


async def _tap_iperf(
    sup: Supervisor, transport: str, seconds: float, queues: int, processes: bool
) -> dict[str, Any]:
    spaces = _Namespaces("xnb")
    taps = {1: f"xnba{spaces.tag}", 2: f"xnbb{spaces.tag}"}
    with (
        tempfile.TemporaryDirectory(prefix="xnb", dir="/tmp") as tmp,
        spaces as (ns_a, ns_b),
        spawned_xenstored(Path(tmp), "xs", sup=sup) as address,
    ):
        async with (
            _backend(Path(tmp), address, transport, taps) as config,
            AsyncExitStack() as stack,
        ):
            if processes:
                config.update(mode="tap", seconds=seconds, queues=queues)
                process = await stack.enter_async_context(_guest_process(sup, Path(tmp), config))
                async for line in _lines(process):
                    if line == "READY":
                        break
            else:
                await stack.enter_async_context(_guests(config, queues))
            for n, (tap, ns) in enumerate(zip(taps.values(), (ns_a, ns_b), strict=True)):
                _ip("link", "set", "dev", tap, "netns", ns)
                _ip("-n", ns, "addr", "add", f"10.203.0.{n + 1}/24", "dev", tap)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", tap, "up")
            return await _measure_between(sup, ns_b, ns_a, "10.203.0.2", seconds)


def _veth_iperf(seconds: float) -> dict[str, Any]:
    spaces = _Namespaces("xnv")
    with spaces as (ns_a, ns_b):
        veth_a, veth_b = f"xnva{spaces.tag}", f"xnvb{spaces.tag}"
        _ip("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", veth_b, "netns", ns_b)
        for n, (dev, ns) in enumerate(((veth_a, ns_a), (veth_b, ns_b))):
            _ip("-n", ns, "addr", "add", f"10.204.0.{n + 1}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        code, measured = run_supervised(
            functools.partial(
                _measure_between,
                ns_server=ns_b,
                ns_client=ns_a,
                address="10.204.0.2",
                seconds=seconds,
            )
        )
        return measured if measured is not None else {"status": "interrupted", "code": code}


if __name__ == "__main__":
    from xenpv import log

    log.configure("warning", json=True)
    trio.run(_child, json.loads(sys.argv[1]))
