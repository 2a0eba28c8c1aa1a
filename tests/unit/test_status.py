"""The status model: raw xenstore keys → domain and device records, JSON and tables."""

from __future__ import annotations

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from xenpv.toolstack.status import (
    ClusterStatus,
    device_label,
    device_status,
    domain_status,
    render,
    short_state,
)
from xenpv.xenbus.core import DeviceId, xvd_number

NAMES = {1: "backend", 2: "guest64k"}


def connected_vbd_keys(queues: int) -> tuple[dict[str, str], dict[str, str]]:
    """The frontend's and backend's keys of a connected vbd: 16-page rings, `queues` queues,
    persistent grants, 256 indirect segments."""
    frontend = {
        "state": "4",
        "ring-page-order": "4",
        "multi-queue-num-queues": str(queues),
        "feature-persistent": "1",
    }
    backend = {"state": "4", "feature-max-indirect-segments": "256", "feature-persistent": "1"}
    return frontend, backend


def test_connected_vbd_reads_what_was_negotiated() -> None:
    device = DeviceId("vbd", 2, 1, xvd_number(0))
    frontend, backend = connected_vbd_keys(queues=2)
    v = device_status(device, frontend, backend, NAMES)
    assert v.connected
    assert (v.frontend, v.backend) == ("guest64k", "backend")
    assert (v.ring_page_order, v.queues, v.indirect_segments) == (4, 2, 256)
    assert v.persistent is True
    assert v.grant_size == 4096


def test_grant_size_follows_the_negotiated_granule_order() -> None:
    """docs/granule-extension.md: the backend echoes the order it accepted at connect."""
    device = DeviceId("vbd", 2, 1, xvd_number(0))
    front = {"state": "3", "grant-granule-order": "4", "ring-page-order": "4"}
    assert device_status(device, front, {"state": "2"}, NAMES).grant_size == 65536
    back = {"state": "4", "grant-granule-order": "2"}
    assert device_status(device, front | {"state": "4"}, back, NAMES).grant_size == 16384
    assert device_status(device, {"grant-granule-order": "9"}, {}, NAMES).grant_size == 4096


def test_vbd_defaults_when_keys_are_absent() -> None:
    """A single-page, single-queue frontend writes neither key (Linux's legacy layout)."""
    device = DeviceId("vbd", 2, 1, xvd_number(0))
    v = device_status(device, {"state": "3"}, {"state": "2", "feature-persistent": "1"}, NAMES)
    assert not v.connected
    assert (v.frontend_state, v.backend_state) == ("Initialised", "InitWait")
    assert (v.ring_page_order, v.queues, v.indirect_segments) == (0, 1, 0)
    assert v.persistent is False  # only the backend offered it


def test_vif_has_no_block_columns() -> None:
    device = DeviceId("vif", 2, 1, 0)
    v = device_status(device, {"state": "4", "multi-queue-num-queues": "2"}, {"state": "4"}, {})
    assert v.connected and v.queues == 2 and v.ring_page_order == 0
    assert v.indirect_segments is None and v.persistent is None
    assert v.frontend == "2"  # unnamed domains show their domid


def test_domain_status() -> None:
    d = domain_status(3, {"name": "g", "page-size": "65536", "memory": "67108864", "ready": "42"})
    assert (d.name, d.page_size, d.memory, d.pid) == ("g", 65536, 64 << 20, 42)
    assert domain_status(4, {}).name == "domain-4"
    assert domain_status(4, {"page-size": "junk"}).page_size is None


def test_device_label() -> None:
    assert device_label("vbd", xvd_number(0)) == "vbd xvda"
    assert device_label("vbd", xvd_number(2)) == "vbd xvdc"
    assert device_label("vbd", 768) == "vbd768"
    assert device_label("vif", 1) == "vif1"


def test_json_and_tables() -> None:
    status = ClusterStatus(
        domains=[domain_status(1, {"name": "backend", "page-size": "4096"})],
        devices=[
            device_status(DeviceId("vif", 2, 1, 0), {"state": "1"}, {"state": "2"}, NAMES),
        ],
        checks=[{"name": "block-x", "ok": False, "detail": "read back differs"}],
    )
    out = json.loads(json.dumps(status.to_json()))
    assert out["devices"][0]["connected"] is False
    assert out["devices"][0]["frontend_state"] == "Initialising"
    text = io.StringIO()
    console = Console(file=text, width=200)
    for table in render(status):
        console.print(table)
    rendered = text.getvalue()
    assert "Initing/InitWait" in rendered and "FAILED" in rendered and "4K" in rendered


