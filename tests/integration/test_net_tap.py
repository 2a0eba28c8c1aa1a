"""Real traffic over the PV path: two guests whose netfronts carry Linux TAP devices, each TAP
in a network namespace created here; the namespaces ping each other and move a TCP stream
through netfront → netback → switch → netback → netfront, offloads (TSO, partial checksums)
carried through. Only addresses inside these private namespaces are used; they are always
deleted afterwards.
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import Xenstored
from tests.integration.test_net_integrity import network

pytestmark = pytest.mark.root

STREAM_BYTES = {"shm": 16 << 20, "socket": 2 << 20}  # the socket path is latency-bound
SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{addr}", 5201)); s.listen(1)
print("READY", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""
PING = """
import os, socket, struct, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s & 0xFFFF) + (s >> 16); s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(5)
ident = os.getpid() & 0xFFFF
for seq in range({count}):
    body = bytes(range(56))
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, csum(head + body), ident, seq) + body
    sock.sendto(packet, ("{addr}", 0))
    while True:
        data, _ = sock.recvfrom(2048)
        icmp = data[(data[0] & 15) * 4 :]
        kind, _, _, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
        if kind == 0 and rid == ident and rseq == seq and icmp[8:] == body:
            print("reply", seq, flush=True)
            break
"""
CLIENT = """
import hashlib, random, socket
data = random.Random(42).randbytes({size})
c = socket.create_connection(("{addr}", 5201), timeout=30)
c.sendall(data); c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    tag = f"{random.getrandbits(24):06x}"
    names = (f"xnf-{tag}-a", f"xnf-{tag}-b")
    try:
        for name in names:
            _ip("netns", "add", name)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


def place(tap: str, netns: str, address: str) -> None:
    _ip("link", "set", "dev", tap, "netns", netns)
    _ip("-n", netns, "addr", "add", address, "dev", tap)
    _ip("-n", netns, "link", "set", "lo", "up")
    _ip("-n", netns, "link", "set", tap, "up")


@pytest.mark.parametrize("transport", ["socket", "shm"])
async def test_ping_and_tcp_stream_between_namespaces(
    tmp_path: Path, xenstored: Xenstored, namespaces: tuple[str, str], transport: str
) -> None:
    ns_a, ns_b = namespaces
    tag = ns_a.split("-")[1]
    taps = {1: f"xnfa{tag}", 2: f"xnfb{tag}"}
    with trio.fail_after(120):
        async with network(
            tmp_path, xenstored, transport, [4096, 65536], max_queues=2, taps=taps
        ) as net:
            a, b = net.fronts
            assert a.tap is not None and b.tap is not None
            place(taps[1], ns_a, "10.201.0.1/24")
            place(taps[2], ns_b, "10.201.0.2/24")
            for ns, peer in ((ns_a, "10.201.0.2"), (ns_b, "10.201.0.1")):
                script = PING.format(count=3, addr=peer)
                ping = await trio.run_process(
                    ["ip", "netns", "exec", ns, sys.executable, "-c", script],
                    capture_stdout=True,
                    check=False,
                )
                assert ping.returncode == 0, ping.stdout.decode()
                assert ping.stdout.split(b"\n")[:3] == [b"reply 0", b"reply 1", b"reply 2"]

            server_cmd = [
                "ip",
                "netns",
                "exec",
                ns_b,
                sys.executable,
                "-c",
                SERVER.format(addr="10.201.0.2"),
            ]
            client_cmd = [
                "ip",
                "netns",
                "exec",
                ns_a,
                sys.executable,
                "-c",
                CLIENT.format(addr="10.201.0.2", size=STREAM_BYTES[transport]),
            ]
            before = a.stats()
            server = await trio.lowlevel.open_process(server_cmd, stdout=subprocess.PIPE)
            try:
                assert server.stdout is not None
                buffered = b""
                while b"READY\n" not in buffered:
                    chunk = await server.stdout.receive_some()
                    assert chunk, "server exited early"
                    buffered += chunk
                client = await trio.run_process(client_cmd, capture_stdout=True)
                while buffered.count(b"\n") < 2:
                    chunk = await server.stdout.receive_some()
                    if not chunk:
                        break
                    buffered += chunk
                await server.wait()
            finally:
                if server.returncode is None:
                    server.kill()
                    with trio.CancelScope(shield=True):
                        await server.wait()
            got = buffered.split(b"\n")[1].split()
            sent = client.stdout.split()
            assert got == sent and int(got[0]) == STREAM_BYTES[transport]
            after = a.stats()
            packets = after["tx_packets"] - before["tx_packets"]
            sent_bytes = after["tx_bytes"] - before["tx_bytes"]
            # TSO frames crossed the PV path as single packets: without TSO no frame would
            # exceed 1514 bytes (TCP sizes TSO frames by its pacing rate, at least 2 MSS)
            assert sent_bytes / packets > 1600, (sent_bytes, packets)
            assert b.stats()["rx_errors"] == 0


async def test_tap_removed_under_a_running_vif(tmp_path: Path, xenstored: Xenstored) -> None:
    tag = f"{random.getrandbits(24):06x}"
    tap = f"xnfg{tag}"
    with trio.fail_after(60):
        async with network(tmp_path, xenstored, "shm", [4096, 4096], taps={1: tap}) as net:
            a, b = net.fronts
            assert a.tap is not None
            _ip("link", "del", "dev", tap)  # an admin removes the device
            # the vif itself keeps working: a frame from guest 1 still reaches guest 2
            frame = b.mac + a.mac + b"\x88\xb5" + bytes(100)
            await a.send(frame)
            got = await b.receive()
            assert got.frame == frame and a.connected
