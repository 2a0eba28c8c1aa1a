"""The granule negotiation rules: fallbacks, limits, and agreement between the two ends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpv import granule
from xenpv.granule import GranuleError


@pytest.mark.parametrize(("page", "order"), [(4096, 0), (16384, 2), (65536, 4)])
def test_page_order(page: int, order: int) -> None:
    assert granule.page_order(page) == order
    assert granule.granule_size(order) == page


@pytest.mark.parametrize("page", [0, 512, 8192 + 4096, 3 * 4096])
def test_page_order_rejects_odd_sizes(page: int) -> None:
    with pytest.raises(ValueError):
        granule.page_order(page)


def test_fallbacks() -> None:
    # new frontend, old backend (no key → 0)
    assert granule.frontend_choice(65536, granule.parse_order(None, "k")) == 0
    # old frontend (writes nothing) with new backend → the backend accepts 0
    assert granule.backend_accept(granule.parse_order(None, "k"), 4) == 0
    # the frontend's page order bounds it; the backend's max bounds it
    assert granule.frontend_choice(16384, 4) == 2
    assert granule.frontend_choice(65536, 2) == 2
    # a frontend that declines
    assert granule.frontend_choice(65536, 4, cap=0) == 0
    # an order above the backend's maximum is refused, never shrunk
    with pytest.raises(GranuleError, match="exceeds max-grant-granule-order 2"):
        granule.backend_accept(4, 2)


@pytest.mark.parametrize("raw", [b"5", b"-1", b"x", b"", "9"])
def test_bad_keys_name_the_key(raw: bytes | str) -> None:
    with pytest.raises(GranuleError, match="grant-granule-order"):
        granule.parse_order(raw, "grant-granule-order")


def test_blk_geometry() -> None:
    g = granule.blk_ring_geometry(0, 4)
    assert (g.ring_page_order, g.nr_refs, g.ring_bytes) == (4, 1, 65536)
    g = granule.blk_ring_geometry(4, 2)
    assert (g.ring_page_order, g.nr_refs) == (4, 4)
    assert granule.blk_ring_geometry(3, 0).nr_refs == 8
    assert granule.sectors_per_granule(4) == 128
    assert granule.indirect_descriptors_per_page(4) == 8192
    assert granule.netif_rx_slot_capacity(4) == 32767
    assert granule.netif_rx_slot_capacity(0, 100) == 3996


@given(
    page=st.sampled_from([4096, 16384, 65536]),
    backend_max=st.one_of(st.none(), st.integers(0, 4)),
    frontend_knows=st.booleans(),
    cap=st.one_of(st.none(), st.integers(0, 4)),
    wanted_ring=st.integers(0, 4),
)
def test_both_ends_always_agree(
    page: int, backend_max: int | None, frontend_knows: bool, cap: int | None, wanted_ring: int
) -> None:
    """Whatever each end supports, the frontend's choice is accepted by the backend, fits the
    frontend's pages, and both ends derive the same ring geometry."""
    advertised = None if backend_max is None else str(backend_max)
    seen_max = granule.parse_order(advertised, granule.BACKEND_MAX_KEY)
    written = str(granule.frontend_choice(page, seen_max, cap)) if frontend_knows else None
    front = granule.parse_order(written, granule.FRONTEND_KEY)
    back = granule.backend_accept(
        granule.parse_order(written, granule.FRONTEND_KEY), backend_max or 0
    )
    assert front == back
    assert granule.granule_size(front) <= page
    assert front <= (backend_max or 0)
    geometry = granule.blk_ring_geometry(wanted_ring, front)
    assert geometry.nr_refs * granule.granule_size(front) == geometry.ring_bytes
    assert geometry.ring_page_order <= granule.blk_max_ring_page_order(4, back)
