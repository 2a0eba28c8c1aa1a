"""Judging cells: a cell passes only on what was observed, every failure is named."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.interop.matrix import VBD_PROFILES, VIF_PROFILES, Cell, enumerate_cells
from xenpv.interop.verdict import judge, problems, speedups

FULL_VBD, LEAN_VBD = VBD_PROFILES[1], VBD_PROFILES[0]
FULL_VIF = VIF_PROFILES[1]


def observed(cell: Cell, **override: Any) -> dict[str, Any]:
    """A worker result as a correct implementation would report it for `cell`."""
    order = cell.expected_order
    if isinstance(cell.profile, type(FULL_VBD)):
        p = cell.profile
        fe = {
            "granule_order": order or None,
            "ring_page_order": max(p.ring_page_order, order) or None,
            "queues": p.queues if p.queues > 1 else None,
            "persistent": int(p.persistent),
            "info_grant_size": 4096 << order,
        }
        be = {
            "granule_order": order if cell.extension else None,
            "max_granule_order": cell.backend_max_order,
            "indirect_segments": p.indirect_segments or None,
            "persistent": int(p.persistent),
        }
    else:
        fe = {
            "granule_order": order or None,
            "queues": cell.profile.queues,
            "sg": 1,
            "gso_tcpv4": 1,
            "info_grant_size": 4096 << order,
        }
        be = {
            "granule_order": order if cell.extension else None,
            "max_granule_order": cell.backend_max_order,
            "sg": 1,
            "gso_tcpv4": 1,
        }
    fe.update(override.pop("frontend", {}))
    be.update(override.pop("backend", {}))
    return {
        "key": cell.key,
        "ok": True,
        "detail": "verified",
        "mbps": 100.0,
        "unit": "MB/s",
        "negotiated": {"frontend": fe, "backend": be},
    } | override


@settings(max_examples=60)
@given(st.sampled_from(enumerate_cells()))
def test_a_correct_observation_passes(cell: Cell) -> None:
    record = judge(cell, observed(cell))
    assert record["ok"], record["detail"]
    assert record["granule"] == 4096 << cell.expected_order
    assert record["mbps"] == 100.0
    assert record["negotiated"]["frontend"] and record["negotiated"]["backend"]


def test_missing_result_fails() -> None:
    cell = enumerate_cells()[0]
    record = judge(cell, None)
    assert record["ok"] is False and "no result" in record["detail"]
    assert record["mbps"] is None


def test_workload_failure_is_kept() -> None:
    cell = Cell(4096, 4096, False, "vbd", LEAN_VBD)
    record = judge(cell, observed(cell, ok=False, detail="read back differs at offsets [0]"))
    assert not record["ok"] and "read back differs" in record["detail"]
    assert record["mbps"] is None


def test_ends_disagreeing_fail() -> None:
    cell = Cell(65536, 4096, True, "vbd", FULL_VBD)
    found = problems(cell, observed(cell, backend={"granule_order": 2}))
    assert any("ends disagree" in p for p in found)


def test_extension_not_negotiated_fails() -> None:
    """The frontend fell back to 4 KiB although both ends could do 64 KiB."""
    cell = Cell(65536, 16384, True, "vif", FULL_VIF)
    found = problems(
        cell,
        observed(cell, frontend={"granule_order": None, "info_grant_size": 4096},
                 backend={"granule_order": None}),
    )  # fmt: skip
    assert any("granule order 0 negotiated, 4 expected" in p for p in found)
    assert any("grants 4096 bytes" in p for p in found)


def test_backend_not_advertising_fails() -> None:
    cell = Cell(4096, 4096, True, "vbd", LEAN_VBD)  # 4K guest: order 0 either way
    found = problems(cell, observed(cell, backend={"max_granule_order": None}))
    assert found == ["backend advertises max-grant-granule-order 0, configured 4"]


def test_features_not_negotiated_fail() -> None:
    cell = Cell(16384, 4096, True, "vbd", FULL_VBD)
    found = problems(cell, observed(cell, frontend={"queues": 2, "persistent": 0}))
    assert any("multi-queue-num-queues 2, 4 expected" in p for p in found)
    assert any("persistent" in p for p in found)
    vif = Cell(4096, 65536, False, "vif", FULL_VIF)
    assert any("feature-sg" in p for p in problems(vif, observed(vif, backend={"sg": 0})))


def test_lean_ring_grows_to_the_granule() -> None:
    """Spec: a ring is never smaller than one granule (ring-page-order >= granule order)."""
    cell = Cell(65536, 4096, True, "vbd", LEAN_VBD)
    assert not problems(cell, observed(cell))
    assert any(
        "ring-page-order 0, 4 expected" in p
        for p in problems(cell, observed(cell, frontend={"ring_page_order": None}))
    )


def test_speedups_compare_64k_guest_off_and_on() -> None:
    cells = enumerate_cells()
    records = {}
    for cell in cells:
        result = observed(cell, mbps=200.0 if cell.extension else 100.0)
        records[cell.key] = judge(cell, result)
    out = speedups(cells, records)
    assert out["vbd"] == 2.0 and out["vif"] == 2.0
    assert out["detail"]["vbd-lean"] == 2.0 and out["detail"]["vif-full-b64k"] == 2.0
    broken = next(c for c in cells if c.frontend_page == 65536 and c.device == "vif")
    records[broken.key] = judge(broken, None)
    out = speedups(cells, records)
    assert out["vif"] == 2.0  # the other pairs still count
    assert None in out["detail"].values()
    none = speedups(cells, {k: judge(c, None) for c in cells for k in [c.key]})
    assert none["vbd"] is None and none["vif"] is None
