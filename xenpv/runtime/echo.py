"""The guests' echo: a responder on every vif and verified round trips to a peer.

An echo frame carries, after its headers, `magic kind seq nonce` (`ECHO_HEADER`) and then any
payload. Two shapes exist: an opaque frame (EtherType 0x88B5, IEEE 802 "local experimental",
echo header right after the Ethernet header) and an IPv4/TCP frame with the echo header at the
start of the TCP payload (so that it may be sent with checksum offload or as a GSO packet).

The responder (`EchoPort.take`, a frame sink) answers a request addressed to its vif with the
same frame, addresses swapped and kind set to reply, with the request's offload flags. A reply
never gets an answer, so two responders cannot bounce a frame forever. The requester
(`EchoPort.round_trips`) requires every reply to equal the request transformed that way, byte
for byte. A lost frame (a switch tail-drops when a queue is full) is re-sent up to `attempts`
times before it counts as lost.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from xenpv.errors import XenpvError

if TYPE_CHECKING:
    from frontends.netfront import Netfront, RxFrame
    from xenpv.abi.netif import NetifGsoExtra
    from xenpv.runtime.workload import WorkloadContext
    from xenpv.xenbus.core import DeviceId

log = structlog.get_logger()

ETHERTYPE_ECHO = 0x88B5  # IEEE Std 802 local experimental EtherType 1
ETHERTYPE_IPV4 = 0x0800
MAGIC = b"XPVE"
ECHO_REQUEST = 1
ECHO_REPLY = 2
ECHO_ANNOUNCE = 3  # a broadcast that only teaches switches the sender's address
ECHO_HEADER = struct.Struct("!4sBI8s")  # magic, kind, seq, nonce
ETH_HEADER = 14
OPAQUE_HEADER = ETH_HEADER + ECHO_HEADER.size  # bytes before an opaque frame's payload
TCP_HEADER = ETH_HEADER + 20 + 20 + ECHO_HEADER.size  # same for an IPv4/TCP frame
BROADCAST = b"\xff" * 6
REPLY_QUEUE = 256


def parse_mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def opaque_frame(
    dst: bytes, src: bytes, kind: int, seq: int, nonce: bytes, payload: bytes
) -> bytes:
    head = struct.pack("!6s6sH", dst, src, ETHERTYPE_ECHO)
    return head + ECHO_HEADER.pack(MAGIC, kind, seq, nonce) + payload


def tcp_frame(dst: bytes, src: bytes, kind: int, seq: int, nonce: bytes, payload: bytes) -> bytes:
    """A well-formed IPv4/TCP frame whose TCP payload is the echo header + `payload`. Its
    checksum field is zero: send it with `csum_blank=True`."""
    data = ECHO_HEADER.pack(MAGIC, kind, seq, nonce) + payload
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40 + len(data), 0, 0x4000, 64, 6, 0,
        bytes([10, 8, 0, src[-1]]), bytes([10, 8, 0, dst[-1]]),
    )  # fmt: skip
    return dst + src + struct.pack("!H", ETHERTYPE_IPV4) + ip + tcp + data


def echo_offset(frame: bytes) -> int | None:
    """Where `frame`'s echo header starts, or None if it is not an echo frame."""
    if len(frame) < ETH_HEADER:
        return None
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    at: int | None = None
    if ethertype == ETHERTYPE_ECHO:
        at = ETH_HEADER
    elif ethertype == ETHERTYPE_IPV4 and len(frame) >= ETH_HEADER + 20:
        ihl = (frame[ETH_HEADER] & 0x0F) * 4
        tcp = ETH_HEADER + ihl
        if frame[ETH_HEADER + 9] == 6 and len(frame) >= tcp + 20:
            at = tcp + (frame[tcp + 12] >> 4) * 4
    if at is None or len(frame) < at + ECHO_HEADER.size:
        return None
    return at if frame[at : at + len(MAGIC)] == MAGIC else None


def reply_to(request: bytes) -> bytes:
    """The reply a responder sends to `request` (an echo request frame)."""
    at = echo_offset(request)
    assert at is not None, "not an echo frame"
    kind = at + len(MAGIC)
    return (
        request[6:12] + request[:6] + request[12:kind] + bytes([ECHO_REPLY]) + request[kind + 1 :]
    )


@dataclass(frozen=True, slots=True)
class EchoRequest:
    """One round trip to make: `payload` in an opaque frame, or in a TCP frame (`tcp`),
    optionally as a GSO packet (`gso`)."""

    payload: bytes
    tcp: bool = False
    gso: NetifGsoExtra | None = None


@dataclass(slots=True)
class EchoStats:
    """What `round_trips` saw. `failures`: (request index, "lost" | "differs"), in the
    order they happened."""

    requests: int
    echoed: int = 0
    frame_bytes: int = 0  # bytes of the echoed request frames
    seconds: float = 0.0
    failures: list[tuple[int, str]] = field(default_factory=list)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and self.echoed == self.requests

    @property
    def differing(self) -> list[int]:
        """Indexes of the requests whose reply was not the expected echo."""
        return [index for index, why in self.failures if why == "differs"]


