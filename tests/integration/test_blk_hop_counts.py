"""Per-request costs of a QD1 blk read, counted rather than timed (docs/blk.md, "Per-request
budget"): link messages and task steps per 4 KiB read with both domains in this process.

The bounds are the counts measured when the budget was written, with a little room; a change
that adds a hop (a hand-off task, an extra notification, an UPDATE per request) fails here on
any host."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from frontends.blkfront import attach
from tests.integration.blk_env import DEVICE, FEATURES_OFF, make_vbd, pair, start_backend
from tests.integration.conftest import Xenstored
from tests.integration.task_steps import counting_task_steps

READS = 100
# Measured (docs/blk.md, "Per-request budget"): socket 9.5 link messages (2 EVENTs, the
# data's COPY and its REPLY, 5.5 UPDATEs) and ~20.4 task steps per read; shm 2 messages (the
# two EVENTs) and ~8.3 task steps. The bounds are those counts with a little room.
MAX_LINK_MESSAGES_PER_READ = {"socket": 10.5, "shm": 2.5}
MAX_TASK_STEPS_PER_READ = {"socket": 25.0, "shm": 11.0}


@pytest.mark.parametrize("transport", ["socket", "shm"])
async def test_a_qd1_read_costs_few_link_messages_and_task_steps(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    image = xs_workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, transport, 4096) as p:
            await make_vbd(p.xs, image=str(image), size=1 << 20, features=FEATURES_OFF)
            async with trio.open_nursery() as nursery:
                start_backend(nursery, p)
                async with attach(p.guest, p.xs, DEVICE, granule_order=0) as front:
                    await front.wait_connected()
                    assert await front.read(0, 4096) == bytes(4096)  # warm
                    await trio.testing.wait_all_tasks_blocked()
                    links = [p.backend.link_to(1), p.guest.link_to(0)]
                    assert all(link is not None for link in links)
                    before = sum(link.messages_received for link in links if link is not None)
                    with counting_task_steps() as steps:
                        for i in range(READS):
                            assert await front.read((i % 64) * 4096, 4096) == bytes(4096)
                    after = sum(link.messages_received for link in links if link is not None)
                    messages = (after - before) / READS
                    per_read = steps.steps / READS
                    print(f"{transport}: {messages:.2f} link messages, {per_read:.2f} task steps")
                    assert messages <= MAX_LINK_MESSAGES_PER_READ[transport]
                    assert per_read <= MAX_TASK_STEPS_PER_READ[transport]
                nursery.cancel_scope.cancel()
