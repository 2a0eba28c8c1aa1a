"""Queue selection: Linux netfront's `xennet_select_queue`, `skb_get_hash(skb) % num_queues`.

The hash is `xenpv.ethernet.flow_hash` (what the flow dissector feeds `skb_get_hash`): one
flow → one queue → one ring, so per-flow order is preserved end to end.
"""

from __future__ import annotations

from xenpv.ethernet import flow_hash


def select_queue(frame: bytes | memoryview, nr_queues: int, seed: int = 0) -> int:
    """`skb_get_hash(skb) % num_queues`."""
    if nr_queues <= 1:
        return 0
    return flow_hash(frame, seed) % nr_queues
