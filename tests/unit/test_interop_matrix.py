"""The interop matrix: every cell enumerated once, with the order the spec requires."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv import granule
from xenpv.cli import main
from xenpv.interop.matrix import (
    PAGE_SIZES,
    VBD_PROFILES,
    VIF_PROFILES,
    Cell,
    enumerate_cells,
    speedup_pairs,
)


def test_every_combination_exactly_once() -> None:
    cells = enumerate_cells()
    assert len(cells) == 3 * 3 * 2 * (len(VBD_PROFILES) + len(VIF_PROFILES))
    assert len({c.key for c in cells}) == len(cells)
    for device, profiles in (("vbd", VBD_PROFILES), ("vif", VIF_PROFILES)):
        want = set(itertools.product(PAGE_SIZES, PAGE_SIZES, (False, True), profiles))
        got = {
            (c.frontend_page, c.backend_page, c.extension, c.profile)
            for c in cells
            if c.device == device
        }
        assert got == want


def test_profiles_cover_each_feature_both_ways() -> None:
    vbd = [p.features() for p in VBD_PROFILES]
    assert {f["indirect"] for f in vbd} == {False, True}
    assert {f["ring_page_order"] for f in vbd} == {0, 4}
    assert {f["persistent"] for f in vbd} == {False, True}
    assert {f["queues"] for f in vbd} == {1, 4}
    vif = [p.features() for p in VIF_PROFILES]
    assert {f["queues"] for f in vif} == {1, 2}
    assert {f["sg_gso"] for f in vif} == {False, True}


def test_keys_name_the_cell() -> None:
    cell = Cell(65536, 4096, True, "vbd", VBD_PROFILES[1])
    assert cell.key == "vbd-f64k-b4k-on-full"
    assert cell.expected_order == 4
    assert cell.backend_max_order == 4
    assert cell.frontend_granule_order is None  # as large as allowed


@settings(max_examples=50)
@given(st.sampled_from(enumerate_cells()))
def test_expected_order_follows_the_spec(cell: Cell) -> None:
    if not cell.extension:
        # extension off: the backend advertises 0 and the frontend declines
        assert cell.expected_order == 0
        assert cell.backend_max_order == 0
        assert cell.frontend_granule_order == 0
    else:
        # the guest's page order; the backend domain's own page size never limits it
        assert cell.expected_order == granule.page_order(cell.frontend_page)
        assert cell.expected_order == granule.frontend_choice(
            cell.frontend_page, cell.backend_max_order
        )
    assert granule.backend_accept(cell.expected_order, cell.backend_max_order) == (
        cell.expected_order
    )


def test_speedup_pairs_are_64k_guests_off_then_on() -> None:
    cells = enumerate_cells()
    pairs = speedup_pairs(cells)
    assert len(pairs) == 3 * (len(VBD_PROFILES) + len(VIF_PROFILES))
    for off, on in pairs:
        assert off.frontend_page == on.frontend_page == 65536
        assert (off.extension, on.extension) == (False, True)
        assert (off.device, off.backend_page, off.profile) == (
            on.device,
            on.backend_page,
            on.profile,
        )


def test_cli_only_without_a_match_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["interop", "--only", "no-such-cell"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "xenpv: error: --only no-such-cell: no cell key contains that"
