"""A tiny byte ring with ring.h-style event indexes, for the hypervisor's coherence tests.

Layout of one shared 4 KiB page: prod u32 @0 (producer), prod_event u32 @4 (consumer),
cons u32 @8 (consumer), cons_event u32 @12 (producer), data bytes @16..4096. A record is a
u16 length and that many bytes; records wrap around the data area byte by byte. Each side
re-arms its event index and re-checks before sleeping, and notifies only when the peer's
event index falls in the range it just published (RING_PUSH_*_AND_CHECK_NOTIFY) — exactly
the pattern that deadlocks on stale replicas unless the transport prevents it.
"""

from __future__ import annotations

import hashlib
import random
import struct

from xenpv.hv import EventChannel, SharedBuffer

HEADER = 16
U32 = struct.Struct("<I")
MASK = 0xFFFFFFFF


def record(seed: int, seq: int) -> bytes:
    """Record `seq` of the stream `seed`: sequence number, payload, digest (detects tearing)."""
    rng = random.Random(seed * 1_000_003 + seq)
    payload = rng.randbytes(rng.choice((0, 1, 7, 64, 300, 1000, rng.randrange(0, 2000))))
    body = seq.to_bytes(4, "little") + payload
    return body + hashlib.blake2s(body, digest_size=8).digest()


def check(seed: int, seq: int, data: bytes) -> None:
    expected = record(seed, seq)
    if data != expected:
        got = int.from_bytes(data[:4], "little") if len(data) >= 4 else None
        raise AssertionError(f"record {seq}: got {len(data)} bytes (seq field {got}), torn/stale")


def _get(buf: SharedBuffer, off: int) -> int:
    return int(U32.unpack_from(buf.view, off)[0])


def _put(buf: SharedBuffer, off: int, value: int) -> None:
    U32.pack_into(buf.view, off, value & MASK)
    buf.written(off, 4)


def _copy_in(buf: SharedBuffer, pos: int, data: bytes) -> None:
    size = len(buf.view) - HEADER
    view = buf.view
    at = pos % size
    first = min(len(data), size - at)
    view[HEADER + at : HEADER + at + first] = data[:first]
    buf.written(HEADER + at, first)
    if first < len(data):
        view[HEADER : HEADER + len(data) - first] = data[first:]
        buf.written(HEADER, len(data) - first)


def _copy_out(buf: SharedBuffer, pos: int, n: int) -> bytes:
    size = len(buf.view) - HEADER
    view = buf.view
    at = pos % size
    first = min(n, size - at)
    out = bytes(view[HEADER + at : HEADER + at + first])
    if first < n:
        out += bytes(view[HEADER : HEADER + n - first])
    return out


def init(buf: SharedBuffer) -> None:
    _put(buf, 0, 0)
    _put(buf, 4, 1)
    _put(buf, 8, 0)
    _put(buf, 12, 1)


def _must_notify(old: int, new: int, event: int) -> bool:
    return ((new - event) & MASK) < ((new - old) & MASK)


async def produce(buf: SharedBuffer, channel: EventChannel, seed: int, count: int) -> None:
    size = len(buf.view) - HEADER
    prod = _get(buf, 0)
    for seq in range(count):
        data = record(seed, seq)
        need = 2 + len(data)
        while True:
            cons = _get(buf, 8)
            if size - ((prod - cons) & MASK) >= need:
                break
            _put(buf, 12, cons + 1)  # cons_event: wake me when cons moves past `cons`
            if _get(buf, 8) != cons:
                continue  # it moved meanwhile: re-evaluate (and re-arm) instead of sleeping
            await channel.wait()
        _copy_in(buf, prod, len(data).to_bytes(2, "little") + data)
        old, prod = prod, (prod + need) & MASK
        _put(buf, 0, prod)
        if _must_notify(old, prod, _get(buf, 4)):
            channel.notify()


async def consume(buf: SharedBuffer, channel: EventChannel, seed: int, count: int) -> int:
    cons = _get(buf, 8)
    for seq in range(count):
        while _get(buf, 0) == cons:
            _put(buf, 4, cons + 1)  # prod_event: wake me on the next record
            if _get(buf, 0) != cons:
                break
            await channel.wait()
        n = int.from_bytes(_copy_out(buf, cons, 2), "little")
        check(seed, seq, _copy_out(buf, cons + 2, n))
        old, cons = cons, (cons + 2 + n) & MASK
        _put(buf, 8, cons)
        if _must_notify(old, cons, _get(buf, 12)):
            channel.notify()
    return count
