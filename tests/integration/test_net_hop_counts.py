"""Per-frame costs of one small frame guest -> switch -> guest, counted rather than timed
(docs/net.md, "Per-frame budget"): link messages and task steps per 64-byte frame sent one at a
time (ping-style: each frame is received before the next is sent), all domains in this process.

The bounds are the counts measured when the budget was written, with a little room; a change
that adds a hop (a hand-off task, an extra notification, an UPDATE per slot) fails here on any
host."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
import trio.testing

from tests.integration.conftest import Xenstored
from tests.integration.task_steps import counting_task_steps
from tests.integration.test_netback import TRANSPORTS, frame, netback
from tests.integration.test_netback_netfront import netfronts

FRAMES = 100
# Measured (docs/net.md, "Per-frame budget"): socket ~22.2 link messages (3 EVENTs, the
# tx and rx COPYs and their REPLYs, ~15 UPDATEs) and ~73.5 task steps per frame; shm 3
# messages (the 3 EVENTs: tx request, tx response, rx) and ~12.5 task steps. The bounds leave
# a little room.
MAX_LINK_MESSAGES_PER_FRAME = {"socket": 24.5, "shm": 3.5}
MAX_TASK_STEPS_PER_FRAME = {"socket": 84.0, "shm": 15.0}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_one_small_frame_costs_few_link_messages_and_task_steps(
    xenstored: Xenstored, transport: str
) -> None:
    with trio.fail_after(60):
        async with (
            netback(xenstored, transport, {1: 4096, 2: 4096}) as (xs, doms, _vifs, _sw),
            AsyncExitStack() as stack,
            netfronts(stack, doms, xs, (1, 2)) as (a, b),
        ):
            warm = frame(1, 2, 64, 0)
            await a.send(warm)
            assert (await b.receive()).frame == warm
            await trio.testing.wait_all_tasks_blocked()
            links = [
                link
                for d0, d1 in ((0, 1), (1, 0), (0, 2), (2, 0))
                if (link := doms[d0].link_to(d1)) is not None
            ]
            assert len(links) == 4
            before = sum(link.messages_received for link in links)
            with counting_task_steps() as steps:
                for seq in range(1, FRAMES + 1):
                    sent = frame(1, 2, 64, seq)
                    await a.send(sent)
                    assert (await b.receive()).frame == sent
            messages = (sum(link.messages_received for link in links) - before) / FRAMES
            per_frame = steps.steps / FRAMES
            print(f"{transport}: {messages:.2f} link messages, {per_frame:.2f} task steps")
            assert messages <= MAX_LINK_MESSAGES_PER_FRAME[transport]
            assert per_frame <= MAX_TASK_STEPS_PER_FRAME[transport]
