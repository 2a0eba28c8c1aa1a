"""Grant tables across a real domain link: the permission matrix, copy, limits, multi-grant maps.

Every test runs on each transport (socket over Unix, shared memory, socket over TCP).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.integration.hv_pair import TRANSPORT_IDS, TRANSPORTS, domains
from xenpv.hv import GNTST, CopyDirection, CopyOp, GrantError, PeerGone

pytestmark = pytest.mark.parametrize(("transport", "kind"), TRANSPORTS, ids=TRANSPORT_IDS)

OK = GNTST.GNTST_okay
GENERAL = GNTST.GNTST_general_error


def op(direction: CopyDirection, remote: int, gref: int, offset: int, buf: bytearray) -> CopyOp:
    return CopyOp(direction, remote, gref, offset, len(buf), memoryview(buf))


async def test_permission_matrix(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind, (0, 1, 2)) as (back, front, other):
            page = front.alloc_pages(1)[0]
            page.view[:4] = b"data"
            page.written(0, 4)
            rw = front.grants.grant_access(0, page.frame)
            ro = front.grants.grant_access(0, page.frame, readonly=True)
            ended = front.grants.grant_access(0, page.frame)
            front.grants.end_access(ended)

            # grantee: read-write and read-only maps work
            mapping = await back.map_grants(1, [rw])
            assert bytes(mapping.view[:4]) == b"data"
            ro_mapping = await back.map_grants(1, [ro], readonly=True)
            assert ro_mapping.view.readonly
            # another domain may not use a grant issued to domain 0 (Xen: general_error)
            with pytest.raises(GrantError) as err:
                await other.map_grants(1, [rw])
            assert err.value.status == GENERAL
            buf = bytearray(4)
            assert await other.grant_copy([op(CopyDirection.FROM_REMOTE, 1, rw, 0, buf)]) == [
                GENERAL
            ]
            # read-only: a writable map or a copy into it is refused
            with pytest.raises(GrantError) as err:
                await back.map_grants(1, [ro])
            assert err.value.status == GENERAL
            statuses = await back.grant_copy(
                [
                    op(CopyDirection.TO_REMOTE, 1, ro, 0, bytearray(b"xx")),
                    op(CopyDirection.FROM_REMOTE, 1, ro, 0, buf),
                ]
            )
            assert statuses == [GENERAL, OK]
            assert bytes(buf) == b"data"
            # ended and unknown references
            with pytest.raises(GrantError) as err:
                await back.map_grants(1, [ended])
            assert err.value.status == GENERAL
            with pytest.raises(GrantError) as err:
                await back.map_grants(1, [front.grants.nr_entries + 5])
            assert err.value.status == GNTST.GNTST_bad_gntref
            # still mapped: end_access refused until unmapped
            with pytest.raises(GrantError) as err:
                front.grants.end_access(rw)
            assert err.value.status == GNTST.GNTST_eagain
            await mapping.unmap()
            front.grants.end_access(rw)
            await ro_mapping.unmap()
            front.grants.end_access(ro)
            with pytest.raises(GrantError) as err:
                front.grants.end_access(ro)
            assert err.value.status == GNTST.GNTST_bad_gntref


async def test_copy_batch_statuses_and_bounds(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            data = bytes(range(256)) * 16
            statuses = await back.grant_copy(
                [
                    op(CopyDirection.TO_REMOTE, 1, gref, 0, bytearray(data)),
                    op(CopyDirection.TO_REMOTE, 1, gref, 4000, bytearray(200)),  # past 4096
                    op(CopyDirection.TO_REMOTE, 1, 3, 0, bytearray(1)),  # never granted
                ]
            )
            assert statuses == [OK, GNTST.GNTST_bad_copy_arg, GENERAL]
            assert bytes(page.view) == data
            out = bytearray(100)
            bad_len = CopyOp(CopyDirection.FROM_REMOTE, 1, gref, 0, 50, memoryview(out))
            good = op(CopyDirection.FROM_REMOTE, 1, gref, 3996, out)
            assert await back.grant_copy([bad_len, good]) == [GNTST.GNTST_bad_copy_arg, OK]
            assert bytes(out) == data[3996:]


async def test_granule_order_and_multi_grant_mappings(
    tmp_path: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            ring = front.alloc_buffer(4)
            scattered = front.alloc_pages(3)
            # make the scattered pages non-consecutive
            scattered = [scattered[2], scattered[0], scattered[1]]
            for i, page in enumerate(scattered):
                page.view[:2] = bytes([i, i])
                page.written(0, 2)
            ring.view[4096 * 3 : 4096 * 3 + 3] = b"end"
            ring.written(4096 * 3, 3)
            ring_refs = [front.grants.grant_access(0, f) for f in ring.frames()]
            mapping = await back.map_grants(1, ring_refs)
            assert len(mapping.view) == 4 * 4096
            assert bytes(mapping.view[4096 * 3 : 4096 * 3 + 3]) == b"end"
            refs = [front.grants.grant_access(0, p.frame) for p in scattered]
            spread = await back.map_grants(1, refs)
            assert [bytes(spread.view[i * 4096 : i * 4096 + 2]) for i in range(3)] == [
                bytes([i, i]) for i in range(3)
            ]
            spread.view[4096 + 10] = 0xAB
            spread.written(4096 + 10, 1)
            # a 16 KiB granule (order 2, docs/granule-extension.md)
            big = front.grants.grant_access(0, ring.frame, order=2)
            granule = await back.map_grants(1, [big])
            assert len(granule.view) == 16384
            for m in (mapping, spread, granule):
                await m.unmap()
            assert scattered[1].view[10] == 0xAB
            for gref in [*ring_refs, *refs, big]:
                front.grants.end_access(gref)


async def test_maptrack_and_grant_table_limits(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind, max_grants=16, max_maps=2) as (back, front):
            page = front.alloc_pages(1)[0]
            refs = [front.grants.grant_access(0, page.frame) for _ in range(8)]  # 8 reserved
            with pytest.raises(GrantError) as err:
                front.grants.grant_access(0, page.frame)
            assert err.value.status == GNTST.GNTST_no_space
            first = await back.map_grants(1, refs[:2])
            with pytest.raises(GrantError) as err:
                await back.map_grants(1, refs[2:3])
            assert err.value.status == GNTST.GNTST_no_space
            await first.unmap()
            again = await back.map_grants(1, refs[2:4])
            await again.unmap()


async def test_64k_page_guest_grants_each_4k_frame(
    tmp_path: Path, transport: str, kind: str
) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind, page_size=65536) as (back, front):
            assert front.page_size == 65536
            page = front.alloc_pages(1)[0]
            assert page.nframes == 16 and page.frame % 16 == 0
            for i in range(16):
                page.view[i * 4096] = i
            page.written(0, len(page.view))
            refs = [front.grants.grant_access(0, frame) for frame in page.frames()]
            mapping = await back.map_grants(1, refs)
            assert len(mapping.view) == 65536
            assert [mapping.view[i * 4096] for i in range(16)] == list(range(16))
            mapping.view[65535] = 0xEE
            mapping.written(65535, 1)
            await mapping.unmap()
            assert page.view[65535] == 0xEE
            for gref in refs:
                front.grants.end_access(gref)


async def test_unmap_revokes_old_views(tmp_path: Path, transport: str, kind: str) -> None:
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            page = front.alloc_pages(1)[0]
            gref = front.grants.grant_access(0, page.frame)
            mapping = await back.map_grants(1, [gref])
            old_view = mapping.view
            await mapping.unmap()
            with pytest.raises(PeerGone):
                mapping.view  # noqa: B018 (an unmapped mapping refuses use)
            old_view[0] = 0x77  # safe to touch, but it is no longer the granter's page
            assert page.view[0] == 0


async def test_copy_runs_match_segment_by_segment_copies(
    tmp_path: Path, transport: str, kind: str
) -> None:
    """grant_copy_runs (back-to-back segments merged into one memcpy on shared memory) gives
    the statuses and bytes of the equivalent CopyOps, bad segments in the middle included."""
    with trio.fail_after(20):
        async with domains(tmp_path, transport, kind) as (back, front):
            buffer = front.alloc_buffer(6)
            buffer.view[:] = bytes(i % 251 for i in range(len(buffer.view)))
            frames = list(buffer.frames())
            grefs = [front.grants.grant_access(0, f) for f in frames[:4]]
            readonly = front.grants.grant_access(0, frames[4], readonly=True)
            to, frm = int(CopyDirection.TO_REMOTE), int(CopyDirection.FROM_REMOTE)
            gathered = bytearray(5 * 4096)
            segments = [
                (frm, grefs[0], 100, 3996, 0),  # a run over three grants...
                (frm, grefs[1], 0, 4096, 3996),
                (frm, grefs[2], 0, 1000, 8092),
                (frm, 9999, 0, 10, 9092),  # ...broken by a reference never granted
                (frm, grefs[3], 0, 4096, 9102),
                (frm, readonly, 0, 4096, 13198),  # reading a read-only grant is fine
                (frm, grefs[3], 4000, 200, 0),  # past the grant
                (frm, grefs[3], 0, 10, -1),  # before the buffer
                (frm, grefs[3], 0, 10, len(gathered) - 5),  # past the buffer
            ]
            statuses = await back.grant_copy_runs(1, [(memoryview(gathered), segments)])
            bad = GNTST.GNTST_bad_copy_arg
            assert statuses == [OK, OK, OK, GNTST.GNTST_bad_gntref, OK, OK, bad, bad, bad]
            source = bytes(buffer.view)
            assert gathered[:9092] == source[100:9192]
            assert gathered[9102:13198] == source[3 * 4096 : 4 * 4096]
            assert gathered[13198:17294] == source[4 * 4096 : 5 * 4096]

            scattered = bytes(range(256)) * 32
            statuses = await back.grant_copy_runs(
                1,
                [
                    (
                        memoryview(scattered),
                        [
                            (to, grefs[0], 0, 4096, 0),
                            (to, grefs[1], 0, 4096, 4096),
                            (to, readonly, 0, 16, 0),  # writing a read-only grant is not
                        ],
                    )
                ],
            )
            assert statuses == [OK, OK, GENERAL]
            assert bytes(buffer.view[: 2 * 4096]) == scattered
            assert bytes(buffer.view[4 * 4096 : 4 * 4096 + 16]) == source[4 * 4096 : 4 * 4096 + 16]
