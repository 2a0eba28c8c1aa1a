"""Guest self-checks run inside a domain process: verified block I/O and an echo over vifs.

The launcher asks for a round by writing JSON to `/local/domain/<id>/xenpv/control/selftest`:

    {"round": 1, "peers": [{"name": "guest16k", "mac": "00:16:3e:00:00:02"}, ...],
     "block_bytes": 4194304, "frames": 24, "timeout": 20}

and the domain process (`xenpv.runtime.domain_process`) answers with one JSON result per check in
`xenpv/checks/<name>` (`{"name", "ok", "detail", ...figures}`), then `xenpv/selftest-done`.

Block check (one per vbd, `block-<guest>-<devid>`): writes data whose every sector starts with
a tag naming the guest, round and byte offset (the rest is seeded pseudo-random), at offsets
chosen to cross page and segment boundaries and in a bulk run of concurrent 128 KiB writes;
reads everything back and compares; flushes; discards a range and checks that the data around
it is intact. Reports write/read throughput of the bulk run.

Net check (one per peer, `net-<guest>-to-<peer>`; check names are
xenstore path elements): `EchoPort` runs on every netfront of a guest
and answers echo requests (EtherType 0x88B5, IEEE 802 "local experimental"); the check sends
`frames` requests of several sizes (60..1514 bytes) to the peer's MAC and requires every reply
to carry the request's payload byte for byte. A lost frame (the switch tail-drops when a queue
is full) is retried up to `RETRIES` times before the check fails.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import struct
from typing import TYPE_CHECKING, Any

import structlog
import trio

from xenpv.errors import XenpvError

if TYPE_CHECKING:
    from xenpv.runtime.domain_process import DomainRuntime

log = structlog.get_logger()

ETHERTYPE_ECHO = 0x88B5  # IEEE Std 802 local experimental EtherType 1
MAGIC = b"XPVE"
ECHO_REQUEST = 1
ECHO_REPLY = 2
_HEADER = struct.Struct("!6s6sH4sBI8s")  # dst, src, ethertype, magic, kind, seq, nonce
FRAME_SIZES = (60, 590, 1514)
RETRIES = 3
BULK_CHUNK = 128 << 10
BULK_CONCURRENCY = 4


def parse_mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class EchoPort:
    """A guest's netfront with an echo responder and a way to ping peers."""

    def __init__(self, front: Any) -> None:
        self.front = front
        self._waiting: dict[tuple[int, bytes], tuple[trio.Event, list[bytes]]] = {}
        self._replies_send, self._replies_recv = trio.open_memory_channel[bytes](256)
        self._seq = 0
        self.answered = 0

    @property
    def mac(self) -> bytes:
        return bytes(self.front.mac)

    async def run(self) -> None:
        """Receive forever: answer requests (from a separate task), route replies."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_replies)
            while True:
                rx = await self.front.receive()
                self._dispatch(bytes(rx.frame))

    def _dispatch(self, frame: bytes) -> None:
        if len(frame) < _HEADER.size:
            return
        dst, src, ethertype, magic, kind, seq, nonce = _HEADER.unpack_from(frame)
        if ethertype != ETHERTYPE_ECHO or magic != MAGIC:
            return
        if kind == ECHO_REQUEST and dst == self.mac:
            reply = _HEADER.pack(src, dst, ETHERTYPE_ECHO, MAGIC, ECHO_REPLY, seq, nonce)
            # A full queue drops the reply, like a full qdisc: the requester retries.
            with contextlib.suppress(trio.WouldBlock):
                self._replies_send.send_nowait(reply + frame[_HEADER.size :])
        elif kind == ECHO_REPLY:
            waiter = self._waiting.get((seq, nonce))
            if waiter is not None:
                waiter[1].append(frame[_HEADER.size :])
                waiter[0].set()

    async def _send_replies(self) -> None:
        async for reply in self._replies_recv:
            await self.front.send(reply)
            self.answered += 1

    async def ping(self, dst: bytes, payload: bytes, wait_s: float) -> bytes | None:
        """Send one echo request; the reply's payload, or None after RETRIES timeouts."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        key = (self._seq, secrets.token_bytes(8))
        frame = _HEADER.pack(dst, self.mac, ETHERTYPE_ECHO, MAGIC, ECHO_REQUEST, *key) + payload
        event, got = trio.Event(), list[bytes]()
        self._waiting[key] = (event, got)
        try:
            for _attempt in range(RETRIES):
                await self.front.send(frame)
                with trio.move_on_after(wait_s / RETRIES):
                    await event.wait()
                    return got[0]
            return None
        finally:
            del self._waiting[key]


def _check(name: str, ok: bool, detail: str, **figures: Any) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, **figures}


def tagged(tag: str, offset: int, length: int, sector: int, seed: int) -> bytes:
    """Data for [offset, offset+length): each sector starts with `tag@offset`, then noise."""
    rng = random.Random(seed ^ offset)
    out = bytearray(rng.randbytes(length))
    for at in range(0, length, sector):
        label = f"{tag}@{offset + at}|".encode()[:sector]
        out[at : at + len(label)] = label
    return bytes(out)


async def block_check(
    name: str, disk: Any, tag: str, bulk_bytes: int, limit_s: float
) -> dict[str, Any]:
    with trio.move_on_after(limit_s) as scope:
        try:
            return await _block_check(name, disk, tag, bulk_bytes)
        except XenpvError as exc:
            return _check(name, False, f"{type(exc).__name__}: {exc}")
    assert scope.cancelled_caught
    return _check(name, False, f"timed out after {limit_s:.0f} s")


