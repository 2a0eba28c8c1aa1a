"""LinkInjector on real domain links: scheduled faults reach the hypervisor's seam."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import domains
from tests.unit.faults_helpers import fault
from xenpv.faults.injectors import Injection
from xenpv.faults.link import LinkInjector
from xenpv.hv import CopyDirection, CopyOp, EventChannelClosed, PeerGone


async def test_delay_loss_heal_and_partition_through_the_seam(tmp_path: Path) -> None:
    injector = LinkInjector({"back": 0, "front": 1}, seed=1)
    with trio.fail_after(30):
        async with domains(tmp_path, "socket", "unix", faults=injector) as (back, front):
            unbound = await front.alloc_unbound(0)
            bound = await back.bind_interdomain(1, unbound.port)
            with Injection([injector]) as injection:
                delay = fault("link.delay", "link:back-front", "f0.0", delay=0.3, jitter=0.0)
                injection.start(delay)
                start = trio.current_time()
                bound.notify()
                await unbound.wait()
                unbound.consume()
                assert trio.current_time() - start >= 0.3
                injection.stop(delay)

                # A lost message fails the link, as a broken connection: both ends' ports
                # close (never a silently lost event), and after the heal a new link works.
                loss = fault("link.loss", "link:back-front", "f1.0")
                injection.start(loss)
                bound.notify()
                with pytest.raises(EventChannelClosed):
                    await unbound.wait()
                with pytest.raises(EventChannelClosed):
                    await bound.wait()
                assert back.link_to(1) is None and front.link_to(0) is None
                injection.stop(loss)  # healed: the next link carries events again
                unbound = await front.alloc_unbound(0)
                bound = await back.bind_interdomain(1, unbound.port)
                bound.notify()
                await unbound.wait()
                unbound.consume()

                injection.start(
                    fault(
                        "link.partition", "link:back-front", "f2.0", direction="both", mode="fail"
                    )
                )
                page = front.alloc_pages(1)[0]
                gref = front.grants.grant_access(0, page.frame)
                buf = bytearray(8)
                copy = [CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 8, memoryview(buf))]
                with pytest.raises(PeerGone):
                    await back.grant_copy(copy)
            assert injector.active == []  # leaving the block healed the partition
