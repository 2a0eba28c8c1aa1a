"""Event channel ports, sans-IO: pending-bit coalescing, masking, close."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from xenpv.hv import EventChannel, EventChannelClosed


class Owner:
    def __init__(self) -> None:
        self.sent: list[int] = []
        self.closed: list[int] = []

    def send_event(self, channel: EventChannel) -> None:
        self.sent.append(channel.port)

    def close_port(self, channel: EventChannel) -> None:
        self.closed.append(channel.port)

    def event_source(self, channel: EventChannel) -> None:
        return None  # events are raised by the test itself


async def test_coalescing_wakes_once() -> None:
    channel = EventChannel(Owner(), 5, 0, 7)
    wakes = 0

    async def handler() -> None:
        nonlocal wakes
        while True:
            await channel.wait()
            wakes += 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(10):
                channel.raise_event()
            await trio.testing.wait_all_tasks_blocked()
            assert wakes == 1
            channel.raise_event()
            await trio.testing.wait_all_tasks_blocked()
            assert wakes == 2
            nursery.cancel_scope.cancel()


async def test_masked_port_stays_pending_until_unmasked() -> None:
    channel = EventChannel(Owner(), 5, 0, 7)
    woke = trio.Event()

    async def handler() -> None:
        await channel.wait()
        woke.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            channel.mask()
            nursery.start_soon(handler)
            channel.raise_event()
            await trio.testing.wait_all_tasks_blocked()
            assert channel.pending and not woke.is_set()
            assert not channel.consume()
            channel.unmask()
            await woke.wait()
            assert not channel.pending


async def test_notify_close_and_peer_close() -> None:
    owner = Owner()
    unbound = EventChannel(owner, 3, 0, None)
    unbound.notify()  # unbound: dropped, as Xen does
    assert owner.sent == []
    bound = EventChannel(owner, 4, 0, 9)
    bound.notify()
    assert owner.sent == [4]
    bound.raise_event()
    bound.peer_closed("peer closed")
    with trio.fail_after(5):
        await bound.wait()  # the pending event first
        with pytest.raises(EventChannelClosed):
            await bound.wait()
    with pytest.raises(EventChannelClosed):
        bound.notify()
    unbound.close()
    assert owner.closed == [3]
    unbound.close()  # idempotent
    assert owner.closed == [3]
    bound.close()  # closed by the peer: the port is still ours to release, once
    bound.close()
    assert owner.closed == [3, 4]
