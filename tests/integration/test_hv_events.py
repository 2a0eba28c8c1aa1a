"""Event channels across a real link: binding, coalescing, masking, close, on every transport."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import TRANSPORT_IDS, TRANSPORTS, domains
from xenpv.hv import EventChannelClosed, HvError

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)


async def test_coalescing_and_masking(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            unbound = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, unbound.port)
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
            unbound.mask()
            bound.notify()
            unbound.notify()
            await bound.wait()  # the round trip proves front processed the event
            assert unbound.pending
            assert not unbound.consume()
            with trio.move_on_after(0.05) as scope:
                await unbound.wait()
            assert scope.cancelled_caught
            unbound.unmask()
            await unbound.wait()


async def test_close_is_seen_by_peer(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            unbound = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, unbound.port)
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
