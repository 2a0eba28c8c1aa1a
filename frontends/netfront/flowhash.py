"""Queue selection: hash a frame's flow to one of the negotiated queues.

Linux netfront's `xennet_select_queue` takes `skb_get_hash(skb) % num_queues`, where the hash
comes from the flow dissector: L3 addresses, L4 protocol and ports (addresses only for
fragments). We hash the same fields with CRC-32 (a fixed seed instead of Linux's per-boot
random one, so tests are reproducible). Non-IP frames hash their Ethernet addresses and
type, so an ARP exchange, like any flow, stays on one queue. One flow → one queue → one
ring: per-flow order is preserved end to end.
"""

from __future__ import annotations

import struct
import zlib

from frontends.netfront.headers import ETH_HLEN, parse

_PORTS = struct.Struct("!BHH")


def flow_hash(frame: bytes | memoryview, seed: int = 0) -> int:
    """A 32-bit hash of the frame's flow (equal for every frame of one flow)."""
    headers = parse(frame)
    if headers is None:
        key = bytes(frame[:ETH_HLEN])
    else:
        ports = _PORTS.pack(headers.l4_proto, headers.sport, headers.dport)
        key = headers.src + headers.dst + ports
    return zlib.crc32(key, seed & 0xFFFFFFFF)


def select_queue(frame: bytes | memoryview, nr_queues: int, seed: int = 0) -> int:
    """`skb_get_hash(skb) % num_queues`."""
    if nr_queues <= 1:
        return 0
    return flow_hash(frame, seed) % nr_queues
