"""blkfront's I/O splitting (frontends/blkfront/split.py): Linux's segment rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontends.blkfront.split import Chunk, Limits, chunks, plan


def test_linux_64k_page_without_indirect_is_two_linked_requests() -> None:
    pieces = chunks(0, 65536, 4096)
    assert len(pieces) == 16
    parts = plan(pieces, 100, Limits(11))
    assert [(p.first, p.count, p.sector, p.indirect) for p in parts] == [
        (0, 11, 100, False),
        (11, 5, 100 + 11 * 8, False),
    ]


def test_indirect_request_for_more_than_11_grants() -> None:
    parts = plan(chunks(0, 1 << 20, 4096), 0, Limits(256))
    assert [(p.count, p.indirect, p.sector) for p in parts] == [(256, True, 0)]
    parts = plan(chunks(512, 1 << 20, 4096), 0, Limits(32))
    assert [p.count for p in parts] == [32] * 8 + [1]
    assert all(p.indirect for p in parts[:-1]) and not parts[-1].indirect


def test_unaligned_chunks_have_sector_ranges_inside_the_frame() -> None:
    pieces = chunks(3584, 1024, 4096)
    assert pieces == [Chunk(3584, 512), Chunk(4096, 512)]
    assert pieces[0].sectors(4096) == (7, 7) and pieces[0].frame_index(4096) == 0
    assert pieces[1].sectors(4096) == (0, 0) and pieces[1].frame_index(4096) == 1


def test_4096_byte_sectors_end_requests_on_block_boundaries() -> None:
    parts = plan(chunks(0, 20 * 4096, 4096), 8, Limits(11, 4096))
    assert [(p.count, p.sector) for p in parts] == [(11, 8), (9, 8 + 88)]
    with pytest.raises(ValueError):
        plan(chunks(512, 16 * 4096, 4096), 0, Limits(11, 4096))


@settings(max_examples=300)
@given(
    start=st.integers(0, 127).map(lambda n: n * 512),
    length=st.integers(1, 2048).map(lambda n: n * 512),
    sector=st.integers(0, 1 << 30),
    max_segments=st.sampled_from([11, 16, 32, 256, 4096]),
)
def test_plan_covers_every_byte_once(
    start: int, length: int, sector: int, max_segments: int
) -> None:
    pieces = chunks(start, length, 4096)
    # one segment per 4K chunk, never empty, never crossing a frame
    assert all(0 < c.length <= 4096 for c in pieces)
    assert all(c.offset // 4096 == (c.offset + c.length - 1) // 4096 for c in pieces)
    assert [c.offset for c in pieces] == [
        start + sum(p.length for p in pieces[:i]) for i in range(len(pieces))
    ]
    assert sum(c.length for c in pieces) == length
    parts = plan(pieces, sector, Limits(max_segments))
    expected_sector = sector
    covered = 0
    for part in parts:
        assert 1 <= part.count <= max_segments
        assert part.indirect == (part.count > 11)
        assert part.first == covered
        assert part.sector == expected_sector
        covered += part.count
        expected_sector += (
            sum(c.length for c in pieces[part.first : part.first + part.count]) // 512
        )
    assert covered == len(pieces)
    for c in pieces:
        first, last = c.sectors(4096)
        assert 0 <= first <= last <= 7
        assert (last - first + 1) * 512 == c.length
