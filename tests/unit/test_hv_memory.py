"""Domain memory: page sizes, allocation, frames, and replica write forwarding."""

from __future__ import annotations

import pytest

from xenpv.hv import PAGE_SIZES, DomainMemory, HvError, OutOfMemory


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_pages_are_aligned_contiguous_frames(page_size: int) -> None:
    memory = DomainMemory(1, 16 * page_size, page_size, 64)
    per_page = page_size // 4096
    pages = memory.alloc_pages(3)
    for page in pages:
        assert page.frame % per_page == 0
        assert page.nframes == per_page
        assert len(page.view) == page_size
        assert list(page.frames()) == list(range(page.frame, page.frame + per_page))
    assert len({p.frame for p in pages}) == 3
    ring = memory.alloc_buffer(per_page + 1)  # a run of two pages
    assert ring.nframes == per_page + 1
    assert ring.frame % per_page == 0
    ring.view[-1] = 9
    assert memory.frame_view(ring.frame + ring.nframes - 1)[-1] == 9
    memory.free_pages(pages)
    with pytest.raises(HvError):
        memory.free_pages(pages[:1])
    assert len(memory.alloc_pages(14)) == 14
    with pytest.raises(OutOfMemory):
        memory.alloc_pages(1)


def test_bad_configuration() -> None:
    with pytest.raises(HvError):
        DomainMemory(1, 8192, 8192, 8)
    with pytest.raises(HvError):
        DomainMemory(1, 4096 * 3, 16384, 8)


def test_fresh_pages_are_zeroed() -> None:
    memory = DomainMemory(1, 4 * 4096, 4096, 8)
    page = memory.alloc_pages(1)[0]
    page.view[:] = b"\xff" * 4096
    memory.free_pages([page])
    again = memory.alloc_pages(1)[0]
    assert again.frame == page.frame and bytes(again.view) == bytes(4096)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_a_run_over_reused_and_untouched_pages_is_all_zero(page_size: int) -> None:
    memory = DomainMemory(1, 8 * page_size, page_size, 8)
    first, second = memory.alloc_pages(2)
    for page in (first, second):
        page.view[:] = b"\xff" * page_size
    memory.free_pages([second])
    # A buffer of three pages: the freed (dirty) one, then two never handed out.
    ring = memory.alloc_buffer(3 * page_size // 4096)
    assert ring.frame == second.frame
    assert bytes(ring.view) == bytes(3 * page_size)
    assert bytes(first.view) == b"\xff" * page_size  # a live page is left alone


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, bytes]] = []

    def frame_written(
        self, gref: int, offset: int, length: int, source: memoryview, start: int
    ) -> None:
        self.calls.append((gref, offset, length, bytes(source[start : start + length])))


def test_written_forwards_ranges_split_by_frame() -> None:
    memory = DomainMemory(1, 8 * 4096, 4096, 8)
    pages = memory.alloc_buffer(3)
    watcher, other = Recorder(), Recorder()
    memory.watch(pages.frame + 1, 2, watcher, gref=42)  # a 2-frame granule
    memory.watch(pages.frame, 1, other, gref=7)
    pages.view[4090:4106] = bytes(range(16))
    pages.written(4090, 16)
    assert other.calls == [(7, 4090, 6, bytes(range(6)))]
    assert watcher.calls == [(42, 0, 10, bytes(range(6, 16)))]
    memory.written((pages.frame << 12) + 100, 4, exclude=other)
    assert len(other.calls) == 1
    memory.unwatch(pages.frame + 1, 2, watcher, gref=42)
    pages.written(4096 + 5, 1)
    assert len(watcher.calls) == 1
