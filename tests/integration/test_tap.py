"""A TAP device inside a fresh network namespace: the kernel's own stack answers our frames,
spoken to directly and through the backend switch.

Each test creates its own namespace `xenpv-test-<random>`, moves the TAP into it, gives it
10.200.0.1/24 and plays a host 10.200.0.2 on the other side of the TAP, speaking raw frames
built here. No address outside that private namespace is ever used; teardown always deletes it.
"""

from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from backends.switch import LiveSwitch, SwitchPort
from backends.tap import run_tap_port
from xenpv.abi.virtio_net import VirtioNetHdr, VirtioNetHdrFlags, VirtioNetHdrGso
from xenpv.tap import Tap, TapError

pytestmark = pytest.mark.root

NS_IP = bytes([10, 200, 0, 1])
OUR_IP = bytes([10, 200, 0, 2])
OUR_MAC = bytes.fromhex("02aabbccddee")
BCAST = b"\xff" * 6
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
TCP_SYN, TCP_ACK, TCP_PSH = 0x02, 0x10, 0x08
NEEDS_CSUM = VirtioNetHdrFlags.VIRTIO_NET_HDR_F_NEEDS_CSUM


# --- frames ---------------------------------------------------------------------------------


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return fold(sum(struct.unpack(f"!{len(data) // 2}H", data)))


def checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def ethernet(dst: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + OUR_MAC + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, payload: bytes, src: bytes = OUR_IP, dst: bytes = NS_IP) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0, src, dst
    )
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def arp(op: int, target_mac: bytes, target_ip: bytes) -> bytes:
    return struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, OUR_MAC, OUR_IP, target_mac, target_ip
    )


def tcp(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    options: bytes = b"",
    partial: bool = False,
) -> bytes:
    offset = (20 + len(options)) // 4
    head = struct.pack("!HHIIHHHH", sport, dport, seq, ack, offset << 12 | flags, 65535, 0, 0)
    segment = head + options + payload
    pseudo = pseudo_header(OUR_IP, NS_IP, IPPROTO_TCP, len(segment))
    # Partial (offloaded) checksum: the field holds the folded pseudo-header sum, and whoever
    # completes it sums from csum_start to the end and stores the complement.
    value = ones_sum(pseudo) if partial else checksum(pseudo + segment)
    return segment[:16] + struct.pack("!H", value) + segment[18:]


@dataclass
class Parsed:
    ethertype: int
    proto: int = 0
    src: bytes = b""
    dst: bytes = b""
    l4: bytes = b""  # the IPv4 payload


def parse(frame: bytes) -> Parsed:
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype != ETH_P_IP:
        return Parsed(ethertype)
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    return Parsed(ethertype, frame[23], frame[26:30], frame[30:34], frame[14 + ihl : 14 + total])


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Link:
    tap: Tap
    netns: str

    async def send(self, frame: bytes, hdr: VirtioNetHdr | None = None) -> None:
        await self.tap.write_frame(hdr or VirtioNetHdr(), frame)

    async def expect(
        self, match: Callable[[VirtioNetHdr, bytes], bool]
    ) -> tuple[VirtioNetHdr, bytes]:
        """Read frames until one matches, answering the kernel's ARP requests meanwhile."""
        while True:
            hdr, frame = await self.tap.read_frame()
            if match(hdr, frame):
                return hdr, frame
            p = parse(frame)
            if p.ethertype == ETH_P_ARP and frame[21] == 1 and frame[38:42] == OUR_IP:
                await self.send(
                    ethernet(frame[6:12], ETH_P_ARP, arp(2, frame[22:28], frame[28:32]))
                )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def link() -> Iterator[Link]:
    netns = f"xenpv-test-{random.getrandbits(32):08x}"
    _ip("netns", "add", netns)
    tap = None
    try:
        tap = Tap.open(f"xpvt{random.getrandbits(24):06x}")
        _ip("link", "set", "dev", tap.name, "netns", netns)
        _ip("-n", netns, "addr", "add", "10.200.0.1/24", "dev", tap.name)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "link", "set", tap.name, "up")
        yield Link(tap, netns)
    finally:
        if tap is not None:
            tap.close()
        subprocess.run(["ip", "netns", "del", netns], check=False, timeout=20)


