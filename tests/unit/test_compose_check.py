"""`xenpv toolstack check`'s bookkeeping (pure): which checks a round must produce, and when
its summary may say ok."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from xenpv.commands.toolstack import expected_checks, guest_plan, summarize
from xenpv.toolstack.status import ClusterStatus, DomainStatus, device_status
from xenpv.xenbus.core import DeviceId

CONNECTED = {"state": "4"}


def cluster(vbds: list[int], vifs: list[int], *, fe_state: str = "4") -> ClusterStatus:
    """Backend domid 1; guests are the domids listed (a domid may repeat: several devices)."""
    guests = sorted(set(vbds) | set(vifs))
    names = {1: "backend"} | {g: f"g{g}" for g in guests}
    status = ClusterStatus(
        domains=[
            DomainStatus(d, n, 4096 << (d % 3 * 2), 64 << 20, 100 + d) for d, n in names.items()
        ]
    )
    counts: dict[tuple[str, int], int] = {}
    for cls, domids in (("vbd", vbds), ("vif", vifs)):
        for domid in domids:
            index = counts.get((cls, domid), 0)
            counts[(cls, domid)] = index + 1
            device = DeviceId(cls, domid, 1, 51712 + 16 * index if cls == "vbd" else index)
            status.devices.append(device_status(device, {"state": fe_state}, CONNECTED, names))
    return status


def passing_checks(status: ClusterStatus) -> list[dict[str, Any]]:
    names = {d.domid: d.name for d in status.domains}
    checks = [
        {"domain": d.frontend, "name": f"block-{d.frontend}-{d.devid}", "ok": True}
        for d in status.devices
        if d.cls == "vbd"
    ]
    with_vif = sorted({d.frontend_domid for d in status.devices if d.cls == "vif"})
    for a in with_vif:
        for b in with_vif:
            if a != b:
                checks.append(
                    {"domain": names[a], "name": f"net-{names[a]}-to-{names[b]}", "ok": True}
                )
    return checks


def test_the_demo_shape_needs_nine_checks() -> None:
    status = cluster([2, 3, 4], [2, 3, 4])
    assert expected_checks(status) == 3 + 6
    guests, peers = guest_plan(status, {2: "00:16:3e:00:00:01", 3: "00:16:3e:00:00:02"})
    assert guests == [2, 3, 4]
    assert peers == [
        {"name": "g2", "mac": "00:16:3e:00:00:01"},
        {"name": "g3", "mac": "00:16:3e:00:00:02"},
    ]


@settings(max_examples=60)
@given(
    vbds=st.lists(st.integers(2, 6), max_size=6),
    vifs=st.lists(st.integers(2, 6), max_size=6, unique=True),
    drop=st.integers(0, 20),
    fail=st.integers(0, 20),
)
def test_ok_only_with_every_expected_check_passed(
    vbds: list[int], vifs: list[int], drop: int, fail: int
) -> None:
    status = cluster(vbds, vifs)
    checks = passing_checks(status)
    assert len(checks) == expected_checks(status)
    status.checks = checks
    assert summarize(status, 1.0)["ok"] is True
    if checks and drop < len(checks):
        status.checks = checks[:drop] + checks[drop + 1 :]
        assert summarize(status, 1.0)["ok"] is False  # one missing
    if checks and fail < len(checks):
        status.checks = [dict(c) for c in checks]
        status.checks[fail]["ok"] = False
        assert summarize(status, 1.0)["ok"] is False  # one failed


def test_a_device_not_connected_fails_the_summary() -> None:
    status = cluster([2], [], fe_state="3")
    status.checks = passing_checks(status)
    summary = summarize(status, 1.0)
    assert summary["ok"] is False
    assert not next(c for c in summary["checks"] if c["name"] == "devices-connected")["ok"]
    assert summary["guests"] == [{"name": "g2", "page_size": 65536, "domid": 2}]
