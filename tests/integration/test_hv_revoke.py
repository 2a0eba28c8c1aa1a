"""A grant revoked while mapped: Xen's granting side refuses (`end_access` fails with
GNTST_eagain while the peer maps it); a hostile granter's forced revoke
(`Domain.revoke_access`) kills the peer's mapping, whose next access faults with a GNTST
error (never PeerGone: the peer is still there), and new maps of the grant fail until the
owner ends it or it is restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from backends.blkback import BlkbackDevice
from frontends.blkfront import BlkError
from frontends.blkfront import attach as blk_attach
from tests.integration.blk_env import DEVICE, make_vbd, pair
from tests.integration.conftest import Xenstored
from tests.integration.hv_pair import domains
from xenpv.abi.blkif import BLKIF_RSP_ERROR
from xenpv.hv import GrantError
from xenpv.hv.gntst import GNTST
from xenpv.toolstack.topology import VbdFeatures


@pytest.mark.parametrize("transport", ["shm", "socket"])
async def test_revoke_while_mapped(tmp_path: Path, transport: str) -> None:
    with trio.fail_after(30):
        async with domains(tmp_path, transport, "unix") as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            mapping = await back.map_grants(1, [gref])
            assert len(mapping.view) == 4096

            with pytest.raises(GrantError) as refused:  # what Xen does for the granter
                front.grants.end_access(gref)
            assert refused.value.status == GNTST.GNTST_eagain

            offered = await back.alloc_unbound(1)
            doorbell = await front.bind_interdomain(0, offered.port)
            assert front.revoke_access(gref)
            doorbell.notify()  # the link keeps order: the REVOKE is handled before this
            await offered.wait()
            with pytest.raises(GrantError) as faulted:
                _ = mapping.view
            assert faulted.value.status == GNTST.GNTST_general_error
            with pytest.raises(GrantError):
                await back.map_grants(1, [gref])
            assert not front.revoke_access(gref)  # nothing mapped any more

            front.grants.restore(gref)  # a heal: the same reference again
            again = await back.map_grants(1, [gref])
            await again.unmap()
            front.grants.end_access(gref)  # unmapped: ends normally

            second = front.grants.grant_access(0, page.frame)
            await back.map_grants(1, [second])
            assert front.revoke_access(second)
            front.grants.end_access(second)  # the owner ends what was taken: no error
            assert front.grants.revoked == []


@pytest.mark.parametrize("transport", ["shm", "socket"])
async def test_blkback_fails_requests_on_revoked_grants_and_recovers(
    xenstored: Xenstored, xs_workdir: Path, transport: str
) -> None:
    features = VbdFeatures(queues=1, ring_page_order=0, indirect_segments=0)
    with trio.fail_after(60):
        async with pair(xs_workdir, xenstored.unix, transport, 4096, guest_memory=32 << 20) as p:
            await make_vbd(p.xs, size=4 << 20, features=features)
            backend = BlkbackDevice(p.backend, p.xs, DEVICE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(backend.run)
                async with blk_attach(p.guest, p.xs, DEVICE) as front:
                    for n in range(8):  # the backend maps (and keeps) the data grants
                        await front.write(4096 * n, bytes([n]) * 4096)
                    ring = int(await p.xs.read(f"{DEVICE.frontend}/ring-ref"))
                    data = [g for g in p.guest.grants.mapped if g != ring]
                    assert data
                    for gref in data:  # the frontend (the granter) turns hostile
                        assert p.guest.revoke_access(gref)
                    failed = 0
                    for n in range(8):
                        try:
                            await front.write(4096 * n, b"x" * 4096)
                        except BlkError as exc:
                            assert exc.status == BLKIF_RSP_ERROR
                            failed += 1
                    assert failed  # answered with an error, never a hang or a crash
                    for gref in data:  # healed: granted again under the same references
                        p.guest.grants.restore(gref)
                    for n in range(8):
                        await front.write(4096 * n, bytes([n + 1]) * 4096)
                        assert await front.read(4096 * n, 4096) == bytes([n + 1]) * 4096
                    assert backend.connections == 1  # one connection served it all
                nursery.cancel_scope.cancel()