keys = st.dictionaries(
    st.sampled_from(
        [
            "state",
            "ring-page-order",
            "multi-queue-num-queues",
            "feature-persistent",
            "feature-max-indirect-segments",
            "grant-granule-order",
        ]
    ),
    st.text(max_size=6),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys, keys, st.sampled_from(["vbd", "vif"]))
def test_any_keys_give_a_record(
    frontend: dict[str, str], backend: dict[str, str], cls: str
) -> None:
    """Whatever a (possibly hostile) guest wrote, status shows a record and never raises."""
    device = DeviceId(cls, 2, 1, 0)  # type: ignore[arg-type]
    v = device_status(device, frontend, backend, NAMES)
    assert v.frontend_state and v.backend_state
    json.dumps(ClusterStatus(devices=[v]).to_json())


def _demo_status(error: str | None = None) -> ClusterStatus:
    """What `xenpv demo` shows: a backend, three guests, a vbd and a vif each, 13 checks."""
    names = {1: "backend", 2: "guest4k", 3: "guest16k", 4: "guest64k"}
    pages = {1: 4096, 2: 4096, 3: 16384, 4: 65536}
    status = ClusterStatus()
    for domid, name in names.items():
        keys = {"name": name, "page-size": str(pages[domid]), "memory": str(64 << 20)}
        status.domains.append(domain_status(domid, keys | {"ready": "4194303"}))
    for domid in (2, 3, 4):
        order = str(pages[domid].bit_length() - 13)
        front, back = connected_vbd_keys(queues=4)
        back["grant-granule-order"] = order
        vbd = DeviceId("vbd", domid, 1, xvd_number(0))
        status.devices.append(device_status(vbd, front, back, names))
    for domid in (2, 3, 4):
        vif = DeviceId("vif", domid, 1, 0)
        front = {"state": "4", "multi-queue-num-queues": "2"}
        status.devices.append(device_status(vif, front, {"state": "4"}, names, error))
    detail = "wrote, read back and verified 35 extents (4.0 MiB bulk), flushed, discarded"
    status.checks = [
        {"name": "block-guest16k-51712", "ok": True, "detail": detail},
        {"name": "net-guest64k-to-guest16k", "ok": True, "detail": "24 frames echoed"},
        {"name": "devices-connected", "ok": False, "detail": "not connected: []"},
    ]
    return status


def _render_80(status: ClusterStatus) -> str:
    text = io.StringIO()
    console = Console(file=text, width=80, color_system=None)
    for renderable in render(status):
        console.print(renderable)
    return text.getvalue()


def test_tables_fit_80_columns_without_truncation() -> None:
    rendered = _render_80(_demo_status())
    assert "…" not in rendered  # rich marks a truncated cell with an ellipsis
    assert max(len(line) for line in rendered.splitlines()) <= 80
    lines = rendered.splitlines()
    # every device row is one line: names, both states and every negotiated value whole
    rows = [line for line in lines if line.startswith("│ vbd xvda") or line.startswith("│ vif0")]
    assert len(rows) == 6
    for row in rows:
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[3] == "Conn/Conn"
        assert cells[1] in ("guest4k", "guest16k", "guest64k") and cells[2] == "backend"
    assert any("16K" in row and "256" in row for row in rows)
    assert "Conn = Connected" in rendered  # the legend names the abbreviations


def test_long_states_and_errors_wrap_rather_than_truncate() -> None:
    error = "backend says: cannot map the ring's grant reference 12: GNTST_bad_gntref"
    status = _demo_status(error)
    status.devices[3] = device_status(
        DeviceId("vif", 2, 1, 0), {"state": "8"}, {"state": "7"}, {1: "a-rather-long-name"}
    )
    rendered = _render_80(status)
    assert "…" not in rendered
    assert max(len(line) for line in rendered.splitlines()) <= 80
    # one note per device error under the table (a long one wraps at a space)
    assert " ".join(rendered.split()).count(error) == 2
    assert short_state("Reconfigured") == "Reconfed" and short_state("Closed") == "Closed"