def _static_neighbour(link: Link) -> None:
    _ip(
        "-n",
        link.netns,
        "neigh",
        "replace",
        "10.200.0.2",
        "lladdr",
        OUR_MAC.hex(":"),
        "dev",
        link.tap.name,
    )


# --- tests ----------------------------------------------------------------------------------


async def test_kernel_answers_arp_and_ping(link: Link) -> None:
    with trio.fail_after(20):
        await link.send(ethernet(BCAST, ETH_P_ARP, arp(1, bytes(6), NS_IP)))
        _, reply = await link.expect(
            lambda h, f: parse(f).ethertype == ETH_P_ARP and f[21] == 2 and f[28:32] == NS_IP
        )
        assert reply[:6] == OUR_MAC and reply[32:38] == OUR_MAC and reply[38:42] == OUR_IP
        tap_mac = reply[22:28]

        ident, payload = 0x4242, bytes(range(56))
        icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
        icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
        await link.send(ethernet(tap_mac, ETH_P_IP, ipv4(IPPROTO_ICMP, icmp)))

        def is_echo_reply(h: VirtioNetHdr, f: bytes) -> bool:
            p = parse(f)
            return p.proto == IPPROTO_ICMP and p.l4[:1] == b"\x00"

        _, frame = await link.expect(is_echo_reply)
        p = parse(frame)
        assert (p.src, p.dst) == (NS_IP, OUR_IP)
        assert checksum(frame[14:34]) == 0 and checksum(p.l4) == 0
        assert struct.unpack_from("!HH", p.l4, 4) == (ident, 1) and p.l4[8:] == payload


async def test_partial_udp_checksum_arrives_as_needs_csum(link: Link) -> None:
    _static_neighbour(link)
    with trio.fail_after(20):
        script = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'xenpv' * 200, ('10.200.0.2', 9999))"
        )
        await trio.run_process(["ip", "netns", "exec", link.netns, sys.executable, "-c", script])

        def is_datagram(h: VirtioNetHdr, f: bytes) -> bool:
            p = parse(f)
            return p.proto == IPPROTO_UDP and p.l4[2:4] == b"\x27\x0f"

        hdr, frame = await link.expect(is_datagram)
        assert hdr.needs_csum and hdr.gso == VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_NONE
        assert (hdr.csum_start, hdr.csum_offset) == (34, 6)
        # Complete the checksum as a NIC would, then check it the ordinary way.
        at = hdr.csum_start + hdr.csum_offset
        value = checksum(frame[hdr.csum_start :]) or 0xFFFF
        done = frame[:at] + struct.pack("!H", value) + frame[at + 2 :]
        p = parse(done)
        assert p.l4[8:] == b"xenpv" * 200
        assert checksum(pseudo_header(p.src, p.dst, IPPROTO_UDP, len(p.l4)) + p.l4) == 0


