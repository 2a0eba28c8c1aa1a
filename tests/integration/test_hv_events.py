"""Event channels across a real link: binding, coalescing, masking, close, on every transport."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tests.integration.hv_pair import TRANSPORT_IDS, TRANSPORTS, domains
from xenpv.hv import CopyDirection, CopyOp, Domain, EventChannel, EventChannelClosed, HvError

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)


async def offer_and_bind(offering: Domain, binding: Domain) -> tuple[EventChannel, EventChannel]:
    """A port `offering` offers to `binding`, and `binding`'s port bound to it."""
    offered = await offering.alloc_unbound(binding.domid)
    return offered, await binding.bind_interdomain(offering.domid, offered.port)


async def test_coalescing_and_masking(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            unbound, bound = await offer_and_bind(front, back)
            assert unbound.remote_port == bound.port
            assert bound.remote_port == unbound.port

            # several notifies before the handler runs deliver once
            for _ in range(5):
                bound.notify()
            await unbound.wait()
            assert not unbound.pending
            bound.notify()  # a marker: when it is seen, all earlier events were delivered
            await unbound.wait()
            assert not unbound.consume()

            # masked: the event stays pending, wait does not return until unmask
            echo_front, echo_back = await offer_and_bind(front, back)

            async def echo() -> None:
                while True:
                    await echo_front.wait()
                    echo_front.notify()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                unbound.mask()
                bound.notify()
                echo_back.notify()
                # front handles link messages in order: its echo proves it saw the event
                await echo_back.wait()
                assert unbound.pending
                assert not unbound.consume()
                with trio.move_on_after(0.05) as scope:
                    await unbound.wait()
                assert scope.cancelled_caught
                unbound.unmask()
                await unbound.wait()
                nursery.cancel_scope.cancel()


async def test_close_is_seen_by_peer(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            unbound, bound = await offer_and_bind(front, back)
            bound.notify()
            bound.close()
            await unbound.wait()  # the event sent before close is still delivered
            with pytest.raises(EventChannelClosed):
                await unbound.wait()
            with pytest.raises(EventChannelClosed):
                unbound.notify()
            with pytest.raises(EventChannelClosed):
                bound.notify()


async def test_bind_errors(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind, (0, 1, 2)) as (back, front, other):
            unbound = await front.alloc_unbound(0)
            with pytest.raises(HvError):
                await other.bind_interdomain(1, unbound.port)  # offered to domain 0 only
            with pytest.raises(HvError):
                await back.bind_interdomain(1, 999)  # no such port
            await back.bind_interdomain(1, unbound.port)
            with pytest.raises(HvError):
                await back.bind_interdomain(1, unbound.port)  # already bound


async def test_a_waiter_receiving_for_the_link_serves_every_port_and_call(
    tmp_path: Path, transport: str, kind: str
) -> None:
    """A task waiting on one port receives the link's messages itself (evtchn.wait borrows
    the socket): events for other ports, replies to other tasks' calls and the peer's
    requests are all still handled, in order, and the link's reader takes over after."""
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            first, first_back = await offer_and_bind(front, back)
            second, second_back = await offer_and_bind(front, back)
            frame = back.alloc_buffer(1)
            frame.view[:5] = b"hello"
            gref = back.grants.grant_access(1, next(iter(frame.frames())))
            seen: list[str] = []

            async with trio.open_nursery() as nursery:

                async def wait_first() -> None:
                    await first.wait()
                    seen.append("first")

                async def wait_second() -> None:
                    await second.wait()
                    seen.append("second")

                nursery.start_soon(wait_first)
                nursery.start_soon(wait_second)
                await trio.testing.wait_all_tasks_blocked()
                second_back.notify()
                # a call from front while one of its waiters is receiving for the link
                local = front.alloc_buffer(1)
                statuses = await front.grant_copy(
                    [CopyOp(CopyDirection.FROM_REMOTE, 0, gref, 0, 5, local.view[:5])]
                )
                assert statuses == [0]
                assert bytes(local.view[:5]) == b"hello"
                first_back.notify()
            assert sorted(seen) == ["first", "second"]

            # nobody waits now: the link's own reader handles the peer's events
            first_back.notify()
            echo, echo_front = await offer_and_bind(back, front)
            echo_front.notify()
            await echo.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert first.consume()


async def test_unmask_and_close_reach_a_waiter_receiving_for_the_link(
    tmp_path: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            port, peer = await offer_and_bind(front, back)
            port.mask()
            peer.notify()
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def waiter() -> None:
                    await port.wait()  # receives the event, stays asleep while masked
                    done.set()

                nursery.start_soon(waiter)
                while not port.pending:  # the waiter is receiving for the link
                    await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                port.unmask()  # wakes the waiter out of its socket wait
                await done.wait()

            nursery_done = trio.Event()
            async with trio.open_nursery() as nursery:

                async def closed_waiter() -> None:
                    with pytest.raises(EventChannelClosed):
                        await port.wait()
                    nursery_done.set()

                nursery.start_soon(closed_waiter)
                await trio.testing.wait_all_tasks_blocked()
                port.close()
            assert nursery_done.is_set()
