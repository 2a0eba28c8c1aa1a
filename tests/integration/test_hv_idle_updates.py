"""An UPDATE that changes no replica byte raises no event (socket transport).

Drivers rewrite their event indexes on every wake, usually with the value already there. If
such a rewrite raised the peer's ports (the coherence rule's spurious event), two idle ends
would wake each other forever: in the compose cluster every idle link carried ~2,000
messages/s and the domains burned over a core between them (docs/compose.md). A changed byte
still raises (test_hv_coherence.py: the Dekker race needs it).
"""

from __future__ import annotations

from pathlib import Path

import trio

from tests.integration.hv_pair import domains
from tests.integration.test_hv_coherence import PROD, get, one_page_ring, put
from xenpv.hv import CopyDirection, CopyOp


async def test_unchanged_rewrite_is_not_an_event_a_change_is(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            page, gref, _, ring, consumer_port = await one_page_ring(back, front)
            buf = bytearray(4)
            fence = [CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 4, memoryview(buf))]

            put(page, PROD, 0)  # the value the replica already holds
            await back.grant_copy(fence)  # its reply follows the UPDATE on the ordered link
            assert not consumer_port.pending

            put(page, PROD, 7)
            await back.grant_copy(fence)
            assert get(ring, PROD) == 7
            await consumer_port.wait()
            await ring.unmap()