async def test_tso_frames_out_and_gso_frames_in(link: Link) -> None:
    """The kernel hands us TCP segments bigger than the MTU (TSO) and accepts ours (GSO)."""
    _static_neighbour(link)
    to_them = random.Random(7).randbytes(20000)
    script = (
        "import hashlib, socket, sys\n"
        "s = socket.create_connection(('10.200.0.2', 7777), timeout=15)\n"
        "s.sendall(b'y' * 14000)\n"
        "data = b''\n"
        "while len(data) < 20000:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "print(len(data), hashlib.sha256(data).hexdigest(), flush=True)\n"
    )
    outcome: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def run_app() -> None:
                cmd = ["ip", "netns", "exec", link.netns, sys.executable, "-c", script]
                done = await trio.run_process(cmd, capture_stdout=True, check=False)
                outcome.append(done.stdout.decode())

            nursery.start_soon(run_app)

            def is_syn(h: VirtioNetHdr, f: bytes) -> bool:
                p = parse(f)
                return p.proto == IPPROTO_TCP and p.l4[13] & (TCP_SYN | TCP_ACK) == TCP_SYN

            _, syn = await link.expect(is_syn)
            tap_mac, l4 = syn[6:12], parse(syn).l4
            sport, their_isn = struct.unpack_from("!H", l4)[0], struct.unpack_from("!I", l4, 4)[0]
            our_isn = 1_000_000
            mss = struct.pack("!BBH", 2, 4, 1460)
            synack = tcp(7777, sport, our_isn, their_isn + 1, TCP_SYN | TCP_ACK, options=mss)
            await link.send(ethernet(tap_mac, ETH_P_IP, ipv4(IPPROTO_TCP, synack)))

            def is_tso(h: VirtioNetHdr, f: bytes) -> bool:
                return parse(f).proto == IPPROTO_TCP and h.gso != 0

            hdr, big = await link.expect(is_tso)
            assert hdr.gso == VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4
            assert hdr.gso_size == 1460 and len(big) > 14 + 1500
            assert hdr.needs_csum and (hdr.csum_start, hdr.csum_offset) == (34, 16)
            assert 54 <= hdr.hdr_len <= len(big)
            assert set(parse(big).l4[20:]) == {ord("y")}

            # Our 20000 bytes as one GSO frame with a partial checksum: the kernel takes it
            # as a TCP super-segment and the application reads every byte.
            segment = tcp(
                7777, sport, our_isn + 1, their_isn + 1, TCP_ACK | TCP_PSH, to_them, partial=True
            )
            gso = VirtioNetHdr(
                flags=NEEDS_CSUM,
                gso_type=VirtioNetHdrGso.VIRTIO_NET_HDR_GSO_TCPV4,
                hdr_len=54,
                gso_size=1460,
                csum_start=34,
                csum_offset=16,
            )
            await link.send(ethernet(tap_mac, ETH_P_IP, ipv4(IPPROTO_TCP, segment)), gso)
        out = outcome[0].split()
        assert out == [str(len(to_them)), hashlib.sha256(to_them).hexdigest()]


async def test_a_refused_frame_is_a_typed_error_and_the_tap_lives_on(link: Link) -> None:
    with trio.fail_after(20):
        bogus = VirtioNetHdr(hdr_len=5000)  # header longer than the frame: EINVAL
        with pytest.raises(TapError, match=f"write to TAP {link.tap.name}"):
            await link.send(ethernet(BCAST, ETH_P_ARP, arp(1, bytes(6), NS_IP)), bogus)
        await link.send(ethernet(BCAST, ETH_P_ARP, arp(1, bytes(6), NS_IP)))
        await link.expect(lambda h, f: parse(f).ethertype == ETH_P_ARP and f[21] == 2)


async def test_close_wakes_a_blocked_reader(link: Link) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises((TapError, trio.ClosedResourceError)):
                    while True:
                        await link.tap.read_frame()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            link.tap.close()


def test_multi_queue_opens_queues_of_one_device() -> None:
    name = f"xpvq{random.getrandbits(24):06x}"
    q0 = Tap.open(name, multi_queue=True)
    try:
        q1 = Tap.open(name, multi_queue=True)
        assert q0.name == q1.name == name and q0.fileno() != q1.fileno()
        q1.close()
        with pytest.raises(TapError, match=f"cannot set up TAP '{name}'"):
            Tap.open(name)  # single-queue open of a multi-queue device
    finally:
        q0.close()
    link_list = subprocess.run(["ip", "link", "show", name], capture_output=True, check=False)
    assert link_list.returncode != 0  # not persistent: gone with its last queue