async def _block_check(name: str, disk: Any, tag: str, bulk_bytes: int) -> dict[str, Any]:
    await disk.wait_connected()
    info = dict(disk.info)
    sector = int(info["sector_size"])
    capacity = int(disk.capacity)
    seed = secrets.randbits(32)
    # Small I/Os at awkward places: unaligned to pages, crossing page and segment boundaries.
    small = [(0, sector), (3 * sector, 12 << 10), ((64 << 10) - sector, 2 * sector)]
    small = [(off, n) for off, n in small if off + n <= capacity]
    bulk_base = min(1 << 20, capacity // 2)
    bulk_bytes = max(0, min(bulk_bytes, capacity - bulk_base))
    bulk_bytes -= bulk_bytes % BULK_CHUNK
    chunks = [(bulk_base + at, BULK_CHUNK) for at in range(0, bulk_bytes, BULK_CHUNK)]

    for off, n in small:
        await disk.write(off, tagged(tag, off, n, sector, seed))
    write_s = await _concurrently(
        [lambda o=o, n=n: disk.write(o, tagged(tag, o, n, sector, seed)) for o, n in chunks]
    )
    await disk.flush()
    mismatches: list[int] = []

    async def verify(off: int, n: int) -> None:
        if await disk.read(off, n) != tagged(tag, off, n, sector, seed):
            mismatches.append(off)

    for off, n in small:
        await verify(off, n)
    read_s = await _concurrently([lambda o=o, n=n: verify(o, n) for o, n in chunks])
    if mismatches:
        return _check(name, False, f"read back differs at offsets {mismatches[:4]}")

    if not info.get("discard"):
        return _check(name, False, "the backend did not offer discard", **info)
    if chunks:
        first, length = chunks[len(chunks) // 2]
        await disk.discard(first, length)
        for off, n in (chunks[len(chunks) // 2 - 1], chunks[-1]):
            if off != first:
                await verify(off, n)
        if mismatches:
            return _check(name, False, f"data next to a discarded range changed at {mismatches}")
    mib = bulk_bytes / (1 << 20)
    return _check(
        name,
        True,
        f"wrote, read back and verified {len(small) + len(chunks)} extents "
        f"({mib:.1f} MiB bulk), flushed, discarded",
        write_mib_s=round(mib / write_s, 2) if write_s else None,
        read_mib_s=round(mib / read_s, 2) if read_s else None,
        bulk_bytes=bulk_bytes,
        **{k: info.get(k) for k in ("ring_page_order", "queues", "indirect_segments")},
    )


async def _concurrently(jobs: list[Any]) -> float:
    """Run the zero-argument coroutine functions `jobs`, BULK_CONCURRENCY at a time."""
    limit = trio.CapacityLimiter(BULK_CONCURRENCY)
    start = trio.current_time()

    async def one(job: Any) -> None:
        async with limit:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    return trio.current_time() - start


async def net_check(
    name: str, port: EchoPort, peer_mac: bytes, frames: int, limit_s: float
) -> dict[str, Any]:
    if frames <= 0:  # the CLI refuses these; a request written by hand must not divide by 0
        return _check(name, False, f"asked for {frames} frames; expected at least 1")
    with trio.move_on_after(limit_s) as scope:
        try:
            await port.front.wait_connected()
            start = trio.current_time()
            sent = 0
            for i in range(frames):
                size = FRAME_SIZES[i % len(FRAME_SIZES)] - _HEADER.size
                payload = secrets.token_bytes(size)
                reply = await port.ping(peer_mac, payload, limit_s / 2)
                if reply is None:
                    return _check(name, False, f"no reply to frame {i} ({size} bytes)")
                if reply != payload:
                    return _check(name, False, f"reply to frame {i} differs from the request")
                sent += size + _HEADER.size
            elapsed = trio.current_time() - start
            return _check(
                name,
                True,
                f"{frames} frames echoed and verified",
                frames=frames,
                bytes=sent,
                rtt_ms=round(1000 * elapsed / frames, 3),
            )
        except XenpvError as exc:
            return _check(name, False, f"{type(exc).__name__}: {exc}")
    assert scope.cancelled_caught
    return _check(name, False, f"timed out after {limit_s:.0f} s")


async def run_round(rt: DomainRuntime, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Every check of one self-test round, run concurrently; one result per check."""
    me = rt.info.name
    timeout = float(request.get("timeout", 20))
    bulk = int(request.get("block_bytes", 4 << 20))
    frames = int(request.get("frames", 24))
    round_id = int(request["round"])
    results: list[dict[str, Any]] = []

    async def collect(coro: Any) -> None:
        results.append(await coro)

    async with trio.open_nursery() as nursery:
        for device, disk in sorted(rt.blk.items(), key=lambda kv: kv[0].devid):
            name = f"block-{me}-{device.devid}"
            tag = f"{me}/{device.devid}/r{round_id}"
            nursery.start_soon(collect, block_check(name, disk, tag, bulk, timeout))
        ports = [p for _d, p in sorted(rt.net.items(), key=lambda kv: kv[0].devid)]
        for peer in request.get("peers", []):
            if peer.get("name") == me:
                continue
            if not ports:
                results.append(_check(f"net-{me}-to-{peer['name']}", False, "no vif attached"))
                continue
            name = f"net-{me}-to-{peer['name']}"
            nursery.start_soon(
                collect, net_check(name, ports[0], parse_mac(peer["mac"]), frames, timeout)
            )
    for result in results:
        log.info("check", **result) if result["ok"] else log.error("check", **result)
    return sorted(results, key=lambda r: str(r["name"]))
