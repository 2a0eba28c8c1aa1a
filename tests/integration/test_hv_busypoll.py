"""Busy polling reaches the waits it is meant for (docs/hypervisor.md, busypoll.py).

A regression guard, not a timing test: it counts how often a waiter *tried* to poll, which
does not depend on the machine's speed. A notify round trip with an echoing domain in
another process leaves, at each wait, no task of ours runnable but the link's reader that
the waiter itself woke; such a wait must poll before it sleeps (a check that counted that
reader as "another runnable task" once turned polling off for every such wait, and the
round trip went from ~20 to ~100 µs without any test noticing).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from xenpv.bench.link import CHILD_DOMID, _pair
from xenpv.hv.busypoll import AdaptivePoll
from xenpv.toolstack.supervisor import Supervisor

T = TypeVar("T")
ROUND_TRIPS = 200


class CountingPoll(AdaptivePoll):
    """The link's poll, counting the spins it is asked for."""

    __slots__ = ("spins",)

    def __init__(self, maximum: float) -> None:
        super().__init__(maximum)
        self.spins = 0

    def spin(self, attempt: Callable[[], T | None]) -> T | None:
        self.spins += 1
        return super().spin(attempt)


async def test_a_waiter_polls_before_sleeping_on_a_notify_round_trip(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    sup = Supervisor()
    try:
        with trio.fail_after(60):
            async with _pair(sup, tmp_path, "socket", busy_poll_us=50.0) as pair:
                await pair.ping()  # the link is up
                link = pair.dom.link_to(CHILD_DOMID)
                assert link is not None
                poll = CountingPoll(50e-6)
                link._poll = poll
                for _ in range(ROUND_TRIPS):
                    await pair.ping()
                # Each wait polls unless the echo was already there on its first look (rare: the
                # peer is another process); generous, so that a slow machine cannot fail it.
                assert poll.spins >= ROUND_TRIPS // 2, poll.spins
    finally:
        await sup.stop()  # the echoing child, whatever happened
