"""Hypothesis strategies shared by the blkif/netif codec tests (tests/unit/test_blkif.py,
tests/unit/test_netif.py) and the header comparison (tests/interop/test_headers_structs.py):
the C integer field types and blkif segment lists."""

from __future__ import annotations

from hypothesis import strategies as st

from xenpv.abi.blkif import BlkifSegment

u8, u16, u32, u64 = (st.integers(0, 2**bits - 1) for bits in (8, 16, 32, 64))
i16 = st.integers(-(2**15), 2**15 - 1)


@st.composite
def segment_lists(
    draw: st.DrawFn, min_size: int, max_size: int, granule: int = 4096
) -> tuple[BlkifSegment, ...]:
    """`min_size`..`max_size` segments, each a valid sector range of a `granule`-byte page."""
    top = granule // 512 - 1
    out = []
    for _ in range(draw(st.integers(min_size, max_size))):
        first = draw(st.integers(0, top))
        out.append(BlkifSegment(draw(u32), first, draw(st.integers(first, top))))
    return tuple(out)