# --- plugged into the backend switch ---------------------------------------------------------


async def _next(port: SwitchPort[VirtioNetHdr], want: int) -> tuple[bytes, VirtioNetHdr | None]:
    """The next frame out of `port` with the given ethertype, skipping IPv6 chatter."""
    while True:
        frame, meta = await port.receive()
        if struct.unpack_from("!H", frame, 12)[0] == want:
            return frame, meta


async def test_switch_port_reaches_the_kernel_through_the_tap(link: Link) -> None:
    with trio.fail_after(20):
        live: LiveSwitch[VirtioNetHdr] = LiveSwitch()
        vif = live.attach("vif1.0")
        tap_port = live.attach(link.tap.name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_tap_port, link.tap, tap_port)

            vif.send(ethernet(BCAST, ETH_P_ARP, arp(1, bytes(6), NS_IP)))
            reply, _ = await _next(vif, ETH_P_ARP)
            assert reply[:6] == OUR_MAC and reply[28:32] == NS_IP
            tap_mac = reply[22:28]
            assert live.core.lookup(tap_mac) == link.tap.name
            assert live.core.lookup(OUR_MAC) == "vif1.0"

            icmp = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"ping" * 14
            icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
            vif.send(ethernet(tap_mac, ETH_P_IP, ipv4(IPPROTO_ICMP, icmp)))
            while True:
                frame, _ = await _next(vif, ETH_P_IP)
                p = parse(frame)
                if p.proto == IPPROTO_ICMP and p.l4[0] == 0:
                    break
            assert p.l4[8:] == b"ping" * 14

            # Offload metadata crosses the switch: a partial UDP checksum from the kernel
            # reaches the vif with its virtio-net header.
            script = (
                "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                "s.sendto(b'meta' * 100, ('10.200.0.2', 9999))"
            )
            cmd = ["ip", "netns", "exec", link.netns, sys.executable, "-c", script]
            await trio.run_process(cmd)
            while True:
                frame, meta = await _next(vif, ETH_P_IP)
                if parse(frame).proto == IPPROTO_UDP:
                    break
            assert meta is not None and meta.needs_csum and meta.csum_start == 34

            live.detach(link.tap.name)  # run_tap_port ends by itself
        assert live.core.counters("vif1.0").rx_frames >= 2


async def test_nonblocking_reads_drain_a_burst_then_report_empty(link: Link) -> None:
    """`read_nowait` returns queued frames one by one (as views of the read buffer) and None
    once the kernel has nothing more; `write_nowait` hands a frame over at once."""
    _static_neighbour(link)
    with trio.fail_after(20):
        while link.tap.read_nowait() is not None:  # whatever the kernel sent on link-up
            pass
        assert link.tap.read_nowait() is None
        script = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "[s.sendto(b'%03d' % n * 100, ('10.200.0.2', 9998)) for n in range(5)]"
        )
        await trio.run_process(["ip", "netns", "exec", link.netns, sys.executable, "-c", script])
        await link.tap.wait_readable()
        payloads: list[bytes] = []
        while len(payloads) < 5:
            got = link.tap.read_nowait()
            if got is None:
                await link.tap.wait_readable()
                continue
            _hdr, view = got
            assert isinstance(view, memoryview)
            p = parse(bytes(view))
            if p.proto == IPPROTO_UDP and p.l4[2:4] == (9998).to_bytes(2, "big"):
                payloads.append(p.l4[8:])
        assert payloads == [b"%03d" % n * 100 for n in range(5)]
        # A write the kernel takes now returns True; it answers our ARP request.
        assert link.tap.write_nowait(
            VirtioNetHdr(), ethernet(BCAST, ETH_P_ARP, arp(1, bytes(6), NS_IP))
        )
        await link.expect(lambda h, f: parse(f).ethertype == ETH_P_ARP and f[21] == 2)