class EchoPort:
    """One vif's echo: answers requests addressed to it and makes round trips to peers.
    Register `take` as the vif's frame sink and run `run` (it sends the answers)."""

    def __init__(self, front: Netfront) -> None:
        self.front = front
        self._nonce = secrets.token_bytes(8)
        self._seq = 0
        self._waiting: dict[int, tuple[trio.Event, list[bytes]]] = {}
        self._replies_send, self._replies_recv = trio.open_memory_channel[tuple[bytes, "RxFrame"]](
            REPLY_QUEUE
        )
        self.answered = 0

    @property
    def mac(self) -> bytes:
        return bytes(self.front.mac)

    def take(self, rx: RxFrame) -> bool:
        """The frame sink: answer requests to this vif, hand replies to their waiter."""
        frame = bytes(rx.frame)
        at = echo_offset(frame)
        if at is None or frame[:6] != self.mac:
            return False
        _magic, kind, seq, nonce = ECHO_HEADER.unpack_from(frame, at)
        if kind == ECHO_REQUEST:
            # A full queue drops the reply, like a full qdisc: the requester retries.
            with contextlib.suppress(trio.WouldBlock):
                self._replies_send.send_nowait((reply_to(frame), rx))
            return True
        if kind == ECHO_REPLY and nonce == self._nonce:
            waiter = self._waiting.get(seq)
            if waiter is not None:
                waiter[1].append(frame)
                waiter[0].set()
            return True
        return False

    async def run(self) -> None:
        """Send the answers `take` queued, forever."""
        async for reply, rx in self._replies_recv:
            await self.front.send(reply, gso=rx.gso, csum_blank=rx.csum_blank)
            self.answered += 1

    async def announce(self) -> None:
        """Broadcast one frame from this vif, so that a learning switch knows its address
        and frames to it are not flooded."""
        await self.front.send(
            opaque_frame(
                BROADCAST, self.mac, ECHO_ANNOUNCE, 0, self._nonce, bytes(60 - OPAQUE_HEADER)
            )
        )

    def request_frame(self, dst: bytes, request: EchoRequest) -> tuple[int, bytes]:
        """A new sequence number and the request frame for it."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        build = tcp_frame if request.tcp else opaque_frame
        return self._seq, build(
            dst, self.mac, ECHO_REQUEST, self._seq, self._nonce, request.payload
        )

    async def ping(
        self, dst: bytes, request: EchoRequest, wait_s: float, attempts: int
    ) -> tuple[bytes, bytes | None]:
        """One round trip: the request frame and the reply, or None if none came within
        `attempts` sends, each waiting `wait_s / attempts`."""
        seq, frame = self.request_frame(dst, request)
        event, got = trio.Event(), list[bytes]()
        self._waiting[seq] = (event, got)
        try:
            for _attempt in range(attempts):
                await self.front.send(frame, gso=request.gso, csum_blank=request.tcp)
                with trio.move_on_after(wait_s / attempts):
                    await event.wait()
                    return frame, got[0]
            return frame, None
        finally:
            del self._waiting[seq]

    async def round_trips(
        self,
        dst: bytes,
        requests: Sequence[EchoRequest],
        *,
        window: int = 1,
        wait_s: float,
        attempts: int = 1,
        limit_s: float = math.inf,
    ) -> EchoStats:
        """Send `requests` to `dst`, `window` in flight, and verify every reply. Stops
        sending at the first failure (frames in flight still finish); after `limit_s` in
        all, stops waiting (`timed_out`: what was not echoed is lost)."""
        stats = EchoStats(len(requests))
        pending = iter(enumerate(requests))
        start = trio.current_time()

        async def worker() -> None:
            for index, request in pending:
                if stats.failures:
                    return
                frame, reply = await self.ping(dst, request, wait_s, attempts)
                if reply is None:
                    stats.failures.append((index, "lost"))
                elif reply != reply_to(frame):
                    stats.failures.append((index, "differs"))
                else:
                    stats.echoed += 1
                    stats.frame_bytes += len(frame)

        with trio.move_on_after(limit_s) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, min(window, len(requests)))):
                    nursery.start_soon(worker)
        stats.timed_out = scope.cancelled_caught
        stats.seconds = trio.current_time() - start
        return stats


@dataclass(eq=False)
class EchoResponder:
    """The workload that keeps an `EchoPort` on every vif of the guest, for as long as the
    vif is attached; `ports` is what the self-test pings peers with."""

    name: str = "echo"
    ports: dict[DeviceId, EchoPort] = field(default_factory=dict)

    async def run(self, ctx: WorkloadContext) -> None:
        served: dict[DeviceId, tuple[Netfront, trio.CancelScope]] = {}
        async with trio.open_nursery() as nursery:
            while True:
                for device in list(served):
                    if ctx.net.get(device) is not served[device][0]:
                        served.pop(device)[1].cancel()
                for device, front in ctx.net.items():
                    if device not in served:
                        port, scope = EchoPort(front), trio.CancelScope()
                        served[device] = (front, scope)
                        self.ports[device] = port
                        nursery.start_soon(self._serve, ctx, device, port, scope)
                await ctx.wait_devices_changed()

    async def _serve(
        self, ctx: WorkloadContext, device: DeviceId, port: EchoPort, scope: trio.CancelScope
    ) -> None:
        try:
            with scope, ctx.frames.registered(device, port.take):
                await port.run()
        except XenpvError as exc:  # the vif closed under us: it is going away
            log.info("echo responder ended", device=str(device), error=str(exc))
        finally:
            if self.ports.get(device) is port:
                del self.ports[device]
