"""The hypervisor seams a fault run's agent drives, across a real link (socket transport):
outgoing event notifications (`PortTable.faults`), grant maps and copies
(`GrantMapper.faults`), and link faults installed and removed at run time."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import domains
from tests.unit.faults_helpers import fault
from xenpv.faults.agent import EventInjector, GrantInjector
from xenpv.faults.link import LinkInjector
from xenpv.hv import CopyDirection, CopyOp, EventChannelClosed, GrantError
from xenpv.hv.domain import Domain
from xenpv.hv.evtchn import EventChannel
from xenpv.hv.gntst import GNTST


async def _channel(back: Domain, front: Domain) -> tuple[EventChannel, EventChannel]:
    """An event channel from `front` to `back`: (back's end, front's end)."""
    offered = await back.alloc_unbound(front.domid)
    return offered, await front.bind_interdomain(back.domid, offered.port)


async def test_event_drop_and_duplicate_through_the_port_table(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            offered, bound = await _channel(back, front)
            marker_offered, marker = await _channel(back, front)
            events = EventInjector(1, spawn=lambda *a: None)
            drop = fault("event.drop", "domain:front")
            events.start(drop, back.domid, None)
            front.ports.faults = events
            bound.notify()  # dropped at the source
            events.stop(drop)
            front.ports.faults = None  # healed: the seam is gone
            marker.notify()  # the link keeps order: once it is seen, the other would have been
            await marker_offered.wait()
            assert not offered.pending
            bound.notify()
            await offered.wait()


async def test_grant_map_and_copy_fail_while_the_fault_is_active(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            page = front.alloc_pages(1)[0]
            page.view[:4] = b"data"
            page.written(0, 4)
            gref = front.grants.grant_access(back.domid, page.frame)
            grants = GrantInjector(1)
            f = fault("grant.map-fail", "domain:back", status="GNTST_eagain")
            grants.start(f, front.domid, None)
            back.mapper.faults = grants
            with pytest.raises(GrantError) as err:
                await back.map_grants(front.domid, [gref])
            assert err.value.status == GNTST.GNTST_eagain
            buf = bytearray(4)
            read = CopyOp(CopyDirection.FROM_REMOTE, front.domid, gref, 0, 4, memoryview(buf))
            assert await back.grant_copy([read]) == [GNTST.GNTST_eagain]
            grants.stop(f)
            back.mapper.faults = None
            mapping = await back.map_grants(front.domid, [gref])
            assert bytes(mapping.view[:4]) == b"data"
            assert await back.grant_copy([read]) == [GNTST.GNTST_okay]
            assert bytes(buf) == b"data"


async def test_link_faults_installed_and_removed_at_run_time(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, "socket", "unix") as (back, front):
            offered, bound = await _channel(back, front)
            marker_offered, _marker = await _channel(back, front)
            link = LinkInjector({"back": back.domid, "front": front.domid}, seed=1)
            partition = fault("link.partition", "link:back-front", direction="both", mode="drop")
            link.start(partition)
            front.set_link_faults(link)  # on the live link, not only on later ones
            bound.notify()  # the partition fails the live link (never a silent drop)
            with pytest.raises(EventChannelClosed):
                await marker_offered.wait()
            assert not offered.pending
            link.stop(partition)
            front.set_link_faults(None)
            again, rebound = await _channel(back, front)  # a new link, with no seam
            rebound.notify()
            await again.wait()
