"""A grant revoked while mapped: Xen's granting side refuses (`end_access` fails with
GNTST_eagain while the peer maps it); a hostile granter's forced revoke
(`Domain.revoke_access`) kills the peer's mapping, whose next access faults with a GNTST
error (never PeerGone: the peer is still there), and new maps of the grant fail until the
owner ends it or it is restored."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import domains
from xenpv.hv import GrantError
from xenpv.hv.gntst import GNTST


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
