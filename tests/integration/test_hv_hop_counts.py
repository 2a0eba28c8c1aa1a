"""Per-request costs of the hypervisor's latency path, counted rather than timed.

A regression that adds a link message, an UPDATE or a task step to a single grant copy fails
here on any host, loaded or not (docs/hypervisor.md, "Per-request budget").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.integration.hv_pair import TRANSPORT_IDS, TRANSPORTS, domains
from tests.integration.task_steps import counting_task_steps
from xenpv.hv import GNTST, CopyDirection, CopyOp

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)

COPIES = 50
# Task steps of the whole process per copy: the caller's own steps (send, receive its reply in
# receive_until) and the peer's reader (wake, handle, park). Measured 2-6 per copy; the bound
# leaves room for the adaptive poll's yields but fails if a hand-off task joins the path.
MAX_TASK_STEPS_PER_COPY = 12


async def test_a_grant_copy_costs_one_message_each_way_and_few_task_steps(
    tmp_path: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(30):
        async with domains(tmp_path, transport, kind) as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            page.view[:4] = b"ping"
            out = bytearray(64)
            read = CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, len(out), memoryview(out))
            assert await back.grant_copy([read]) == [GNTST.GNTST_okay]  # link up, warm
            # On shared memory the copy needs no answer, so the front may still be accepting
            # the link: let every task settle before reading both ends.
            await trio.testing.wait_all_tasks_blocked()
            to_front, to_back = back.link_to(1), front.link_to(0)
            assert to_front is not None and to_back is not None
            sent_before, received_before = to_back.messages_received, to_front.messages_received
            with counting_task_steps() as steps:
                for _ in range(COPIES):
                    assert await back.grant_copy([read]) == [GNTST.GNTST_okay]
            assert bytes(out[:4]) == b"ping"
            # Socket: one COPY request and one REPLY per copy, nothing else crosses the link.
            # Shared memory: the copy is a memcpy in the caller; nothing crosses the link.
            expected = 0 if transport == "shm" else COPIES
            assert to_back.messages_received - sent_before == expected
            assert to_front.messages_received - received_before == expected
            print(f"{transport}-{kind}: {steps.steps / COPIES:.2f} task steps per copy")
            assert steps.steps <= MAX_TASK_STEPS_PER_COPY * COPIES, steps.steps / COPIES
