"""The pure parts of the guest workloads: echo framing, the frame-sink registry, tagged data,
and round trips between two echo ports joined in memory (no drivers, no processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trio
import trio.testing

from xenpv.abi.netif import XEN_NETIF_GSO_TYPE_TCPV4, NetifGsoExtra
from xenpv.runtime.blockcheck import awkward_extents, tagged
from xenpv.runtime.echo import (
    ECHO_HEADER,
    ECHO_REPLY,
    ECHO_REQUEST,
    OPAQUE_HEADER,
    TCP_HEADER,
    EchoPort,
    EchoRequest,
    echo_offset,
    format_mac,
    opaque_frame,
    parse_mac,
    reply_to,
    tcp_frame,
)
from xenpv.runtime.workload import FrameSinks
from xenpv.xenbus.core import DeviceId

A = bytes.fromhex("00163e000001")
B = bytes.fromhex("00163e000002")
NONCE = b"12345678"


def test_mac_text_round_trips() -> None:
    assert format_mac(parse_mac("00:16:3e:00:00:0a")) == "00:16:3e:00:00:0a"


@pytest.mark.parametrize("build, header", [(opaque_frame, OPAQUE_HEADER), (tcp_frame, TCP_HEADER)])
def test_echo_header_is_found_in_both_shapes(build: Any, header: int) -> None:
    frame = build(B, A, ECHO_REQUEST, 7, NONCE, b"payload")
    assert len(frame) == header + len(b"payload")
    at = echo_offset(frame)
    assert at == header - ECHO_HEADER.size
    assert ECHO_HEADER.unpack_from(frame, at)[1:] == (ECHO_REQUEST, 7, NONCE)


def test_tcp_frame_is_well_formed_ipv4() -> None:
    frame = tcp_frame(B, A, ECHO_REQUEST, 1, NONCE, bytes(100))
    assert frame[12:14] == b"\x08\x00" and frame[14] == 0x45 and frame[23] == 6
    assert int.from_bytes(frame[16:18], "big") == len(frame) - 14  # IPv4 total length


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        bytes(13),
        B + A + b"\x88\xb5" + b"XPV",  # too short for the echo header
        B + A + b"\x88\xb5" + ECHO_HEADER.pack(b"NOPE", 1, 1, NONCE),  # wrong magic
        B + A + b"\x86\xdd" + bytes(60),  # IPv6: not an echo frame
        B + A + b"\x08\x00" + bytes([0x45]) + bytes(8) + bytes([17]) + bytes(40),  # UDP
    ],
)
def test_non_echo_frames_have_no_echo_header(frame: bytes) -> None:
    assert echo_offset(frame) is None


def test_reply_swaps_addresses_and_flips_only_the_kind() -> None:
    request = opaque_frame(B, A, ECHO_REQUEST, 9, NONCE, b"abc")
    reply = reply_to(request)
    assert reply == opaque_frame(A, B, ECHO_REPLY, 9, NONCE, b"abc")


def test_frame_sinks_first_taker_wins_and_unregister() -> None:
    sinks = FrameSinks()
    vif = DeviceId("vif", 1, 0, 0)
    seen: list[str] = []

    def refuse(_rx: Any) -> bool:
        seen.append("refuse")
        return False

    def take(_rx: Any) -> bool:
        seen.append("take")
        return True

    rx = cast(Any, object())
    with sinks.registered(vif, refuse), sinks.registered(vif, take):
        assert sinks.deliver(vif, rx) is True
        assert sinks.deliver(DeviceId("vif", 1, 0, 1), rx) is False  # another vif: nobody
    assert seen == ["refuse", "take"]
    assert sinks.deliver(vif, rx) is False  # both gone


def test_tagged_sectors_name_their_offset_and_depend_on_the_seed() -> None:
    data = tagged("g/51712/r1", 4096, 1024, 512, seed=5)
    assert len(data) == 1024
    assert data.startswith(b"g/51712/r1@4096|") and data[512:].startswith(b"g/51712/r1@4608|")
    assert data == tagged("g/51712/r1", 4096, 1024, 512, seed=5)
    assert data != tagged("g/51712/r1", 4096, 1024, 512, seed=6)


def test_awkward_extents_cross_pages() -> None:
    extents = awkward_extents(512)
    assert any(off % 4096 and (off + n) // 4096 != off // 4096 for off, n in extents)
    assert any(off < 64 << 10 < off + n for off, n in extents)


# -- two echo ports joined in memory ----------------------------------------------------------


@dataclass
class _Rx:
    frame: bytes
    gso: NetifGsoExtra | None = None
    csum_blank: bool = False


@dataclass
class _Wire:
    """A netfront stand-in: `send` hands the frame to the peer's sink; `drop` loses the
    first N frames; `mangle` corrupts replies."""

    mac: bytes
    peer: Any = None
    drop: int = 0
    mangle: bool = False
    sent: list[bytes] = field(default_factory=list)

    async def send(
        self, frame: bytes, *, gso: NetifGsoExtra | None = None, csum_blank: bool = False
    ) -> None:
        self.sent.append(frame)
        if self.drop:
            self.drop -= 1
            return
        if self.mangle:
            frame = frame[:-1] + bytes([frame[-1] ^ 1])
        self.peer.take(_Rx(frame, gso, csum_blank))
        await trio.lowlevel.checkpoint()


async def _pair(nursery: trio.Nursery, **answerer: Any) -> tuple[EchoPort, EchoPort, _Wire]:
    wa, wb = _Wire(A), _Wire(B, **answerer)
    pa, pb = EchoPort(cast(Any, wa)), EchoPort(cast(Any, wb))
    wa.peer, wb.peer = pb, pa
    nursery.start_soon(pa.run)
    nursery.start_soon(pb.run)
    return pa, pb, wb


async def test_round_trips_verify_every_echo() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pa, pb, _ = await _pair(nursery)
            gso = NetifGsoExtra(1448, XEN_NETIF_GSO_TYPE_TCPV4)
            requests = [EchoRequest(bytes(29)), EchoRequest(bytes(3000), tcp=True, gso=gso)]
            stats = await pa.round_trips(B, requests * 3, window=4, wait_s=1)
            assert stats.ok and stats.echoed == 6 and not stats.timed_out
            assert stats.frame_bytes == 3 * (OPAQUE_HEADER + 29 + TCP_HEADER + 3000)
            assert pb.answered == 6
            nursery.cancel_scope.cancel()


async def test_a_lost_frame_is_resent_then_counted_lost(autojump_clock: Any) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            pa, _pb, wb = await _pair(nursery, drop=2)
            stats = await pa.round_trips(B, [EchoRequest(b"x")], wait_s=3, attempts=3)
            assert stats.ok  # two replies dropped, the third attempt got through
            wb.drop = 10
            stats = await pa.round_trips(B, [EchoRequest(b"x")] * 3, wait_s=3, attempts=2)
            assert stats.failures == [(0, "lost")] and stats.echoed == 0
            nursery.cancel_scope.cancel()


async def test_a_changed_echo_is_reported_and_stops_the_run() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pa, _pb, _wb = await _pair(nursery, mangle=True)
            stats = await pa.round_trips(B, [EchoRequest(b"abc")] * 5, wait_s=1)
            assert stats.differing == [0] and stats.echoed == 0
            nursery.cancel_scope.cancel()


async def test_replies_and_other_hosts_frames_are_not_answered() -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            pa, pb, wb = await _pair(nursery)
            stray_reply = opaque_frame(B, A, ECHO_REPLY, 1, NONCE, b"")  # not B's nonce
            assert not pb.take(cast(Any, _Rx(stray_reply)))
            assert not pb.take(cast(Any, _Rx(opaque_frame(A, B, ECHO_REQUEST, 1, NONCE, b""))))
            await pa.announce()  # a broadcast: nobody answers it
            await trio.testing.wait_all_tasks_blocked()
            assert wb.sent == [] and pb.answered == 0
            nursery.cancel_scope.cancel()
